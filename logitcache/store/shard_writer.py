"""Write one shard so that a crash at any moment leaves nothing that looks committed.

Order: arrays and samples go to ``_tmp/<name>-<uuid>/``; the checksum is taken from the bytes on
storage; the directory is published as ``shards/<name>/``; the caller then records it in its part
manifest. Until that record exists no reader sees the shard, and the next capture rewrites it.
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
from ..format.samples import SAMPLES_SCHEMA
from ..format.version import FORMAT_NAME, FORMAT_VERSION
from .checksum import shard_checksum
from .codecs import DEFAULT_CODEC, compressors
from .fs import CacheFS

# Test hook: LOGITCACHE_FAULT=kill-before-publish:<shard name> kills the process (SIGKILL) after the
# shard's files are written and before they are published: the worst moment for a crash.
FAULT_ENV = "LOGITCACHE_FAULT"


@dataclass
class WrittenShard:
    checksum: str
    bytes: int


def to_storage(spec: ArraySpec, values: np.ndarray) -> np.ndarray:
    """Logical values -> what zarr stores (bfloat16 becomes its uint16 bit pattern)."""
    if spec.dtype == "bfloat16" and values.dtype != np.uint16:
        return float32_to_bf16_bits(values.astype(np.float32, copy=False))
    return np.ascontiguousarray(values, dtype=spec.storage_dtype)


def write_shard(cfs: CacheFS, name: str, arrays: dict[str, np.ndarray], specs: dict[str, ArraySpec],
                samples: pa.Table, codec: str | dict[str, str] = DEFAULT_CODEC) -> WrittenShard:
    """``codec``: one choice for every array, or per array (as the manifest's ``codecs`` records it)."""
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
    tmp = f"{layout.TMP_DIR}/{name}-{uuid.uuid4().hex[:12]}"
    group = zarr.open_group(cfs.zarr_store(f"{tmp}/{layout.ARRAYS}"), mode="w", zarr_format=3,
                            attributes={"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "shard": name})
    for key, spec in specs.items():
        data = to_storage(spec, arrays[key])
        rows = chunk_rows(spec)
        shard_rows = max(math.ceil(len(data) / rows), 1) * rows  # one storage object per array
        arr = group.create_array(
            key, shape=data.shape, dtype=spec.storage_dtype, chunks=(rows, *spec.row_shape),
            shards=(shard_rows, *spec.row_shape), compressors=compressors(spec, codec[key] if isinstance(codec, dict) else codec),
            fill_value=spec.fill, attributes={"logical_dtype": spec.dtype, "meaning": spec.meaning},
            dimension_names=spec.dimension_names,
        )
        if len(data):
            arr[...] = data
    buf = io.BytesIO()
    pq.write_table(samples.cast(SAMPLES_SCHEMA), buf, compression="zstd")
    cfs.write_atomic(f"{tmp}/{layout.SAMPLES}", buf.getvalue())
    checksum, nbytes = shard_checksum(cfs, tmp)
    if os.environ.get(FAULT_ENV) == f"kill-before-publish:{name}":
        os.kill(os.getpid(), signal.SIGKILL)
    cfs.publish_dir(tmp, layout.shard_dir(name))
    return WrittenShard(checksum, nbytes)
