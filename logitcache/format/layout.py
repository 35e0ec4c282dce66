"""Where things live inside a cache directory (local path or fsspec URL).

    CACHE/
      manifest.json                      merged commit record (written last, atomically)
      parts/worker-00000.json            one per capture worker (same schema + "part")
      shards/<name>/arrays.zarr/         one Zarr v3 group: token-major arrays
      shards/<name>/samples.parquet      the shard's rows of the samples table
      _tmp/                              shards being written; never read
      derived/                           tables computed from the shards (format 1.1; listed under
                                         "derived" in the manifest; never part of a shard)
"""

MANIFEST = "manifest.json"
PARTS_DIR = "parts"
SHARDS_DIR = "shards"
TMP_DIR = "_tmp"
ARRAYS = "arrays.zarr"
SAMPLES = "samples.parquet"
DERIVED_DIR = "derived"


def part_path(worker_index: int) -> str:
    return f"{PARTS_DIR}/worker-{worker_index:05d}.json"


def shard_name(input_key: str, index: int) -> str:
    return f"{input_key}-{index:06d}"


def shard_dir(name: str) -> str:
    return f"{SHARDS_DIR}/{name}"


def shard_arrays(name: str) -> str:
    return f"{SHARDS_DIR}/{name}/{ARRAYS}"


def shard_samples(name: str) -> str:
    return f"{SHARDS_DIR}/{name}/{SAMPLES}"
