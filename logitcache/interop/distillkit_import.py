"""DistillKit's capture parquet -> a new logitcache cache (``DistillKitFormat.import_``; the layout and what
is kept are described in ``distillkit``).

Files are read a few samples at a time and decoded with numpy (``distillkit_codec``); every sample is
checked before anything of its shard is written, and a problem names the file, its row (and the
position where there is one): rows of another byte length than the compression config gives, a file
whose rows are as many as its tokens (packed by ``distillkit-pack-logits``: import the capture's output),
ids outside the vocabulary or twice in a row, values that are not finite, tokens outside the
tokenizer's vocabulary. Shards are written by the capture's shard writer (temporary directory,
checksums, publish) and the manifest last, so an interrupted import leaves nothing that looks like a
cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..format.errors import InputError, LogitcacheError
from .base import RECORD_SAMPLES, ImportReport
from .distillkit_codec import (CONFIG_FILE, FOLLOWS, IGNORE, CompressionConfig, decompress_logprobs, load_config,
                               unpack_bits)

COLUMNS = ("input_ids", "compressed_logprobs", "bytepacked_indices")
READ_ROWS = 64                                       # samples read from a file at once


log = logging.getLogger(__name__)


def _lists(col: pa.ChunkedArray, where, first_row: int, what: str) -> tuple[pa.Array, np.ndarray]:
    """A list column's values and per-row lengths; a null row is refused."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        bad = int(np.nonzero(arr.is_null().to_numpy(zero_copy_only=False))[0][0])
        raise InputError(f"{where(first_row + bad)}: {what} is null")
    return arr.flatten(), pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)


def _byte_rows(col: pa.ChunkedArray, width: int, where, first_row: int, what: str, explain: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """A list<list<uint8>> column as (rows, width) uint8 and rows per sample; other widths are refused."""
    inner, per_sample = _lists(col, where, first_row, what)
    if inner.null_count:
        raise InputError(f"{where(first_row + int(np.searchsorted(np.cumsum(per_sample), int(np.nonzero(inner.is_null().to_numpy(zero_copy_only=False))[0][0]), side='right')))}: "
                         f"{what} holds a null row")
    values, lengths = inner.flatten(), pc.list_value_length(inner).to_numpy(zero_copy_only=False)
    off = np.nonzero(lengths != width)[0]
    if len(off):
        sample = int(np.searchsorted(np.cumsum(per_sample), off[0], side="right"))
        pos = int(off[0] - np.concatenate([[0], np.cumsum(per_sample)])[sample])
        raise InputError(f"{where(first_row + sample)}, position {pos}: {what} has {int(lengths[off[0]])} bytes, "
                         f"{explain} says {width}")
    return values.to_numpy(zero_copy_only=False).astype(np.uint8).reshape(-1, width), per_sample


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def resolve_sources(src: str, storage_options: dict | None) -> tuple[object, list[str], str]:
    """(file system, the parquet files in name order (data_2 before data_10), their directory) of ``src``:
    a file, a directory (its ``*.parquet``) or a glob."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
    except (ImportError, TypeError, ValueError) as e:
        raise InputError(f"{src}: cannot open ({e})") from None
    if set("*?[") & set(path):
        files = [p for p in fs.glob(path) if fs.isfile(p)]
        base = posixpath.dirname(files[0]) if files else posixpath.dirname(path)
    elif fs.isdir(path):
        files, base = [p for p in fs.glob(posixpath.join(path, "*.parquet"))], path
    elif fs.isfile(path):
        files, base = [path], posixpath.dirname(path)
    else:
        raise InputError(f"{src}: no such file or directory")
    if not files:
        raise InputError(f"{src}: no parquet files (DistillKit's capture writes data_<i>.parquet)")
    return fs, sorted(files, key=lambda p: _natural(posixpath.basename(p))), base


def source_fingerprint(cfg: CompressionConfig, fs, files: list[str]) -> str:
    """``imported:sha256:<hex>`` over the compression config and each file's name and size: what a teacher
    fingerprint can say of logits whose model is not at hand."""
    ident = [cfg.to_dict(), [[posixpath.basename(p), int(fs.size(p))] for p in files]]
    return "imported:sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def record_of(fs, base: str) -> dict | None:
    """Our export's record beside DistillKit files (``.logitcache/samples.parquet``): {(file, row): sample}."""
    import pyarrow.parquet as pq

    path = posixpath.join(base, RECORD_SAMPLES)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    return {(r.pop("file"), r.pop("file_row")): r for r in rows}


def spec_notes(specs: dict) -> dict:
    """The array specs of an imported cache, saying what is approximate and what is unknown."""
    from ..format.arrays import ENTROPY, TARGET_LOGPROB, TOPK_LOGPROBS

    specs = dict(specs)
    specs[TOPK_LOGPROBS] = replace(specs[TOPK_LOGPROBS], exact=False, meaning=(
        "log-softmax (T=1, full vocabulary) of those ids, as DistillKit's compressed_logprobs decode "
        "(approximate; sorted descending)"))
    specs[ENTROPY] = replace(specs[ENTROPY], exact=False, meaning=(
        "unknown: NaN on every row (imported from a top-k, which does not give the full-vocabulary entropy)"))
    specs[TARGET_LOGPROB] = replace(specs[TARGET_LOGPROB], exact=False, meaning=(
        "log-probability of tokens[j+1] as decoded where it is among the row's ids, else NaN (imported)"))
    return specs


@dataclass
class _Shard:
    """Samples waiting to be written as one shard."""

    tokens: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    values: list = field(default_factory=list)
    scored: list = field(default_factory=list)
    samples: list = field(default_factory=list)


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """A Hugging Face tokenizer (a directory or hub id), loaded once per process (imports of many files)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:                       # a missing directory, not a tokenizer, offline hub
        raise InputError(f"--tokenizer {name}: cannot load a tokenizer ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'})") from None


def run_import(fmt, src: str, out: str, *, tokenizer: str, storage_options: dict | None, compression_config: str | None,
               samples_per_shard: int, teacher_name: str | None) -> ImportReport:
    from .. import __version__
    from ..format import layout
    from ..format.arrays import array_specs
    from ..format.fingerprint import cache_fingerprint, generation_eos_ids, tokenizer_info
    from ..format.manifest import CaptureConfig, InputSpec, Manifest, Provenance, TeacherInfo
    from ..format.encodings.topk import TopK
    from ..store import codecs
    from ..store.target import new_output

    if samples_per_shard < 1:
        raise LogitcacheError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    fs, files, base = resolve_sources(src, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    config_url = compression_config or (posixpath.join(base, CONFIG_FILE) if protocol == "file"
                                        else f"{protocol}://{posixpath.join(base, CONFIG_FILE)}")
    cfg = load_config(config_url, storage_options)
    tok = load_tokenizer(tokenizer)
    tok_vocab = len(tok)
    vocab = max(cfg.d, tok_vocab)
    specs = spec_notes(array_specs(vocab, cfg.k, "float32", [], 0, "bfloat16", {"name": TopK.name}))
    record = record_of(fs, base)
    source_name = posixpath.basename(src.rstrip("/")) or src
    key = "i" + hashlib.blake2b(json.dumps(["distillkit", source_name, [posixpath.basename(f) for f in files]])
                                .encode(), digest_size=4).hexdigest()
    shards, pending, n_samples, max_len, clipped = [], _Shard(), 0, 0, 0
    labels_seen = False

    with new_output(out, storage_options, "this import's destination") as (dst, lock):
        def flush():
            nonlocal pending
            if not pending.samples:
                return
            shards.append(_write(dst, key, len(shards), pending, specs, codecs))
            lock.heartbeat()
            pending = _Shard()

        for path in files:
            name = posixpath.basename(path)
            with fs.open(path, "rb") as f:
                import pyarrow.parquet as pq

                try:
                    pf = pq.ParquetFile(f)
                except (pa.ArrowException, OSError) as e:
                    raise InputError(f"{name}: not a parquet file ({e})") from None
                cols = pf.schema_arrow.names
                missing = [c for c in COLUMNS if c not in cols]
                if missing:
                    legacy = " (DistillKit's legacy layout packed_indices/exact_values/coeffs is not read)" \
                        if "packed_indices" in cols else ""
                    raise InputError(f"{name}: no column {', '.join(missing)}; DistillKit's capture writes "
                                     f"{', '.join(COLUMNS)}{legacy}")
                has_labels = "labels" in cols
                labels_seen |= has_labels
                row0 = 0
                for batch in pf.iter_batches(batch_size=READ_ROWS, columns=list(COLUMNS) + (["labels"] if has_labels else [])):
                    samples = _decode_batch(batch, cfg, name, row0, tok_vocab, has_labels, record, tok)
                    for s in samples:
                        clipped += s.pop("clipped")
                        max_len = max(max_len, len(s["tokens"]))
                        pending.tokens.append(s.pop("tokens"))
                        pending.ids.append(s.pop("ids"))
                        pending.values.append(s.pop("values"))
                        pending.scored.append(s.pop("scored"))
                        pending.samples.append(s)
                        n_samples += 1
                        if len(pending.samples) >= samples_per_shard:
                            flush()
                    row0 += batch.num_rows
        flush()
        if not shards:
            raise InputError(f"{src}: the parquet files hold no rows")
        teacher = TeacherInfo(name=teacher_name or "unknown (imported from DistillKit)", source=src, revision="",
                              fingerprint=source_fingerprint(cfg, fs, files), architecture="", num_layers=0,
                              hidden_size=0, vocab_size=vocab, max_length=max_len, dtype="", backend=fmt.name)
        extra_eos = generation_eos_ids(tokenizer) if os.path.isdir(tokenizer) else []
        manifest = Manifest(
            teacher=teacher, tokenizer=tokenizer_info(tok, extra_eos),
            capture=CaptureConfig(mode="score", top_k=cfg.k, logprob_dtype="float32", with_prompt=False,
                                  hidden_layers=[], hidden_dtype="bfloat16", max_length=max_len, truncate=False,
                                  samples_per_shard=samples_per_shard, encoding={"name": TopK.name}),
            arrays=specs, codecs=codecs.describe(specs),
            inputs=[InputSpec(key, src, source_name, "", {c: c for c in COLUMNS}, None, n_samples, len(shards))],
            shards=[w.record(key, i, worker=0) for i, w in enumerate(shards)], complete=True,
            created_by=f"logitcache {__version__} (import)",
            provenance=Provenance(source_cache=src, source_fingerprint="", selection_query="", selection_count=n_samples,
                                  imported_from={"format": fmt.name, "follows": FOLLOWS,
                                                 "files": [posixpath.basename(f) for f in files],
                                                 "compression_config": cfg.to_dict(), "labels": labels_seen,
                                                 "logitcache_record": record is not None,
                                                 "values": "approximate (decoded); entropy unknown (NaN)"}))
        dst.write_atomic(layout.MANIFEST, manifest.to_json().encode())
    return ImportReport(cache=dst.url, source=src, files=[posixpath.basename(f) for f in files], samples=n_samples,
                        shards=len(shards), tokens=manifest.num_tokens, bytes=sum(w.bytes for w in shards),
                        fingerprint=cache_fingerprint(manifest),
                        checks={"values_clipped_to_0": clipped, "labels": labels_seen,
                                "logitcache_record": record is not None})


def _decode_batch(batch: pa.RecordBatch, cfg: CompressionConfig, file: str, row0: int, tok_vocab: int,
                  has_labels: bool, record: dict | None, tok) -> list[dict]:
    """One batch of a file's samples, decoded and checked: per sample its tokens, (T, k) ids and values
    (rows in our layout: T rows, the last not scored), the scored mask and its samples-table fields."""
    def where(row: int) -> str:
        return f"{file} row {row}"

    tokens_flat, lengths = _lists(batch.column("input_ids"), where, row0, "input_ids")
    tokens_flat = tokens_flat.to_numpy(zero_copy_only=False).astype(np.int64)
    explain = f"the compression config (k {cfg.k}, d {cfg.d})"
    lp_bytes, rows = _byte_rows(batch.column("compressed_logprobs"), cfg.logprob_bytes, where, row0,
                                "compressed_logprobs", explain)
    id_bytes, id_rows = _byte_rows(batch.column("bytepacked_indices"), cfg.index_bytes, where, row0,
                                   "bytepacked_indices", explain)
    for i in np.nonzero((rows != lengths - 1) | (id_rows != rows))[0][:1]:
        hint = (" (as many rows as tokens: packed by distillkit-pack-logits? import the capture's output)"
                if rows[i] == lengths[i] else "")
        raise InputError(f"{where(row0 + int(i))}: {int(lengths[i])} input_ids, {int(rows[i])} rows of "
                         f"compressed_logprobs and {int(id_rows[i])} of bytepacked_indices; DistillKit's capture "
                         f"writes one row per token but the last{hint}")
    bad_tok = np.nonzero(tokens_flat >= tok_vocab)[0]
    if len(bad_tok):
        s = int(np.searchsorted(np.cumsum(lengths), bad_tok[0], side="right"))
        raise InputError(f"{where(row0 + s)}: input_ids holds {int(tokens_flat[bad_tok[0]])}, outside the "
                         f"tokenizer's {tok_vocab} ids (--tokenizer: the teacher's tokenizer?)")
    ids = unpack_bits(id_bytes, cfg.index_bits, cfg.k).astype(np.int64)              # (R, k)
    values = decompress_logprobs(lp_bytes, cfg)                                       # (R, k) float32
    row_sample = np.repeat(np.arange(len(rows)), rows)
    row_start = np.concatenate([[0], np.cumsum(rows)[:-1]])
    tok_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    spans = np.stack([np.zeros(len(rows), np.int64), rows], axis=1)                  # scored rows per sample
    if has_labels:
        labels_flat, label_len = _lists(batch.column("labels"), where, row0, "labels")
        labels_flat = labels_flat.to_numpy(zero_copy_only=False).astype(np.int64)
        bad = np.nonzero(label_len != lengths)[0]
        if len(bad):
            raise InputError(f"{where(row0 + int(bad[0]))}: {int(label_len[bad[0]])} labels for "
                             f"{int(lengths[bad[0]])} input_ids")
        for i in range(len(rows)):                       # the span from the first to the last trained row
            on = np.nonzero(labels_flat[tok_start[i]:tok_start[i] + rows[i]] != IGNORE)[0]
            spans[i] = (on[0], on[-1] + 1) if len(on) else (0, 0)
    within = np.arange(len(row_sample)) - row_start[row_sample]
    use = (within >= spans[row_sample, 0]) & (within < spans[row_sample, 1])         # (R,) rows kept

    def where_row(r: int) -> str:
        s = int(row_sample[r])
        return f"{where(row0 + s)}, position {int(r - row_start[s])}"

    out_of_range = use & (ids >= cfg.d).any(axis=1)
    if out_of_range.any():
        r = int(np.nonzero(out_of_range)[0][0])
        raise InputError(f"{where_row(r)}: token id {int(ids[r].max())} is outside the vocabulary of d = {cfg.d}")
    srt = np.sort(ids, axis=1)
    dup = np.nonzero(use & (srt[:, 1:] == srt[:, :-1]).any(axis=1))[0]
    if len(dup):
        raise InputError(f"{where_row(int(dup[0]))}: a token id appears twice among its {cfg.k} ids")
    finite = np.isfinite(values).all(axis=1) | ~use
    if not finite.all():
        raise InputError(f"{where_row(int(np.nonzero(~finite)[0][0]))}: compressed_logprobs decode to values that "
                         "are not finite (a capture row with missing ranks, or the wrong compression config)")
    clipped = use[:, None] & (values > 0)               # an approximation above 0 is no log-probability
    order = np.argsort(-np.minimum(values, 0), axis=1, kind="stable")
    values = np.take_along_axis(np.minimum(values, 0), order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    texts = tok.batch_decode([tokens_flat[a:a + n] for a, n in zip(tok_start, lengths)]) if record is None else None
    out = []
    for i, n in enumerate(lengths.tolist()):
        r0, (lo, hi) = int(row_start[i]), spans[i].tolist()
        scored = np.zeros(n, dtype=bool)
        scored[lo:hi] = True
        row_ids = np.zeros((n, cfg.k), dtype=np.int64)
        row_values = np.full((n, cfg.k), np.nan, dtype=np.float32)
        row_ids[lo:hi], row_values[lo:hi] = ids[r0 + lo:r0 + hi], values[r0 + lo:r0 + hi]
        rec = record.get((file, row0 + i)) if record is not None else None
        if record is not None and (rec is None or rec["num_tokens"] != n):
            raise InputError(f"{where(row0 + i)}: logitcache's record of this export ({RECORD_NOTE}) does not "
                             "match the file; remove the .logitcache directory to import the file alone")
        fields = rec if rec is not None else {
            "sample_id": _sample_id(file, row0 + i), "prompt_tokens": 0, "response_tokens": n,
            "finish_reason": "scored", "source": file, "split": "", "row": row0 + i, "sample_index": 0,
            "prompt": None, "response": texts[i]}
        out.append({"tokens": tokens_flat[tok_start[i]:tok_start[i] + n], "ids": row_ids, "values": row_values,
                    "scored": scored, "clipped": int(clipped[r0 + lo:r0 + hi].sum()),
                    **{k: fields[k] for k in ("sample_id", "prompt_tokens", "response_tokens", "finish_reason",
                                              "source", "split", "row", "sample_index", "prompt", "response")}})
    return out


RECORD_NOTE = ".logitcache/samples.parquet"


def _sample_id(file: str, row: int) -> str:
    from ..format.samples import sample_id

    return sample_id(file, "", row, 0)


def _write(dst, key: str, index: int, shard: _Shard, specs: dict, codecs):
    """One shard of the new cache from the samples of ``shard``."""
    from ..format import layout
    from ..format.arrays import ENTROPY, TARGET_LOGPROB, TOKENS, TOPK_IDS, TOPK_LOGPROBS
    from ..format.samples import SAMPLES_SCHEMA
    from ..store.shard_writer import write_shard

    name = layout.shard_name(key, index)
    tokens = np.concatenate(shard.tokens)
    ids, values = np.concatenate(shard.ids), np.concatenate(shard.values)
    scored = np.concatenate(shard.scored)
    nxt = np.concatenate([tokens[1:], [-1]])
    hit = (ids == nxt[:, None]) & scored[:, None]
    target = np.where(hit.any(axis=1), np.where(hit, values, 0).sum(axis=1), np.nan).astype(np.float32)
    target[~scored] = np.nan
    lengths = np.array([len(t) for t in shard.tokens], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    spans = [(int(np.argmax(s)), int(len(s) - np.argmax(s[::-1]))) if s.any() else (0, 0) for s in shard.scored]
    rows = []
    for s, n, off, (lo, hi) in zip(shard.samples, lengths.tolist(), offsets.tolist(), spans):
        t = target[off + lo:off + hi]
        rows.append({**s, "shard": name, "token_offset": off, "num_tokens": n, "scored_start": lo, "scored_end": hi,
                     "mean_entropy": float("nan"), "max_entropy": float("nan"), "p90_entropy": float("nan"),
                     "teacher_logprob_sum": float(t.astype(np.float64).sum())})
    table = pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
    arrays = {TOKENS: tokens.astype(specs[TOKENS].storage_dtype),
              TOPK_IDS: np.where(scored[:, None], ids, 0).astype(specs[TOPK_IDS].storage_dtype),
              TOPK_LOGPROBS: values.astype(np.float32),
              ENTROPY: np.full(len(tokens), np.nan, dtype=np.float32),
              TARGET_LOGPROB: target}
    return write_shard(dst, name, arrays, specs, table, codec=codecs.DEFAULT_CODEC)
