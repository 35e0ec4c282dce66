"""One foreign layout, one object: the base class of every other tool's cache format we read or write,
the registry that finds it by name (``logitcache export --to NAME``, ``logitcache import --from NAME``),
and what every export shares.

A format declares in its module (``interop/<name>.py``): ``name``, ``follows`` (which release or commit
of the other tool its layout was read from), its options (``Option``: keyword, flag, type, help; the
CLI's flags are made from them), ``export`` (a cache -> the tool's files) and, where it makes sense,
``import_`` (the tool's files -> a new cache).

What an export shares, here: the samples to write (a selection's, else all, in cache order), the
teacher's rows decoded window by window (``Window``: a few samples' tokens, their rows' ids and
log-probs padded to one width, whether each row was scored), and the new directory it writes into,
with a record beside the tool's files (``.logitcache/export.json`` and ``.logitcache/samples.parquet``:
where each sample went and its row of our samples table). Files and directories whose names start with
a dot are invisible to ``datasets.load_dataset(DIR)``, which both tools use to read a directory.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import numpy as np
import pyarrow as pa

from ..format.errors import LogitcacheError

RECORD_DIR = ".logitcache"
RECORD = f"{RECORD_DIR}/export.json"
RECORD_SAMPLES = f"{RECORD_DIR}/samples.parquet"
WINDOW_TOKENS = 1 << 15          # tokens decoded at once (bounded memory; whole samples, so it may exceed this)


@dataclass(frozen=True)
class Option:
    """One option of a format's export or import: the keyword it takes, the CLI flag that sets it."""

    name: str
    flag: str
    type: type
    help: str
    metavar: str | None = None


MAX_DEFAULT_TOP_K = 128         # the exports' default k: the cache's row width, at most this
TOP_K_OPTION = Option("top_k", "--top-k", int,
                      f"Values per position (k). Default: the cache's top-k, at most {MAX_DEFAULT_TOP_K}.", "K")


def default_top_k(width: int) -> int:
    """The k an export writes when --top-k is not given, for rows of ``width`` entries."""
    return min(width, MAX_DEFAULT_TOP_K)


@dataclass
class ExportReport:
    """What an export wrote and what it checked (``checks``: the format's own numbers, e.g. decode errors)."""

    out: str
    to: str
    source: str
    source_fingerprint: str
    selection: str
    samples: int
    tokens: int
    rows: int                       # token positions whose teacher distribution was written (scored rows)
    files: list[dict]               # per file: path (relative to out), samples, bytes
    bytes: int                      # of the tool's files (not our record)
    options: dict
    checks: dict = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    def to_dict(self) -> dict:
        return {**self.__dict__, "bytes_per_token": self.bytes_per_token}


@dataclass
class ImportReport:
    cache: str
    source: str
    files: list[str]
    samples: int
    shards: int
    tokens: int
    bytes: int
    fingerprint: str
    checks: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ForeignFormat:
    """The base of every foreign format. Subclasses set the class attributes and implement ``export``
    (and ``import_`` with ``import_options`` when they read the tool's files)."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    follows: ClassVar[str] = ""                         # the release / commit of the tool the layout is from
    export_options: ClassVar[tuple[Option, ...]] = ()
    import_options: ClassVar[tuple[Option, ...]] = ()

    @classmethod
    def can_import(cls) -> bool:
        return cls.import_ is not ForeignFormat.import_

    def export(self, cache, out: str, *, sample_ids: pa.Array | None = None, selection: str = "",
               storage_options: dict | None = None, **options) -> ExportReport:
        """Write the samples of ``cache`` (``sample_ids``: only those, in cache order) as the tool's files
        in the new directory ``out``."""
        raise NotImplementedError

    def import_(self, src: str, out: str, *, tokenizer: str, storage_options: dict | None = None,
                **options) -> ImportReport:
        """Read the tool's files at ``src`` (a file, a directory or a glob; any fsspec URL) into a new cache
        at ``out``."""
        raise LogitcacheError(f"--from {self.name}: importing is not supported; it is an export target only "
                              f"(--from takes {', '.join(n for n, c in REGISTRY.items() if c.can_import())})")

    # ---- options -----------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, given: dict[str, Any], importing: bool) -> dict[str, Any]:
        """The options given (None: not given) that this format takes; one it does not take is an error
        naming its flag and the formats that take it."""
        mine = {o.name for o in (cls.import_options if importing else cls.export_options)}
        direction = "--from" if importing else "--to"
        for key, value in given.items():
            if value is None or key in mine:
                continue
            takes = [n for n, c in REGISTRY.items()
                     if any(o.name == key for o in (c.import_options if importing else c.export_options))]
            flag = option_flags(importing).get(key, key)
            raise LogitcacheError(f"{flag} applies to {direction} {'/'.join(takes) or '?'}, not {cls.name}")
        return {k: v for k, v in given.items() if v is not None}


# ---- the registry ------------------------------------------------------------------------------------
REGISTRY: dict[str, type[ForeignFormat]] = {}


def register(cls: type[ForeignFormat]) -> type[ForeignFormat]:
    """Class decorator: make ``cls`` findable by its ``name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise LogitcacheError(f"foreign format {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def names(importing: bool = False) -> list[str]:
    return [n for n, c in REGISTRY.items() if not importing or c.can_import()]


def format_class(name: str, importing: bool = False) -> type[ForeignFormat]:
    cls = REGISTRY.get(name)
    if cls is None or (importing and not cls.can_import()):
        raise LogitcacheError(f"{'--from' if importing else '--to'}: {name!r} is not one of "
                              f"{', '.join(names(importing))}")
    return cls


def all_options(importing: bool) -> list[Option]:
    """Every option of every format (one per keyword), for the CLI's flags."""
    out: dict[str, Option] = {}
    for cls in REGISTRY.values():
        for o in (cls.import_options if importing else cls.export_options):
            out.setdefault(o.name, o)
    return list(out.values())


def option_flags(importing: bool) -> dict[str, str]:
    return {o.name: o.flag for o in all_options(importing)}


# ---- what every export reads ------------------------------------------------------------------------
@dataclass
class Window:
    """Consecutive selected samples of one shard, decoded. ``n`` token rows in sample order; ``W`` columns
    per row: the row's entries in rank order (descending log-prob), then padding.

        lengths  (S,)   tokens per sample          tokens   (n,)   token ids
        scored   (n,)   the row's distribution was captured (docs/format.md, "Rows and alignment")
        ids      (n, W) int64, -1 after a row's entries (and on every row not scored)
        logprobs (n, W) float32, -inf after a row's entries
        tail     (n,)   float64, the mass outside the row's entries (stored exactly, or 1 - sum p)
    """

    samples: pa.Table
    lengths: np.ndarray
    tokens: np.ndarray
    scored: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return (self.ids >= 0).sum(axis=1)

    @property
    def starts(self) -> np.ndarray:
        """(S,) each sample's first row in the window."""
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    @property
    def position(self) -> np.ndarray:
        """(n,) each row's position in its sample."""
        return np.arange(len(self.tokens)) - np.repeat(self.starts, self.lengths)

    @property
    def last(self) -> np.ndarray:
        """(n,) the row is its sample's last token (no next token: never a row of a distribution)."""
        return self.position == np.repeat(self.lengths, self.lengths) - 1


def check_exportable(cache, what: str) -> int:
    """The width of the cache's decoded rows; a cache whose rows are estimates is refused."""
    enc = cache.encoding
    if enc.estimated:
        raise LogitcacheError(f"{cache.url}: its encoding {enc.name} stores unbiased estimates of the teacher's "
                              f"probabilities (draws), not its most probable ids with their log-probs: it cannot be "
                              f"written as {what}; export a cache of encoding topk, adaptive, compact or full")
    return enc.width(cache.manifest.capture.top_k)


def selected(cache, sample_ids: pa.Array | None) -> Iterator[tuple[str, pa.Table]]:
    """(shard, its selected samples) in cache order; ``sample_ids`` None: every sample."""
    import pyarrow.compute as pc

    for s in cache.shards:
        table = cache.shard_samples(s.name)
        if sample_ids is not None:
            table = table.filter(pc.is_in(table.column("sample_id"), value_set=sample_ids))
        if table.num_rows:
            yield s.name, table


def windows(cache, shard: str, samples: pa.Table, width: int, max_tokens: int = WINDOW_TOKENS) -> Iterator[Window]:
    """The shard's selected samples, a window of whole samples (about ``max_tokens`` rows) at a time."""
    offsets = samples.column("token_offset").to_numpy().astype(np.int64)
    lengths = samples.column("num_tokens").to_numpy().astype(np.int64)
    lo = samples.column("scored_start").to_numpy().astype(np.int64)
    hi = samples.column("scored_end").to_numpy().astype(np.int64)
    start = 0
    while start < samples.num_rows:
        stop = start + max(1, int(np.searchsorted(np.cumsum(lengths[start:]), max_tokens, side="right")))
        runs: list[list[int]] = []                   # consecutive samples read as one range
        for a, n in zip(offsets[start:stop].tolist(), lengths[start:stop].tolist()):
            if runs and runs[-1][1] == a:
                runs[-1][1] = a + n
            else:
                runs.append([a, a + n])
        tokens, ids, lps, tails = [], [], [], []
        for a, b in runs:
            tokens.append(cache.read_rows(shard, a, b, ["tokens"])["tokens"].astype(np.int64))
            rows = cache.teacher_rows(shard, a, b)
            i, lp = rows.padded(width)
            ids.append(i)
            lps.append(lp)
            tails.append(rows.tail_mass())
        lens = lengths[start:stop]
        pos = np.arange(int(lens.sum())) - np.repeat(np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        scored = (pos >= np.repeat(lo[start:stop], lens)) & (pos < np.repeat(hi[start:stop], lens))
        ids_, lp_ = np.concatenate(ids), np.concatenate(lps)
        valid = (ids_ >= 0) & np.isfinite(lp_) & scored[:, None]
        order = np.argsort(~valid, axis=1, kind="stable")          # entries that are not values go last
        valid = np.take_along_axis(valid, order, axis=1)
        ids_ = np.where(valid, np.take_along_axis(ids_, order, axis=1), -1)
        lp_ = np.where(valid, np.take_along_axis(lp_, order, axis=1), -np.inf).astype(np.float32)
        yield Window(samples.slice(start, stop - start), lens, np.concatenate(tokens), scored, ids_, lp_,
                     np.concatenate(tails))
        start = stop


def list_array(values: np.ndarray, counts: np.ndarray) -> pa.Array:
    """Rows of ``values`` (flat (R,), or (R, w): each row a list of w) grouped into lists of ``counts`` rows."""
    if values.size >= 1 << 31:
        raise LogitcacheError(f"{values.size} values in one file: more than a Parquet list column holds")
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    if values.ndim == 2:
        inner = pa.ListArray.from_arrays(pa.array(np.arange(values.shape[0] + 1, dtype=np.int32) * values.shape[1]),
                                         pa.array(values.reshape(-1)))
        return pa.ListArray.from_arrays(offsets, inner)
    return pa.ListArray.from_arrays(offsets, pa.array(values))


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_record(dst, report: ExportReport, samples: list[pa.Table], cache) -> None:
    """Our record beside the tool's files, written last: ``.logitcache/samples.parquet`` (each exported
    sample's row of our samples table plus ``file`` and ``file_row``: where it went) and
    ``.logitcache/export.json`` (the report, the source cache and its fingerprint)."""
    from .. import __version__

    table = pa.concat_tables(samples) if samples else pa.table({})
    dst.write_atomic(RECORD_SAMPLES, parquet_bytes(table))
    record = {"format": "logitcache-export", "created_by": f"logitcache {__version__}", **report.to_dict(),
              "teacher": cache.manifest.teacher.name, "tokenizer_vocab_sha256": cache.manifest.tokenizer.vocab_sha256}
    dst.write_atomic(RECORD, (json.dumps(record, indent=1, allow_nan=False) + "\n").encode())
