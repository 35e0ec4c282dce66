"""Read a cache: the samples table, one sample's arrays, or every token in chunks.

Only shards listed in the manifest are read. Decoding goes straight from zarr chunks to numpy;
bfloat16 arrays come back as float32 (exact).

**Every read is verified** (docs/format.md, "Integrity"), so a damaged byte is an error naming the
shard and the array or file, never a silently different value:

- opening a shard lists its files once (a missing or truncated file is an error: zarr would return
  fill values) and checks its Zarr metadata documents against the record's ``metadata_checksum``;
  zarr then reads them from that verified copy;
- every chunk carries a crc32c that zarr checks as it decodes (and the shard index has its own);
- ``samples.parquet`` is checked against ``samples_checksum`` whenever it is read, then parsed with
  its page checksums verified, and must agree with the shard's record (samples, tokens, scored
  tokens, offsets that lay the samples end to end);
- arrays must have the shapes and dtypes the manifest and the record say.

Shards written before format 1.3 have none of the per-read checksums: each is verified whole (its
``checksum``, every byte) the first time this ``Cache`` touches it. ``verify_reads=False`` switches
the reader's own checks off (crc32c stays inside zarr); benchmarks use it to measure their cost.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import WrapperStore

from ..format import layout
from ..format.arrays import SELECTED, bf16_bits_to_float32
from ..format.encodings import Encoding, SampledRows, SparseRows, TargetRows, as_targets, encoding_from
from ..format.errors import CorruptShardError, FormatError
from ..format.manifest import Manifest, ShardRecord
from ..format.samples import SAMPLES_SCHEMA, samples_schema
from .checksum import is_metadata, recipe_digest, sha256, shard_digests
from .commit import current_state, load_manifest, load_parts
from .fs import CacheFS

log = logging.getLogger(__name__)

# columns of the samples table that must agree with the shard's record (read with any projection)
CHECK_COLUMNS = ["shard", "token_offset", "num_tokens", "scored_start", "scored_end"]


@dataclass
class TokenChunk:
    """Rows [start, stop) of one shard's arrays."""

    shard: str
    start: int
    stop: int
    arrays: dict[str, np.ndarray]


class _ShardStore(WrapperStore):
    """The zarr store of one shard, over the file system's own. Metadata requests (``zarr.json``) are
    answered from a copy already checked against the shard record: what was verified is what zarr uses.
    A read of a file whose size the shard's listing gave becomes an explicit byte range [start, end): a
    whole read, since s3fs asks the object's size (a HEAD request) before every whole read and the listing
    already said; a suffix or offset read (a shard's index: its last bytes), since a cache layer
    (``simplecache::``) answers from a local file that cannot count from its end."""

    def __init__(self, store, documents: dict[str, bytes] | None, sizes: dict[str, int]):
        super().__init__(store)
        self._documents = documents
        self._sizes = sizes

    def _with_store(self, store):
        return type(self)(store, self._documents, self._sizes)

    def _is_document(self, key: str) -> bool:
        return self._documents is not None and (key == "zarr.json" or key.endswith("/zarr.json"))

    async def get(self, key, prototype, byte_range=None):
        if self._is_document(key):
            doc = self._documents.get(key)
            if doc is None or byte_range is not None:   # zarr reads metadata whole
                return None if doc is None else await self._store.get(key, prototype, byte_range)
            return prototype.buffer.from_bytes(doc)
        size = self._sizes.get(key)
        if size:
            if byte_range is None:
                byte_range = RangeByteRequest(0, size)
            elif isinstance(byte_range, SuffixByteRequest):
                byte_range = RangeByteRequest(max(size - byte_range.suffix, 0), size)
            elif isinstance(byte_range, OffsetByteRequest):
                byte_range = RangeByteRequest(min(byte_range.offset, size), size)
        return await self._store.get(key, prototype, byte_range)

    async def exists(self, key):
        if self._is_document(key):
            return key in self._documents
        return await self._store.exists(key)


@dataclass
class _OpenShard:
    record: ShardRecord
    group: zarr.Group
    arrays: dict


class Cache:
    def __init__(self, cfs: CacheFS, manifest: Manifest, verify_reads: bool = True):
        self.cfs = cfs
        self.manifest = manifest
        self.verify_reads = verify_reads
        self._open: dict[str, _OpenShard] = {}
        self._offsets: dict[tuple[str, str], np.ndarray] = {}
        self._verified_whole: set[str] = set()      # shards of format < 1.3 checked whole by this Cache
        self._verified_files: set[str] = set()      # whole files checked for DuckDB (query engine)
        self._warned_legacy = False

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Cache({self.cfs.url!r}, teacher={m.teacher.name!r}, samples={m.num_samples}, "
                f"tokens={m.num_tokens}, complete={m.complete})")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"], state["_offsets"] = {}, {}     # zarr objects are reopened where the copy runs
        return state

    @property
    def url(self) -> str:
        return self.cfs.url

    @property
    def shards(self) -> list[ShardRecord]:
        return self.manifest.shards

    @property
    def array_names(self) -> list[str]:
        return list(self.manifest.arrays)

    def record(self, shard: str) -> ShardRecord:
        record = self._shard_records.get(shard)
        if record is None:
            raise KeyError(f"{self.url}: no shard {shard!r}")
        return record

    @cached_property
    def _shard_records(self) -> dict:
        return {s.name: s for s in self.shards}

    # ---- verification ---------------------------------------------------------------------------
    def _verify_whole(self, shard: str) -> None:
        """A shard without per-read checksums (format < 1.3): its whole checksum, once per Cache."""
        if shard in self._verified_whole:
            return
        if not self._warned_legacy:
            log.warning("%s: shards written before format 1.3 are verified whole (every byte) the first time they "
                        "are read; `logitcache export` into a new cache gives per-chunk checksums", self.url)
            self._warned_legacy = True
        record = self.record(shard)
        try:
            digests = shard_digests(self.cfs, layout.shard_dir(shard))
        except FileNotFoundError:
            raise CorruptShardError(shard, f"directory {layout.shard_dir(shard)} is missing") from None
        if digests.checksum != record.checksum:
            raise CorruptShardError(shard, f"checksum {digests.checksum} != manifest {record.checksum}")
        self._verified_whole.add(shard)

    def _listing(self, shard: str) -> dict[str, int]:
        """The shard's files and sizes, from one listing; a missing or truncated file is an error
        (zarr would read a missing chunk file as fill values)."""
        record = self.record(shard)
        try:
            files = self.cfs.find_sizes(layout.shard_dir(shard))
        except FileNotFoundError:
            files = {}
        found = sum(files.values())
        if not files:
            raise CorruptShardError(shard, f"directory {layout.shard_dir(shard)} is missing or empty")
        if found != record.bytes:
            raise CorruptShardError(shard, f"{found} bytes on storage, the manifest records {record.bytes}: "
                                           "a file is missing or truncated")
        return files

    def _open_shard(self, shard: str) -> _OpenShard:
        opened = self._open.get(shard)
        if opened is not None:
            return opened
        record = self.record(shard)
        files = self._listing(shard)
        documents = None
        if self.verify_reads:
            if record.verified_per_read:
                prefix = layout.ARRAYS + "/"
                documents = {rel[len(prefix):]: self.cfs.read_bytes(f"{layout.shard_dir(shard)}/{rel}")
                             for rel in files if is_metadata(rel)}
                digest = recipe_digest((prefix + k, v) for k, v in documents.items())
                if digest != record.metadata_checksum:
                    raise CorruptShardError(shard, f"its Zarr metadata (arrays.zarr/**/zarr.json) has checksum {digest}, "
                                                   f"the manifest records {record.metadata_checksum}")
            else:
                self._verify_whole(shard)
        store = self.cfs.zarr_store(layout.shard_arrays(shard), read_only=True)
        prefix = layout.ARRAYS + "/"
        store = _ShardStore(store, documents, {rel[len(prefix):]: n for rel, n in files.items() if rel.startswith(prefix)})
        try:
            group = zarr.open_group(store, mode="r", zarr_format=3)
        except Exception as e:   # unparsable metadata of an unverified shard
            raise CorruptShardError(shard, f"cannot open its Zarr group: {type(e).__name__}: {e}") from None
        opened = _OpenShard(record, group, {})
        self._open[shard] = opened
        return opened

    def group(self, shard: str) -> zarr.Group:
        """The shard's Zarr group (opened and verified once per Cache)."""
        return self._open_shard(shard).group

    def array(self, shard: str, name: str) -> zarr.Array:
        """One array of a shard, checked against the manifest: dtype, row shape and rows (token-major
        arrays have one row per token of the record)."""
        opened = self._open_shard(shard)
        arr = opened.arrays.get(name)
        if arr is not None:
            return arr
        spec = self.manifest.arrays.get(name)
        if spec is None:
            raise KeyError(f"{self.url}: no array {name!r} (arrays: {', '.join(self.array_names)})")
        try:
            arr = opened.group[name]
        except Exception as e:
            raise CorruptShardError(shard, f"array {name} cannot be opened: {type(e).__name__}: {e}") from None
        if str(arr.dtype) != spec.storage_dtype or tuple(arr.shape[1:]) != tuple(spec.row_shape):
            raise CorruptShardError(shard, f"array {name} is {arr.dtype} {tuple(arr.shape)}, the manifest says "
                                           f"{spec.storage_dtype} rows of {tuple(spec.row_shape)}")
        if not spec.per_entry and arr.shape[0] != opened.record.tokens:
            raise CorruptShardError(shard, f"array {name} has {arr.shape[0]} rows, the manifest records "
                                           f"{opened.record.tokens} tokens")
        opened.arrays[name] = arr
        return arr

    def _read(self, shard: str, name: str, start: int, stop: int) -> np.ndarray:
        arr = self.array(shard, name)
        try:
            return arr[start:stop]
        except Exception as e:    # crc32c mismatch, undecodable chunk, ... : never a value
            raise CorruptShardError(shard, f"array {name}, rows [{start}, {stop}): {type(e).__name__}: {e}") from None

    def check_files(self, files: list[tuple[str, str]]) -> list[str]:
        """The paths among ``(path, "sha256:<hex>")`` pairs whose content does not match, each file hashed
        once per Cache, several at a time (hashing releases the GIL)."""
        if not self.verify_reads:
            return []
        todo = [(rel, want) for rel, want in files if rel not in self._verified_files]

        def bad(item: tuple[str, str]) -> str | None:
            rel, want = item
            if self.cfs.sha256(rel) != want:
                return rel
            self._verified_files.add(rel)
            return None

        return [rel for rel in _in_parallel(bad, todo) if rel is not None]

    def check_samples_files(self, shards: list[str]) -> None:
        """Check shards' samples.parquet before a reader other than ours (DuckDB) reads them: against
        their checksums, or, for shards written before 1.3, by verifying the shards whole."""
        if not self.verify_reads:
            return
        records = [self.record(s) for s in shards]
        _in_parallel(self._verify_whole, [r.name for r in records if not r.verified_per_read])
        per_read = [r for r in records if r.verified_per_read]
        bad = set(self.check_files([(layout.shard_samples(r.name), r.samples_checksum) for r in per_read]))
        for r in per_read:
            if layout.shard_samples(r.name) in bad:
                raise CorruptShardError(r.name, f"{layout.SAMPLES} does not match its checksum {r.samples_checksum}")

    # ---- per-sample table -------------------------------------------------------------------
    def shard_samples(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        """The shard's rows of the samples table (``columns``: a projection), verified and checked
        against the shard's record."""
        record = self.record(shard)
        try:
            data = self.cfs.read_bytes(layout.shard_samples(shard))
        except FileNotFoundError:
            raise CorruptShardError(shard, f"{layout.SAMPLES} is missing") from None
        if self.verify_reads:
            if record.verified_per_read:
                if sha256(data) != record.samples_checksum:
                    raise CorruptShardError(shard, f"{layout.SAMPLES} has checksum {sha256(data)}, the manifest "
                                                   f"records {record.samples_checksum}")
                self._verified_files.add(layout.shard_samples(shard))
            else:
                self._verify_whole(shard)
        read = None if columns is None else list(dict.fromkeys(list(columns) + CHECK_COLUMNS))
        try:
            table = pq.read_table(io.BytesIO(data), columns=read, page_checksum_verification=True)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise CorruptShardError(shard, f"{layout.SAMPLES} cannot be read: {e}") from None
        self._check_samples(record, table)
        return table if columns is None else table.select(columns)

    @staticmethod
    def _check_samples(record: ShardRecord, table: pa.Table) -> None:
        def bad(msg: str):
            raise CorruptShardError(record.name, f"{layout.SAMPLES}: {msg}")

        if table.num_rows != record.samples:
            bad(f"{table.num_rows} samples, the manifest records {record.samples}")
        if table.num_rows == 0:
            return
        if not pc.all(pc.equal(table.column("shard"), record.name)).as_py():
            bad(f"rows name another shard than {record.name!r}")
        n = table.column("num_tokens").to_numpy().astype(np.int64)
        off = table.column("token_offset").to_numpy().astype(np.int64)
        lo = table.column("scored_start").to_numpy().astype(np.int64)
        hi = table.column("scored_end").to_numpy().astype(np.int64)
        if int(n.sum()) != record.tokens or not np.array_equal(off, np.concatenate([[0], np.cumsum(n)[:-1]])):
            bad(f"its token offsets do not lay the samples end to end over the {record.tokens} tokens the manifest "
                "records")
        if (n < 0).any() or (lo < 0).any() or (lo > hi).any() or (hi > n).any():
            bad("a sample's scored rows fall outside its tokens")
        if int((hi - lo).sum()) != record.scored_tokens:
            bad(f"{int((hi - lo).sum())} scored tokens, the manifest records {record.scored_tokens}")
        if "positions_kept" in table.column_names:      # 1.6 --positions-from
            kept = table.column("positions_kept").to_numpy(zero_copy_only=False).astype(np.int64)
            if (kept < 0).any() or (kept > hi - lo).any():
                bad("a sample keeps more rows (positions_kept) than it has scored rows")

    @cached_property
    def samples(self) -> pa.Table:
        """All committed samples, in manifest shard order; sample ids are unique across the cache."""
        tables = [self.shard_samples(s.name) for s in self.shards]
        if not tables:
            return SAMPLES_SCHEMA.empty_table()
        schema = samples_schema(tables[0].column_names)     # 1.6: optional columns, on every shard or none
        for name, t in zip((s.name for s in self.shards), tables):
            if samples_schema(t.column_names) != schema:
                raise CorruptShardError(name, f"{layout.SAMPLES}: its columns differ from the first shard's "
                                              f"({', '.join(schema.names)})")
        table = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
        ids = table.column("sample_id")
        if len(pc.unique(ids)) != table.num_rows:
            counts = pc.value_counts(ids).to_pylist()
            dup = next(c["values"] for c in counts if c["counts"] > 1)
            where = [s for s, sid in zip(table.column("shard").to_pylist(), ids.to_pylist()) if sid == dup]
            raise FormatError(f"{self.url}: sample {dup} appears in more than one place (shards "
                              f"{', '.join(dict.fromkeys(where))}): the manifest lists overlapping shards")
        return table

    @cached_property
    def _index(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.samples.column("sample_id").to_pylist())}

    # ---- arrays ---------------------------------------------------------------------------
    def _decode(self, name: str, raw: np.ndarray) -> np.ndarray:
        return bf16_bits_to_float32(raw) if self.manifest.arrays[name].dtype == "bfloat16" else raw

    def entry_offsets(self, shard: str, index: str) -> np.ndarray:
        """(tokens + 1,) int64: token j's rows of the entry arrays indexed by ``index`` are [o[j], o[j+1])."""
        key = (shard, index)
        if key not in self._offsets:
            counts = self._read(shard, index, 0, self.record(shard).tokens).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(counts)])
            for name, spec in self.manifest.arrays.items():
                if spec.index == index and self.array(shard, name).shape[0] != offsets[-1]:
                    raise CorruptShardError(shard, f"array {name} has {self.array(shard, name).shape[0]} entries, "
                                                   f"its index {index} counts {int(offsets[-1])}")
            self._offsets[key] = offsets
        return self._offsets[key]

    def read_raw(self, shard: str, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one array as stored (bfloat16 stays uint16 bits; entry arrays by entry)."""
        return self._read(shard, name, start, stop)

    def read_rows(self, shard: str, start: int, stop: int, arrays: list[str] | None = None) -> dict[str, np.ndarray]:
        """Token rows [start, stop) of each array; for an entry array (format 1.2) the entries of those
        tokens (its index array says how many each has)."""
        out = {}
        for name in (arrays or self.array_names):
            index = self.manifest.arrays[name].index if name in self.manifest.arrays else None
            if index is None:
                out[name] = self._decode(name, self._read(shard, name, start, stop))
            else:
                off = self.entry_offsets(shard, index)
                out[name] = self._read(shard, name, int(off[start]), int(off[stop]))
        return out

    @cached_property
    def encoding(self) -> Encoding:
        """The encoding of the teacher's distribution (``capture.encoding``; topk for caches before 1.2)."""
        return encoding_from(self.manifest.capture.encoding)

    def teacher_rows(self, shard: str, start: int, stop: int) -> SparseRows | SampledRows | TargetRows:
        """The teacher's distribution at token rows [start, stop) of a shard, decoded by the cache's
        encoding: ``SparseRows`` (ids and float32 log-probs in rank order, the exact tail or None),
        ``SampledRows`` or ``TargetRows`` (unbiased estimates of p). Rows whose distribution was not
        captured have no entries (fill values for topk and full, whose rows all have k)."""
        arrays = self.read_rows(shard, start, stop, self.encoding.stored_names())
        return self.encoding.decode(arrays, self.manifest.teacher.vocab_size)

    def _sample_record(self, key: str | int) -> dict:
        row = self._index.get(key) if isinstance(key, str) else key
        if row is None or not 0 <= row < self.samples.num_rows:
            raise KeyError(f"{self.url}: no sample {key!r}")
        return self.samples.slice(row, 1).to_pylist()[0]

    def sample(self, key: str | int, arrays: list[str] | None = None) -> dict[str, np.ndarray]:
        """The stored arrays of one sample (by ``sample_id`` or row number in ``samples``), by their
        stored names and as stored: ``tokens``, ``entropy``, ``target_logprob``, ``hidden/<layer>``
        (bfloat16 as float32), and the encoding's distribution arrays (``topk_ids`` / ``topk_logprobs``
        for topk and full; the ``dist/`` arrays of the others, e.g. compact's delta-coded ``dist/ids``
        and uint8 ``dist/codes``, which only their decoder turns into values: see ``sample_view``)."""
        rec = self._sample_record(key)
        start = rec["token_offset"]
        return self.read_rows(rec["shard"], start, start + rec["num_tokens"], arrays)

    def sample_view(self, key: str | int) -> dict[str, np.ndarray]:
        """One sample decoded, with the same keys for every encoding: ``tokens``, ``entropy``,
        ``target_logprob``, ``hidden/<layer>``, and the teacher's distribution at each row (n rows,
        W = the most entries a row has): ``ids`` (n, W) int64 (-1 after a row's entries), ``probs``
        (n, W) float32 (exact probabilities, or unbiased estimates of them for sampled / hybrid;
        0 in padding), ``tail`` (n,) float32 (the mass outside the row's ids: exact where the encoding
        stores it, 1 - sum(probs) for topk and full, NaN for the estimated encodings) and
        ``estimated`` (bool). Rows outside [scored_start, scored_end) have no entries."""
        rec = self._sample_record(key)
        start, n = rec["token_offset"], rec["num_tokens"]
        scored = np.zeros(n, dtype=bool)
        scored[rec["scored_start"]:rec["scored_end"]] = True
        return self.view_rows(rec["shard"], start, start + n, scored)

    def view_rows(self, shard: str, start: int, stop: int, scored: np.ndarray) -> dict[str, np.ndarray]:
        """Rows [start, stop) of a shard decoded as ``sample_view`` gives a sample's (W: the most entries
        a row of the range has); ``scored`` (bool, one per row) says which rows keep their entries."""
        n = stop - start
        m = self.manifest
        distribution = {sp.name for sp in self.encoding.specs(m.teacher.vocab_size, m.capture.logprob_dtype,
                                                                m.capture.top_k)}
        base = [name for name in m.arrays if name not in distribution]
        out = self.read_rows(shard, start, stop, base)
        if SELECTED in out:                      # 1.6: rows the capture left without a distribution
            scored = scored & (out[SELECTED] != 0)
        rows = as_targets(self.teacher_rows(shard, start, stop))
        if isinstance(rows, SparseRows):
            ids, lp = rows.padded()
            probs = np.exp(lp.astype(np.float64))
            tail = rows.tail_mass()
        else:
            ids, probs = rows.padded()
            tail = np.full(n, np.nan)
        ids[~scored], probs[~scored] = -1, 0.0
        out.update(ids=ids, probs=np.where(ids >= 0, probs, 0.0).astype(np.float32),
                   tail=np.where(scored, tail, np.nan).astype(np.float32),
                   estimated=np.bool_(isinstance(rows, TargetRows)))
        return out

    def iter_token_chunks(self, arrays: list[str] | None = None, chunk_tokens: int = 1 << 16) -> Iterator[TokenChunk]:
        """Every token row of every shard, ``chunk_tokens`` rows at a time (bounded memory)."""
        for s in self.shards:
            for start in range(0, s.tokens, chunk_tokens):
                stop = min(start + chunk_tokens, s.tokens)
                yield TokenChunk(s.name, start, stop, self.read_rows(s.name, start, stop, arrays))

    # ---- integrity and size -----------------------------------------------------------------
    def verify(self, shards: list[str] | None = None) -> int:
        """Recompute every checksum of each shard (every byte), check its samples table and arrays
        against its record; raise CorruptShardError naming the first bad one."""
        checked = 0
        for s in self.shards:
            if shards is not None and s.name not in shards:
                continue
            self._listing(s.name)
            d = shard_digests(self.cfs, layout.shard_dir(s.name))
            if d.checksum != s.checksum:
                raise CorruptShardError(s.name, f"checksum {d.checksum} != manifest {s.checksum}")
            if s.verified_per_read and (d.metadata_checksum, d.samples_checksum) != (s.metadata_checksum,
                                                                                    s.samples_checksum):
                raise CorruptShardError(s.name, "its metadata or samples checksum does not match the manifest")
            self._verified_whole.add(s.name)
            self.shard_samples(s.name, CHECK_COLUMNS)
            for name, spec in self.manifest.arrays.items():
                if spec.per_entry:
                    self.entry_offsets(s.name, spec.index)
                else:
                    self.array(s.name, name)
            checked += 1
        return checked

    def stored_bytes(self) -> dict[str, int]:
        """Bytes on storage per array over all shards (the samples table under 'samples.parquet')."""
        out = {name: 0 for name in self.array_names}
        out[layout.SAMPLES] = 0
        for s in self.shards:
            for rel, size in self.cfs.find_sizes(layout.shard_dir(s.name)).items():
                if rel == layout.SAMPLES:
                    out[layout.SAMPLES] += size
                    continue
                parts = rel.split("/")[1:]          # below arrays.zarr/
                two = "/".join(parts[:2])          # grouped arrays: hidden/<l>, dist/<x>, attn/<b>_q (1.5)
                name = two if two in out else (parts[0] if parts else "")
                if name in out:
                    out[name] += size
        return out


def _in_parallel(fn, items: list, workers: int = 8) -> list:
    """``[fn(x) for x in items]``, a few at a time (file reads and hashing release the GIL)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def open_cache(url: str, verify: bool = False, allow_partial: bool = False,
               storage_options: dict | None = None, verify_reads: bool = True) -> Cache:
    """Open a cache on a local path or fsspec URL.

    ``allow_partial`` reads a cache whose capture is still running or was never finalized (the
    merge of its part manifests: committed shards only). ``verify`` recomputes every checksum now.
    ``verify_reads`` (default on) checks what each read touches (module docstring).
    """
    cfs = CacheFS(url, storage_options)
    cfs.check_directory()
    manifest = load_manifest(cfs)
    if manifest is None:
        if not load_parts(cfs):
            raise FormatError(f"{url}: no {layout.MANIFEST} here: not a logitcache cache")
        if not allow_partial:
            raise FormatError(
                f"{url}: has part manifests but no {layout.MANIFEST}: a capture is running or was never "
                "finalized; run `logitcache finalize` or open with allow_partial=True")
        manifest = current_state(cfs)
    cache = Cache(cfs, manifest, verify_reads=verify_reads)
    if verify:
        cache.verify()
    return cache

