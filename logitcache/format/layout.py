"""Where things live inside a cache directory (local path or fsspec URL), and which names may appear.

    CACHE/
      manifest.json                      merged commit record (written last, atomically)
      parts/worker-00000.json            one per capture worker (same schema + "part")
      shards/<name>/arrays.zarr/         one Zarr v3 group: token-major arrays
      shards/<name>/samples.parquet      the shard's rows of the samples table
      _tmp/                              shards being written; never read
      derived/                           tables computed from the shards (format 1.1; listed under
                                         "derived" in the manifest; never part of a shard)
"""

import posixpath
import re

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


# Names read from a manifest become paths: they must match these patterns, so that a manifest that
# travelled from another machine or bucket can never point outside the cache (docs/format.md, "Names").
INPUT_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}-[0-9]{6,}")
ARRAY_NAME = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_]+)?")
DERIVED_PATH = re.compile(rf"{DERIVED_DIR}/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")


def check_name(kind: str, value, pattern: re.Pattern) -> str | None:
    """The problem with a name read from a manifest (None when it is valid): it must be a string that
    matches ``pattern`` whole and has no ``..`` component."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        return f"{kind} {value!r} is not a valid {kind} (pattern {pattern.pattern})"
    if ".." in value.split("/") or posixpath.normpath(value) != value:
        return f"{kind} {value!r} is not a plain relative path"
    return None
