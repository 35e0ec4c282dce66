"""Selection files: which samples of which cache, and how they were chosen.

A selection file is a Parquet file with a ``sample_id`` column (unique strings; other columns, such
as the value selected on, may follow) and, in the schema metadata under ``logitcache.selection``, a
JSON object (docs/query.md, "Selection files"): the source cache's URL and fingerprint, the query,
the count. The fingerprint is what makes a selection safe to hand around: using it with any other
cache (another teacher, other settings, shards added or rewritten) is refused.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import asdict, dataclass, fields

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..format.fingerprint import cache_fingerprint
from ..format.version import FORMAT_VERSION, check_readable, parse_version
from ..store.fs import CacheFS
from ..store.reader import Cache
from .errors import SelectionError

METADATA_KEY = b"logitcache.selection"
SELECTION_FORMAT = "logitcache-selection"


@dataclass
class SelectionInfo:
    cache: str                # URL of the cache the selection was made from
    cache_fingerprint: str    # its fingerprint then (logitcache.format.cache_fingerprint)
    query: str                # the SQL that produced it
    count: int                # rows (= sample ids) in the file
    shortcut: str = ""        # the `logitcache select` flags, when made that way
    entropy_threshold: float | None = None  # when the query read token_stats
    created_by: str = ""
    format: str = SELECTION_FORMAT
    format_version: str = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "SelectionInfo":
        if not isinstance(d, dict) or d.get("format") != SELECTION_FORMAT:
            raise SelectionError(f"{where}: the '{METADATA_KEY.decode()}' metadata is not a selection record")
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("cache", "cache_fingerprint", "query", "count") if n not in d]
        if missing:
            raise SelectionError(f"{where}: the selection record lacks {', '.join(missing)}")
        check_readable(str(d.get("format_version", "")), where)
        return cls(**{k: v for k, v in d.items() if k in names})


def selection_ids(table: pa.Table, where: str) -> pa.Array:
    """The ``sample_id`` column of a selection-to-be, checked: present, strings, no nulls, unique."""
    if "sample_id" not in table.column_names:
        raise SelectionError(f"{where}: no sample_id column (columns: {', '.join(table.column_names) or 'none'}); "
                             "a selection needs one: select sample_id")
    ids = table.column("sample_id").combine_chunks()
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise SelectionError(f"{where}: column sample_id is {ids.type}, not a string")
    if ids.null_count:
        raise SelectionError(f"{where}: column sample_id has {ids.null_count} null(s)")
    if len(ids.unique()) != len(ids):
        counts = ids.value_counts()
        dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
        raise SelectionError(f"{where}: sample_id {dup[0]!r} appears more than once ({len(dup)} duplicated id(s)); "
                             "use SELECT DISTINCT sample_id")
    return ids


def write_atomic(path: str, data: bytes) -> None:
    """Write a file in one step (temporary file + rename on disks, one PUT on object stores)."""
    if "://" in str(path):
        parent, name = posixpath.split(str(path).rstrip("/"))
    else:
        parent, name = os.path.split(os.path.abspath(path))
    CacheFS(parent).write_atomic(name, data)


def write_selection(table: pa.Table, path: str, cache: Cache, query: str, shortcut: str = "",
                    entropy_threshold: float | None = None) -> SelectionInfo:
    """Write ``table`` (with a unique ``sample_id`` column) as a selection of ``cache`` to ``path``.
    Nothing is written when the table is not a valid selection, or is empty (a selection of nothing
    would only fail later, in training or export)."""
    selection_ids(table, "the query's result")
    if table.num_rows == 0:
        raise SelectionError(f"the selection is empty: {shortcut or query!r} matched no sample of {cache.url}; "
                             f"nothing written to {path}")
    info = SelectionInfo(cache=cache.url, cache_fingerprint=cache_fingerprint(cache.manifest), query=query,
                         count=table.num_rows, shortcut=shortcut, entropy_threshold=entropy_threshold,
                         created_by=f"logitcache {__version__}")
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(asdict(info)).encode()
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
    write_atomic(path, buf.getvalue())
    return info


def load_selection(path: str) -> tuple[pa.Table, SelectionInfo]:
    """Read a selection file and its record, without a cache to check it against."""
    try:
        with fsspec.open(str(path), "rb") as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise SelectionError(f"{path}: no such selection file") from None
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise SelectionError(f"{path}: not a Parquet file ({e})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise SelectionError(f"{path}: not a logitcache selection file (no '{METADATA_KEY.decode()}' metadata); "
                             "write selections with `logitcache select` or `logitcache query --out`")
    try:
        info = SelectionInfo.from_dict(json.loads(raw), str(path))
    except json.JSONDecodeError as e:
        raise SelectionError(f"{path}: the selection record is not valid JSON ({e})") from None
    selection_ids(table, str(path))
    if info.count != table.num_rows:
        raise SelectionError(f"{path}: the record says {info.count} samples but the file has {table.num_rows} rows")
    return table, info


def check_selection(table: pa.Table, info: SelectionInfo, cache: Cache, path: str) -> None:
    """Refuse a selection made from another cache: another fingerprint, or ids the cache lacks. A
    selection written by a release of format 1.2 or earlier recorded fingerprint recipe 1."""
    fp = cache_fingerprint(cache.manifest, recipe=1 if parse_version(info.format_version) < (1, 3) else 2)
    if info.cache_fingerprint != fp:
        raise SelectionError(
            f"{path} was made from another cache ({info.cache}, fingerprint {info.cache_fingerprint}); "
            f"{cache.url} has fingerprint {fp} (another teacher, other settings, or other shards); "
            "make the selection again on this cache")
    from .engine import Engine

    missing = Engine(cache, persist=False).run(
        "SELECT sample_id FROM _selection ANTI JOIN samples USING (sample_id)",
        extra={"_selection": table.select(["sample_id"])}).table.column("sample_id").to_pylist()
    if missing:
        raise SelectionError(f"{path}: {len(missing)} sample id(s) are not in {cache.url} "
                             f"(first: {', '.join(missing[:3])})")


def read_selection(path: str, cache: Cache) -> list[str]:
    """The sample ids of selection file ``path``, in file order, after checking that it was made from
    ``cache`` (same fingerprint) and that every id is in it. Raises SelectionError naming the file."""
    table, info = load_selection(path)
    check_selection(table, info, cache, str(path))
    return table.column("sample_id").to_pylist()
