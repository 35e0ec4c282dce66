"""Write one shard so that a crash at any moment leaves nothing that looks committed.

Order: arrays and samples go to ``_tmp/<name>-<uuid>/``; the checksums are taken from the bytes on
storage; the directory is published as ``shards/<name>/``; the caller then records it in its part
manifest. Until that record exists no reader sees the shard, and the next capture rewrites it.

What makes every later read verifiable (format 1.3): each array's codec chain ends with crc32c, the
samples table carries Parquet page checksums, and the record holds the checksums of the files a
reader reads whole (``checksum.shard_digests``).
"""

from __future__ import annotations

import io
import math
import os
import signal
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from ..format import layout
from ..format.arrays import ArraySpec, chunk_rows, float32_to_bf16_bits
from ..format.manifest import ShardRecord
from ..format.samples import samples_schema
from ..format.version import FORMAT_NAME, FORMAT_VERSION
from .checksum import shard_digests
from .codecs import DEFAULT_CODEC, compressors
from .fs import CacheFS

# Test hook: LOGITCACHE_FAULT=kill-before-publish:<shard name> kills the process (SIGKILL) after the
# shard's files are written and before they are published: the worst moment for a crash.
FAULT_ENV = "LOGITCACHE_FAULT"


@dataclass
class WrittenShard:
    """What a shard's record says about it, from its samples table and the bytes on storage."""

    name: str
    samples: int
    tokens: int
    scored_tokens: int
    checksum: str
    bytes: int
    metadata_checksum: str
    samples_checksum: str

    def record(self, input_key: str, index: int, worker: int) -> ShardRecord:
        return ShardRecord(name=self.name, input_key=input_key, index=index, samples=self.samples, tokens=self.tokens,
                           scored_tokens=self.scored_tokens, bytes=self.bytes, checksum=self.checksum, worker=worker,
                           metadata_checksum=self.metadata_checksum, samples_checksum=self.samples_checksum)


def samples_parquet(samples: pa.Table) -> bytes:
    """A samples table as the format stores it: zstd, with page checksums (format 1.3)."""
    buf = io.BytesIO()
    pq.write_table(samples.cast(samples_schema(samples.column_names)), buf, compression="zstd", write_page_checksum=True)
    return buf.getvalue()


def to_storage(spec: ArraySpec, values: np.ndarray) -> np.ndarray:
    """Logical values -> what zarr stores (bfloat16 becomes its uint16 bit pattern)."""
    if spec.dtype == "bfloat16" and values.dtype != np.uint16:
        return float32_to_bf16_bits(values.astype(np.float32, copy=False))
    return np.ascontiguousarray(values, dtype=spec.storage_dtype)


def write_shard(cfs: CacheFS, name: str, arrays: dict[str, np.ndarray], specs: dict[str, ArraySpec],
                samples: pa.Table, codec: str | dict[str, str] = DEFAULT_CODEC, checksum: bool = True) -> WrittenShard:
    """``codec``: one choice for every array, or per array (as the manifest's ``codecs`` records it).
    The samples table must describe the arrays: its token offsets lay the samples end to end over
    every token row. ``checksum=False`` writes chunks without crc32c (format 1.2's layout; benchmarks)."""
    if set(arrays) != set(specs):
        raise ValueError(f"shard {name}: arrays {sorted(arrays)} do not match the specs {sorted(specs)}")
    num_rows = {arrays[k].shape[0] for k, spec in specs.items() if not spec.per_entry}
    if len(num_rows) != 1:
        raise ValueError(f"shard {name}: token-major arrays must all have one row per token, got {sorted(num_rows)}")
    for key, spec in specs.items():   # entry arrays: as many rows as their count array says
        if spec.per_entry and arrays[key].shape[0] != int(arrays[spec.index].astype(np.int64).sum()):
            raise ValueError(f"shard {name}: {key} has {arrays[key].shape[0]} rows, its index {spec.index} "
                             f"counts {int(arrays[spec.index].astype(np.int64).sum())}")
    (n,) = num_rows
    lengths = samples.column("num_tokens").to_numpy().astype(np.int64) if samples.num_rows else np.zeros(0, np.int64)
    offsets = samples.column("token_offset").to_numpy().astype(np.int64) if samples.num_rows else lengths
    if int(lengths.sum()) != n or not np.array_equal(offsets, np.concatenate([[0], np.cumsum(lengths)[:-1]])[:len(offsets)]):
        raise ValueError(f"shard {name}: the samples table does not lay its samples end to end over the {n} token rows")
    scored = int((samples.column("scored_end").to_numpy().astype(np.int64)
                  - samples.column("scored_start").to_numpy().astype(np.int64)).sum()) if samples.num_rows else 0
    tmp = f"{layout.TMP_DIR}/{name}-{uuid.uuid4().hex[:12]}"
    group = zarr.open_group(cfs.zarr_store(f"{tmp}/{layout.ARRAYS}"), mode="w", zarr_format=3,
                            attributes={"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "shard": name})
    for key, spec in specs.items():
        data = to_storage(spec, arrays[key])
        rows = chunk_rows(spec)
        shard_rows = max(math.ceil(len(data) / rows), 1) * rows  # one storage object per array
        arr = group.create_array(
            key, shape=data.shape, dtype=spec.storage_dtype, chunks=(rows, *spec.row_shape),
            shards=(shard_rows, *spec.row_shape),
            compressors=compressors(spec, codec[key] if isinstance(codec, dict) else codec, checksum=checksum),
            fill_value=spec.fill, attributes={"logical_dtype": spec.dtype, "meaning": spec.meaning},
            dimension_names=spec.dimension_names,
        )
        if len(data):
            arr[...] = data
    cfs.write_atomic(f"{tmp}/{layout.SAMPLES}", samples_parquet(samples))
    d = shard_digests(cfs, tmp)
    if os.environ.get(FAULT_ENV) == f"kill-before-publish:{name}":
        os.kill(os.getpid(), signal.SIGKILL)
    cfs.publish_dir(tmp, layout.shard_dir(name))
    if not checksum:   # the layout of 1.2: the record carries only the whole-shard checksum
        return WrittenShard(name, samples.num_rows, n, scored, d.checksum, d.bytes, "", "")
    return WrittenShard(name, samples.num_rows, n, scored, d.checksum, d.bytes, d.metadata_checksum,
                        d.samples_checksum)
