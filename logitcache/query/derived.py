"""Derived tables: computed once from the committed shards, stored under ``derived/``, recorded in
the manifest's ``derived`` section (format 1.1), reused by every later query.

A record is valid while its ``cache_fingerprint`` is the cache's current one: a capture that adds
shards changes the fingerprint, and the table is recomputed on next use (the stale files are then
removed). Files are written atomically before the manifest names them, so a crash leaves at worst an
unlisted file, never a listed half-written one. Nothing here touches ``shards/``: a 1.0 reader sees
the same cache as before.

When the cache cannot be written (a read-only bucket) or ``persist`` is off, tables are computed in
memory for this query only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..format import layout
from ..format.errors import FormatError
from ..format.fingerprint import cache_fingerprint
from ..format.manifest import DerivedFile, DerivedTable
from ..format.samples import SAMPLES_SCHEMA
from ..store.checksum import sha256
from ..store.commit import update_manifest
from ..store.reader import Cache
from . import token_stats as ts

log = logging.getLogger(__name__)

TOKEN_STATS = "token_stats"
TOKENS = "tokens"
SAMPLES_INDEX = "samples_index"
INDEX_PART_ROWS = 1 << 20  # samples per file of the samples index
TEXT_COLUMNS = ("prompt", "response")  # left out of the samples index: they are most of the bytes
SAMPLES_INDEX_COLUMNS = [n for n in SAMPLES_SCHEMA.names if n not in TEXT_COLUMNS]


class _Stale(Exception):
    pass


def _key(name: str, params: dict, fingerprint: str) -> str:
    text = json.dumps({"name": name, "params": params, "cache": fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _parquet_bytes(table: pa.Table, meta: dict) -> bytes:
    buf = io.BytesIO()
    table = table.replace_schema_metadata({b"logitcache.derived": json.dumps(meta).encode()})
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
    return buf.getvalue()


def find(cache: Cache, name: str, params: dict) -> DerivedTable | None:
    """The recorded, current table ``name`` with ``params`` whose files are all present and match their
    checksums (``Cache.check_files``: a derived file is verified before anything reads it), or None."""
    fp = cache_fingerprint(cache.manifest)
    for t in cache.manifest.derived:
        if t.name == name and t.params == params and t.cache_fingerprint == fp:
            if all(cache.cfs.exists(f.path) and cache.cfs.size(f.path) == f.bytes for f in t.files):
                if not cache.check_files([(f.path, f.checksum) for f in t.files]):
                    return t
                log.warning("%s: a file of derived table %s does not match its checksum; recomputing", cache.url, name)
            else:
                log.warning("%s: derived table %s is listed but its files are missing or truncated; recomputing",
                            cache.url, name)
    return None


def _can_persist(cache: Cache, persist: bool) -> bool:
    """Only a finalized cache whose manifest.json is what we read gets derived tables (never one read
    through a chained URL: those are read-only)."""
    if not persist or not cache.cfs.writable or not cache.cfs.exists(layout.MANIFEST):
        return False
    from ..store.commit import load_manifest

    on_disk = load_manifest(cache.cfs)
    return on_disk is not None and cache_fingerprint(on_disk) == cache_fingerprint(cache.manifest)


def _record(cache: Cache, table: DerivedTable) -> None:
    """Name ``table`` in manifest.json (replacing an older one of the same name and params) and drop
    the files of the records it replaces."""
    replaced: list[DerivedTable] = []

    def check(m):
        if cache_fingerprint(m) != table.cache_fingerprint:
            raise _Stale()
        replaced.extend(t for t in m.derived if t.name == table.name and t.params == table.params)

    def edit(d):
        keep = [t for t in d.get("derived") or [] if not (t.get("name") == table.name and t.get("params") == table.params)]
        d["derived"] = keep + [asdict(table)]

    try:
        cache.manifest = update_manifest(cache.cfs, check, edit, needs_version="1.1")
    except _Stale:
        log.warning("%s: the cache changed while %s was computed; not recording it", cache.url, table.name)
        return
    current = {f.path for f in table.files}
    for old in replaced:
        for f in old.files:
            if f.path not in current:
                cache.cfs.remove(f.path)


def _write_files(cache: Cache, files: list[tuple[str, Callable[[], pa.Table]]], meta: dict) -> list[DerivedFile]:
    out = []
    for path, make in files:
        table = make()
        data = _parquet_bytes(table, meta)
        cache.cfs.write_atomic(path, data)
        out.append(DerivedFile(path=path, rows=table.num_rows, bytes=len(data), checksum=sha256(data)))
    return out


def token_stats(cache: Cache, threshold: float = ts.DEFAULT_THRESHOLD, persist: bool = True) -> pa.Table:
    """The ``token_stats`` table for ``threshold``: read from ``derived/`` when recorded, else computed
    (streaming the entropy of every shard once) and, if ``persist``, stored and recorded."""
    params = {"entropy_threshold": float(threshold)}
    found = find(cache, TOKEN_STATS, params)
    if found is not None:    # its file verified by find
        data = cache.cfs.read_bytes(found.files[0].path)
        return pq.read_table(io.BytesIO(data), page_checksum_verification=True).replace_schema_metadata(None)
    table = ts.compute_token_stats(cache, float(threshold))
    if _can_persist(cache, persist):
        store(cache, TOKEN_STATS, params, table, [c for c, _, _ in ts.TOKEN_STATS_COLUMNS])
    return table


def store(cache: Cache, name: str, params: dict, table: pa.Table, columns: list[str]) -> DerivedTable | None:
    """Write a one-file derived table under derived/ and record it in the manifest (None when the
    cache cannot be written: the caller keeps its in-memory table)."""
    fp = cache_fingerprint(cache.manifest)
    path = f"{layout.DERIVED_DIR}/{name}-{_key(name, params, fp)}.parquet"
    try:
        files = _write_files(cache, [(path, lambda: table)], {"name": name, "params": params, "cache_fingerprint": fp})
    except OSError as e:
        log.warning("%s: cannot store %s (%s); computed for this query only", cache.url, name, e)
        return None
    record = DerivedTable(name, params, columns, fp, files, f"logitcache {__version__}")
    _record(cache, record)
    return record


def tokens(cache: Cache, persist: bool = True) -> list[str] | pa.Table:
    """The ``tokens`` table: relative paths of its Parquet files (one per shard) when stored, else
    the rows in memory (when ``persist`` is off or the cache cannot be written)."""
    found = find(cache, TOKENS, {})
    if found is not None:
        return [f.path for f in found.files]
    if not _can_persist(cache, persist):
        parts = [ts.shard_tokens(cache, s) for s in cache.shards]
        return pa.concat_tables(parts) if parts else ts.TOKENS_SCHEMA.empty_table()
    fp = cache_fingerprint(cache.manifest)
    base = f"{layout.DERIVED_DIR}/{TOKENS}-{_key(TOKENS, {}, fp)}"
    meta = {"name": TOKENS, "params": {}, "cache_fingerprint": fp}
    try:
        files = _write_files(cache, [(f"{base}/{s.name}.parquet", lambda s=s: ts.shard_tokens(cache, s))
                                     for s in cache.shards], meta)
    except (OSError, PermissionError) as e:
        raise FormatError(f"{cache.url}: cannot store the tokens table under {base} ({e}); "
                          "use --no-persist to compute it in memory") from None
    _record(cache, DerivedTable(TOKENS, {}, [c for c, _, _ in ts.TOKENS_COLUMNS], fp, files, f"logitcache {__version__}"))
    return [f.path for f in files]


def samples_index(cache: Cache, persist: bool, read: Callable[[list[str]], pa.Table],
                  min_shards: int, columns: list[str] = SAMPLES_INDEX_COLUMNS) -> list[str] | None:
    """The samples table without its text columns, in a few large files: relative paths, or None
    when there is none and the cache is too small to need one (or cannot be written).

    A query engine pays a fixed cost per file it opens; a capture writes one samples file per shard
    (tens of thousands for millions of samples). ``read(shards)`` returns those shards' rows (the
    engine reads them with DuckDB); they are stored in order, about INDEX_PART_ROWS per file.
    """
    found = find(cache, SAMPLES_INDEX, {})
    if found is not None and found.columns == list(columns):
        return [f.path for f in found.files]
    if not cache.shards or len(cache.shards) < min_shards or not _can_persist(cache, persist):
        return None
    groups: list[list[str]] = [[]]
    rows = 0
    for s in cache.shards:
        if rows >= INDEX_PART_ROWS:
            groups.append([])
            rows = 0
        groups[-1].append(s.name)
        rows += s.samples
    fp = cache_fingerprint(cache.manifest)
    base = f"{layout.DERIVED_DIR}/{SAMPLES_INDEX}-{_key(SAMPLES_INDEX, {}, fp)}"
    meta = {"name": SAMPLES_INDEX, "params": {}, "cache_fingerprint": fp}
    try:
        files = _write_files(cache, [(f"{base}/part-{i:05d}.parquet", lambda g=g: read(g)) for i, g in enumerate(groups)],
                             meta)
    except OSError as e:
        log.warning("%s: cannot store the samples index (%s); reading the shards' files", cache.url, e)
        return None
    _record(cache, DerivedTable(SAMPLES_INDEX, {}, list(columns), fp, files, f"logitcache {__version__}"))
    return [f.path for f in files]
