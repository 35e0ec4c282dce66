"""Read a cache: the samples table, one sample's arrays, or every token in chunks.

Only shards listed in the manifest are read. Decoding goes straight from zarr chunks to numpy;
bfloat16 arrays come back as float32 (exact).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from ..format import layout
from ..format.arrays import bf16_bits_to_float32
from ..format.errors import CorruptShardError, FormatError
from ..format.manifest import Manifest, ShardRecord
from ..format.samples import SAMPLES_SCHEMA
from .checksum import shard_checksum
from .commit import current_state, load_manifest, load_parts
from .fs import CacheFS


@dataclass
class TokenChunk:
    """Rows [start, stop) of one shard's arrays."""

    shard: str
    start: int
    stop: int
    arrays: dict[str, np.ndarray]


class Cache:
    def __init__(self, cfs: CacheFS, manifest: Manifest):
        self.cfs = cfs
        self.manifest = manifest
        self._groups: dict[str, zarr.Group] = {}
        self._offsets: dict[tuple[str, str], np.ndarray] = {}

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Cache({self.cfs.url!r}, teacher={m.teacher.name!r}, samples={m.num_samples}, "
                f"tokens={m.num_tokens}, complete={m.complete})")

    @property
    def url(self) -> str:
        return self.cfs.url

    @property
    def shards(self) -> list[ShardRecord]:
        return self.manifest.shards

    @property
    def array_names(self) -> list[str]:
        return list(self.manifest.arrays)

    # ---- per-sample table -------------------------------------------------------------------
    def shard_samples(self, shard: str) -> pa.Table:
        data = self.cfs.read_bytes(layout.shard_samples(shard))
        return pq.read_table(io.BytesIO(data))

    @cached_property
    def samples(self) -> pa.Table:
        """All committed samples, in manifest shard order."""
        tables = [self.shard_samples(s.name) for s in self.shards]
        return pa.concat_tables(tables).cast(SAMPLES_SCHEMA) if tables else SAMPLES_SCHEMA.empty_table()

    @cached_property
    def _shard_records(self) -> dict:
        return {s.name: s for s in self.shards}

    @cached_property
    def _index(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.samples.column("sample_id").to_pylist())}

    # ---- arrays ---------------------------------------------------------------------------
    def group(self, shard: str) -> zarr.Group:
        if shard not in self._groups:
            self._check_size(shard)
            store = self.cfs.zarr_store(layout.shard_arrays(shard), read_only=True)
            self._groups[shard] = zarr.open_group(store, mode="r", zarr_format=3)
        return self._groups[shard]

    def _check_size(self, shard: str) -> None:
        """Zarr reads a missing chunk file as fill values; one listing per shard catches a missing or
        truncated file before any value is read (``verify`` checks the content)."""
        record = self._shard_records.get(shard)
        if record is None:
            raise KeyError(f"{self.url}: no shard {shard!r}")
        found = self.cfs.total_size(layout.shard_dir(shard))
        if found != record.bytes:
            raise CorruptShardError(shard, f"{found} bytes on storage, the manifest records {record.bytes}: "
                                           "a file is missing or truncated")

    def _decode(self, name: str, raw: np.ndarray) -> np.ndarray:
        return bf16_bits_to_float32(raw) if self.manifest.arrays[name].dtype == "bfloat16" else raw

    def entry_offsets(self, shard: str, index: str) -> np.ndarray:
        """(tokens + 1,) int64: token j's rows of the entry arrays indexed by ``index`` are [o[j], o[j+1])."""
        key = (shard, index)
        if key not in self._offsets:
            counts = self.group(shard)[index][...].astype(np.int64)
            self._offsets[key] = np.concatenate([[0], np.cumsum(counts)])
        return self._offsets[key]

    def read_rows(self, shard: str, start: int, stop: int, arrays: list[str] | None = None) -> dict[str, np.ndarray]:
        """Token rows [start, stop) of each array; for an entry array (format 1.2) the entries of those
        tokens (its index array says how many each has)."""
        g = self.group(shard)
        out = {}
        for name in (arrays or self.array_names):
            index = self.manifest.arrays[name].index
            if index is None:
                out[name] = self._decode(name, g[name][start:stop])
            else:
                off = self.entry_offsets(shard, index)
                out[name] = g[name][int(off[start]):int(off[stop])]
        return out

    def sample(self, key: str | int, arrays: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of one sample, by ``sample_id`` or by row number in ``samples``."""
        row = self._index.get(key) if isinstance(key, str) else key
        if row is None or not 0 <= row < self.samples.num_rows:
            raise KeyError(f"{self.url}: no sample {key!r}")
        rec = self.samples.slice(row, 1).to_pylist()[0]
        start = rec["token_offset"]
        return self.read_rows(rec["shard"], start, start + rec["num_tokens"], arrays)

    def iter_token_chunks(self, arrays: list[str] | None = None, chunk_tokens: int = 1 << 16) -> Iterator[TokenChunk]:
        """Every token row of every shard, ``chunk_tokens`` rows at a time (bounded memory)."""
        for s in self.shards:
            for start in range(0, s.tokens, chunk_tokens):
                stop = min(start + chunk_tokens, s.tokens)
                yield TokenChunk(s.name, start, stop, self.read_rows(s.name, start, stop, arrays))

    # ---- integrity and size -----------------------------------------------------------------
    def verify(self, shards: list[str] | None = None) -> int:
        """Recompute each shard's checksum; raise CorruptShardError naming the first bad one."""
        checked = 0
        for s in self.shards:
            if shards is not None and s.name not in shards:
                continue
            if not self.cfs.exists(layout.shard_dir(s.name)):
                raise CorruptShardError(s.name, f"directory {layout.shard_dir(s.name)} is missing")
            digest, _ = shard_checksum(self.cfs, layout.shard_dir(s.name))
            if digest != s.checksum:
                raise CorruptShardError(s.name, f"checksum {digest} != manifest {s.checksum}")
            checked += 1
        return checked

    def stored_bytes(self) -> dict[str, int]:
        """Bytes on storage per array over all shards (the samples table under 'samples.parquet')."""
        out = {name: 0 for name in self.array_names}
        out[layout.SAMPLES] = 0
        for s in self.shards:
            base = layout.shard_arrays(s.name)
            for rel in self.cfs.find(base):
                top = rel.split("/")[0]
                name = f"{top}/{rel.split('/')[1]}" if top in ("hidden", "dist") else top
                if name in out:
                    out[name] += self.cfs.size(f"{base}/{rel}")
            out[layout.SAMPLES] += self.cfs.size(layout.shard_samples(s.name))
        return out


def open_cache(url: str, verify: bool = False, allow_partial: bool = False,
               storage_options: dict | None = None) -> Cache:
    """Open a cache on a local path or fsspec URL.

    ``allow_partial`` reads a cache whose capture is still running or was never finalized (the
    merge of its part manifests: committed shards only). ``verify`` recomputes every checksum.
    """
    cfs = CacheFS(url, storage_options)
    manifest = load_manifest(cfs)
    if manifest is None:
        if not load_parts(cfs):
            raise FormatError(f"{url}: no {layout.MANIFEST} here: not a logitcache cache")
        if not allow_partial:
            raise FormatError(
                f"{url}: has part manifests but no {layout.MANIFEST}: a capture is running or was never "
                "finalized; run `logitcache finalize` or open with allow_partial=True")
        manifest = current_state(cfs)
    cache = Cache(cfs, manifest)
    if verify:
        cache.verify()
    return cache
