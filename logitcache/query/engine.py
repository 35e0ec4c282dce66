"""SQL over a cache with DuckDB, reading the shards' Parquet files where they lie.

Why DuckDB: it is an embedded library (no server), scans Parquet directly with column projection
and predicate pushdown on all cores, streams larger-than-memory results, and takes fsspec
filesystems for object-store URLs. A 10-million-row samples table answers a filter + sort in about
a second end to end (benchmarks/results/query_samples.md); pyarrow alone has no SQL, and SQLite
would need the table copied in first.

Views (docs/query.md lists their columns):

- ``samples``: the stored samples table (every shard's ``samples.parquet``, manifest order) plus
  ``scored_tokens``, ``teacher_logprob_mean`` and ``perplexity`` computed on the fly. NaN statistics
  read as NULL, so aggregates and ``ORDER BY ... DESC`` behave. On a cache of many shards, a query
  that does not read the texts (``prompt``, ``response``, ``*``) reads the samples index instead:
  the same rows without the texts in a few large files (derived.py), built on first use.
- ``token_stats``: per-sample high-entropy token counts (query/token_stats.py), materialised once per
  threshold under ``derived/`` the first time a query names it.
- ``tokens``: one row per token, materialised once under ``derived/`` the first time a query names it.

A query is parsed and bound against empty stand-ins of the views first, so malformed SQL or an
unknown column fails before any file is read, anything is computed or anything is written.

What DuckDB reads is verified first: each shard's ``samples.parquet`` against its record's checksum
(``Cache.check_samples_files``), each derived file against its own (``derived.find``). Paths are given
to DuckDB with its glob characters escaped (a cache at ``runs/g[1]`` is never read as
``runs/g1``), and a query can read nothing but the cache: DuckDB's external access is switched off
once the connection is set up (only the cache's own directory stays allowed) and its
configuration locked, so ``read_csv('/etc/passwd')`` or ``glob('/root/**')`` inside a query fails.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from ..format import layout
from ..format.samples import SAMPLES_SCHEMA
from ..store.chain import is_chained
from ..store.fs import CacheFS
from ..store.reader import Cache
from . import derived
from . import token_stats as ts
from .errors import QueryError

log = logging.getLogger(__name__)

VIEWS = ("samples", "token_stats", "tokens")
# From this many shards on, the samples index pays for itself (one file per shard costs ~0.25 ms
# to open per query; benchmarks/results/query_samples.md).
INDEX_MIN_SHARDS = 256
_CHAINED_PROTOCOL = "dir"   # DirFileSystem's: how DuckDB reaches a cache through a chained URL
NAN_AS_NULL = ("mean_entropy", "max_entropy", "p90_entropy", "teacher_logprob_sum")
# (name, SQL over the stored columns, meaning): docs/query.md mirrors these.
COMPUTED_COLUMNS = [
    ("scored_tokens", "scored_end - scored_start", "rows whose next-token distribution is stored"),
    ("teacher_logprob_mean", "teacher_logprob_sum / nullif(scored_end - scored_start, 0)",
     "mean log-probability the teacher gives the scored tokens (null without scored rows)"),
    ("perplexity", "exp(-(teacher_logprob_sum / nullif(scored_end - scored_start, 0)))",
     "exp(-teacher_logprob_mean): the teacher's perplexity on the scored text"),
]


def _duckdb_filesystem(cfs: CacheFS):
    """The file system DuckDB reads a remote cache through: its own, or for a chained URL
    (``simplecache::s3://...``) the cache layer seen as a directory rooted at the cache. DuckDB hands
    every call the whole URL, and a cache layer passes the calls it does not answer itself (glob, size,
    modified) to the storage under it unchanged, where ``simplecache://`` is no protocol."""
    if not is_chained(cfs.url):
        return cfs.fs
    from fsspec.implementations.dirfs import DirFileSystem

    return DirFileSystem(path=cfs.root, fs=cfs.fs)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _literal_path(path: str) -> str:
    """A path DuckDB reads as itself: its glob characters inside brackets (``[`` -> ``[[]``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def _base_tables(node) -> set[str]:
    """Names of the tables a serialised DuckDB parse tree reads (CTE names included; harmless)."""
    found = set()
    if isinstance(node, dict):
        if node.get("type") == "BASE_TABLE" and isinstance(node.get("table_name"), str):
            found.add(node["table_name"].lower())
        for v in node.values():
            found |= _base_tables(v)
    elif isinstance(node, list):
        for v in node:
            found |= _base_tables(v)
    return found


def _needs_text(node) -> bool:
    """Whether a parse tree may read the samples' text columns (by name, or through a ``*``)."""
    if isinstance(node, dict):
        if node.get("class") == "COLUMN_REF" and str((node.get("column_names") or [""])[-1]).lower() in derived.TEXT_COLUMNS:
            return True
        if node.get("class") == "STAR":
            return True
        return any(_needs_text(v) for v in node.values())
    if isinstance(node, list):
        return any(_needs_text(v) for v in node)
    return False


@dataclass
class QueryResult:
    sql: str
    table: pa.Table
    views: set[str] = field(default_factory=set)       # the views the query read
    entropy_threshold: float | None = None             # when it read token_stats


class Engine:
    """One DuckDB connection with the cache's views. ``threshold``: nats above which a token counts as
    high-entropy in ``token_stats``; ``persist``: store derived tables in the cache (else in memory)."""

    def __init__(self, cache: Cache, threshold: float = ts.DEFAULT_THRESHOLD, persist: bool = True,
                 threads: int | None = None, index_min_shards: int = INDEX_MIN_SHARDS):
        self.cache = cache
        if not math.isfinite(float(threshold)):
            raise QueryError(f"--threshold must be a finite number of nats, got {threshold}")
        self.threshold = float(threshold)
        self.persist = persist
        self.index_min_shards = index_min_shards
        self.con = duckdb.connect(config={"threads": threads} if threads else {})
        if not cache.cfs.is_local:
            self.con.register_filesystem(_duckdb_filesystem(cache.cfs))
        # queries read the cache and nothing else: no other file, no setting changed back
        root = self.url("")
        root = root if root.endswith("/") else root + "/"
        self.con.execute(f"SET allowed_directories = [{_quote(root)}, {_quote(_literal_path(root))}]")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        # what the shards store (a newer minor version may add columns): the first file's schema
        self.stored_schema = (cache.shard_samples(cache.shards[0].name).schema
                              if cache.shards else SAMPLES_SCHEMA).remove_metadata()
        # queries are bound against empty stand-ins first: no file is opened for a query that fails
        self.con.register("_samples_placeholder", self.stored_schema.empty_table())
        self._create_samples_view("_samples_placeholder")
        self.samples_source = "placeholder"   # then "shards" or "index"
        self._materialised: set[str] = set()
        self._create_placeholder("token_stats", ts.TOKEN_STATS_SCHEMA)
        self._create_placeholder("tokens", ts.TOKENS_SCHEMA)

    # ---- views ------------------------------------------------------------------------------
    def url(self, rel: str) -> str:
        """What DuckDB opens for a path inside the cache (a local path, or a URL of the registered fs)."""
        cfs = self.cache.cfs
        if cfs.is_local:
            return cfs.path(rel)
        if is_chained(cfs.url):
            return f"{_CHAINED_PROTOCOL}://{rel}"     # relative to the cache's root (_duckdb_filesystem)
        protocol = cfs.fs.protocol if isinstance(cfs.fs.protocol, str) else cfs.fs.protocol[0]
        return f"{protocol}://{cfs.path(rel)}"

    def _parquet_source(self, rels: list[str], name: str, schema: pa.Schema) -> str:
        """A DuckDB source over files of the cache that the caller has verified."""
        if not rels:
            self.con.register(f"_{name}_empty", schema.empty_table())
            return f"_{name}_empty"
        files = ", ".join(_quote(_literal_path(self.url(r))) for r in rels)
        # columns are matched by name against the first file (all files share the schema of their
        # format version; reading every footer to union them costs a second pass over 10k files)
        return f"read_parquet([{files}])"

    @property
    def index_columns(self) -> list[str]:
        return [n for n in self.stored_schema.names if n not in derived.TEXT_COLUMNS]

    def _read_shards(self, shards: list[str]) -> pa.Table:
        """The samples rows of ``shards`` without their texts (what the samples index stores)."""
        schema = pa.schema([self.stored_schema.field(n) for n in self.index_columns])
        if not shards:
            return schema.empty_table()
        self.cache.check_samples_files(shards)
        src = self._parquet_source([layout.shard_samples(s) for s in shards], "samples", SAMPLES_SCHEMA)
        rel = self.con.sql(f"SELECT {', '.join(self.index_columns)} FROM {src}")
        return (rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()).cast(schema)

    def _use_samples_source(self, source: str) -> None:
        """Point the samples view at the shards' files, or at the samples index when there is one."""
        if source == self.samples_source:
            return
        if source == "index":
            paths = derived.samples_index(self.cache, self.persist, self._read_shards, self.index_min_shards,
                                          self.index_columns)
            if paths is None:
                return self._use_samples_source("shards")
            self._create_samples_view(self._parquet_source(paths, "samples_index", SAMPLES_SCHEMA))
        else:
            self._create_samples_view()
        self.samples_source = source

    def _create_samples_view(self, src: str | None = None) -> None:
        if src is None:
            self.cache.check_samples_files([s.name for s in self.cache.shards])
            src = self._parquet_source([layout.shard_samples(s.name) for s in self.cache.shards], "samples",
                                       SAMPLES_SCHEMA)
        replace = ", ".join(f"nullif({c}, 'NaN') AS {c}" for c in NAN_AS_NULL)
        computed = ", ".join(f"{sql} AS {name}" for name, sql, _ in COMPUTED_COLUMNS)
        self.con.execute(f"CREATE OR REPLACE VIEW samples AS SELECT *, {computed} "
                         f"FROM (SELECT * REPLACE ({replace}) FROM {src})")

    def _create_placeholder(self, name: str, schema: pa.Schema) -> None:
        self.con.register(f"_{name}_placeholder", schema.empty_table())
        self.con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _{name}_placeholder")

    def _materialise(self, name: str) -> None:
        if name in self._materialised:   # once per engine: a shortcut runs two queries
            return
        if name == "token_stats":
            self.con.register("_token_stats", derived.token_stats(self.cache, self.threshold, self.persist))
            self.con.execute("CREATE OR REPLACE VIEW token_stats AS SELECT * FROM _token_stats")
        elif name == "tokens":
            got = derived.tokens(self.cache, self.persist)
            if isinstance(got, pa.Table):
                self.con.register("_tokens", got)
                src = "_tokens"
            else:
                src = self._parquet_source(got, "tokens", ts.TOKENS_SCHEMA)
            self.con.execute(f"CREATE OR REPLACE VIEW tokens AS SELECT * FROM {src}")
        self._materialised.add(name)

    # ---- queries ----------------------------------------------------------------------------
    def referenced_views(self, sql: str) -> set[str]:
        """Parse ``sql`` (one SELECT statement) and return the views it reads; QueryError otherwise."""
        return _base_tables(self.parse(sql)) & set(VIEWS)

    def parse(self, sql: str) -> dict:
        """DuckDB's parse tree of ``sql`` (one SELECT statement); QueryError naming the problem otherwise."""
        text = self.con.execute("SELECT json_serialize_sql($1)", [sql]).fetchall()[0][0]
        tree = json.loads(text)
        if tree.get("error"):
            kind, msg = tree.get("error_type", ""), tree.get("error_message", "")
            if kind == "parser":
                raise QueryError(f"malformed SQL: {msg} (in: {sql!r})")
            if "Only SELECT" in msg:
                raise QueryError(f"only a SELECT query can be run (in: {sql!r})")
            raise QueryError(f"cannot run this SQL: {msg} (in: {sql!r})")
        if len(tree.get("statements", [])) != 1:
            raise QueryError(f"expected one SELECT statement, got {len(tree.get('statements', []))} (in: {sql!r})")
        return tree

    def _bind(self, sql: str) -> None:
        try:
            self.con.sql(sql)  # binds without running
        except duckdb.CatalogException as e:
            raise QueryError(f"{_first_line(e)}; the views are {', '.join(VIEWS)} (in: {sql!r})") from None
        except duckdb.BinderException as e:
            raise QueryError(f"unknown column or wrong use of one: {_first_line(e)} (in: {sql!r}); "
                             f"`logitcache query --help` lists the columns") from None
        except duckdb.PermissionException as e:
            raise QueryError(f"a query reads only the cache's views ({', '.join(VIEWS)}); reading other files is "
                             f"disabled: {_first_line(e)} (in: {sql!r})") from None
        except duckdb.Error as e:
            raise QueryError(f"{_first_line(e)} (in: {sql!r})") from None

    def run(self, sql: str, extra: dict[str, pa.Table] | None = None) -> QueryResult:
        """Run one SELECT over the views (plus ``extra`` tables by name) and return its rows as Arrow."""
        sql = sql.strip().rstrip(";").strip()
        if not sql:
            raise QueryError("the query is empty")
        for name, table in (extra or {}).items():
            self.con.register(name, table)
        tree = self.parse(sql)
        views = _base_tables(tree) & set(VIEWS)
        if self.samples_source != "placeholder":
            self._create_samples_view("_samples_placeholder")
            self.samples_source = "placeholder"
        self._bind(sql)
        for name in sorted(views - {"samples"}):
            self._materialise(name)
        if "samples" in views:
            self._use_samples_source("shards" if _needs_text(tree) else "index")
        try:
            rel = self.con.sql(sql)
            table = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        except duckdb.PermissionException as e:
            raise QueryError(f"a query reads only the cache's views ({', '.join(VIEWS)}); reading other files is "
                             f"disabled: {_first_line(e)} (in: {sql!r})") from None
        except duckdb.Error as e:
            raise QueryError(f"the query failed: {_first_line(e)} (in: {sql!r})") from None
        return QueryResult(sql, table, views, self.threshold if "token_stats" in views else None)


def _first_line(e: Exception) -> str:
    """DuckDB's message on one line, without the excerpt of the query it points into."""
    lines = []
    for line in str(e).strip().splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)


def run_query(cache: Cache, sql: str, threshold: float = ts.DEFAULT_THRESHOLD, persist: bool = True) -> QueryResult:
    """``logitcache query``: run ``sql`` over ``cache``'s views."""
    return Engine(cache, threshold, persist).run(sql)
