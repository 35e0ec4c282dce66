"""DistillKit's offline-distillation parquet, both ways (arcee-ai/DistillKit 1.0, a61c2e7).

Its capture (``distillkit/sample_logits_vllm.py``) writes a directory: ``compression_config.yaml`` (the
codec's settings, ``distillkit_codec.CompressionConfig``) and ``data_<i>.parquet`` files of one row per
sample with columns ``input_ids`` (list<uint64>, T tokens), ``compressed_logprobs`` and
``bytepacked_indices`` (list<list<uint8>>: one byte string per position, T - 1 of them). Row ``j`` is
the teacher's top-k after reading ``input_ids[j]`` (vLLM's prompt log-probs of position ``j + 1``), so it
is our row ``j`` with no shift; the last token has none. Its trainer compares the student's logits at
``j`` with row ``j`` and masks both its losses with a ``labels`` column when there is one (``labels[j] <
0``: row ``j`` is not trained).

Export writes exactly that directory, plus ``labels``: ``input_ids[j]`` where our row ``j`` is scored,
-100 elsewhere (DistillKit masks its KD loss at row ``j`` and its cross-entropy at the token one position
later with the same column: the KD mask is exact, the cross-entropy's is one token off at each end of a
response; a plain-text score cache has every row scored). A row of fewer than ``k`` entries (adaptive,
compact) is completed with the smallest ids not in it, each with the log-prob ``log(m / (V - c))`` (the
row's tail mass m spread over the V - c ids outside its c entries, at most the row's smallest value); a
row that is not scored gets its next token k times with log-prob 0 (a placeholder ``labels`` masks).
The export decodes what it wrote and reports the error against our values (``checks``).

Import reads the capture's directory (or files, or a glob; any fsspec URL) into a topk cache with float32
log-probs: the decoded values, which approximate the teacher's (``arrays.topk_logprobs.exact`` false), sorted
descending per row; ``target_logprob`` where the next token is among a row's ids (else NaN), and
``entropy`` NaN: a top-k cannot give the full-vocabulary entropy (``arrays.entropy.exact`` false; format
1.6). Rows are scored where ``labels`` (if present) is not -100, between the first and the last such row.
Our own export's record (``.logitcache/samples.parquet``) gives the samples back their ids and text.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from ..format.errors import LogitcacheError
from .base import (TOP_K_OPTION, ExportReport, ForeignFormat, ImportReport, Option, check_exportable, default_top_k,
                   list_array, parquet_bytes, register, selected, windows, write_record)
from .distillkit_codec import (CONFIG_FILE, FOLLOWS, IGNORE, CompressionConfig, compress_logprobs, decompress_logprobs,
                               load_config, pack_bits, unpack_bits)

log = logging.getLogger(__name__)

RECOMMENDED_TERMS = (0, 1, 2, 3, 4, "sqrt")          # DistillKit's README, "Recommended configuration"
CODEC_ROWS = 8192                                    # rows compressed at once (bit packing expands 8x)
WARN_ERROR = 2.0                                     # nats: an export whose decoded values miss ours by more warns


def default_config(vocab: int, k: int, ragged: bool = False) -> CompressionConfig:
    """DistillKit's recommended configuration (16 exact bfloat16 values, a 6-term float32 polynomial
    for the rest, no residuals, no delta coding) at ``k`` values over ``vocab`` ids; for rows that may
    end before k (``ragged``: adaptive, compact) every value exact: a polynomial cannot follow a row's
    values into the padding after them (on our generated compact rows it misses them by up to 3.6 nats)."""
    exact = k if ragged else min(16, k)
    return CompressionConfig(d=vocab, k=k, exact_k=exact, residual_bins=(), exact_dtype="bfloat16",
                             polynomial_terms=RECOMMENDED_TERMS if k > exact else None, term_dtype="float32",
                             delta_encoding=False, error_diffusion=False)


def missing_ids(ids: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """(r, k): per row its ``counts`` ids (ascending or not, distinct, >= 0) and then the smallest ids not
    among them. The j-th missing id is ``j + #{i: s_i - i <= j}`` over the sorted ids s."""
    big = np.iinfo(np.int64).max // 4
    s = np.sort(np.where(np.arange(k)[None, :] < counts[:, None], ids, big), axis=1)
    gaps = s - np.arange(k)[None, :]                                        # non-decreasing
    j = np.arange(k)
    missing = j[None, :] + (gaps[:, None, :] <= j[None, :, None]).sum(-1)   # (r, k): missing ids in order
    slot = np.arange(k)[None, :] - counts[:, None]                          # pad slot of column c.., -1 before
    return np.where(slot >= 0, np.take_along_axis(missing, np.clip(slot, 0, k - 1), axis=1), ids)


def fixed_rows(w, k: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n, k) int64, values (n, k) float64, real (n, k) bool, distilled (n,) bool) of a window's rows as
    DistillKit rows. A scored row with entries is distilled: its entries (``real``) completed with pad
    entries. Every other row (not scored; or scored without a single entry, which a compact row whose
    values are all below its ``lo`` would be) gets the placeholder: its next token with log-prob 0, then
    the smallest other ids with log-prob -100 (e^-100 is 0 in any float), which ``labels`` masks."""
    ids, lp = w.ids[:, :k].astype(np.int64), w.logprobs[:, :k].astype(np.float64)
    counts = np.minimum(w.counts, k)
    distilled = w.scored & (counts > 0)
    real = (np.arange(k)[None, :] < counts[:, None]) & distilled[:, None]
    if vocab < 2 * k:
        raise LogitcacheError(f"a vocabulary of {vocab} ids cannot complete rows of k = {k} with ids outside them")
    nxt = np.concatenate([w.tokens[1:], [0]])                                # the next token (unused on last rows)
    other = ~distilled
    ids[other, 0], lp[other, 0], counts = nxt[other], 0.0, np.where(other, 1, counts)
    need = np.nonzero(counts < k)[0]
    for a in range(0, len(need), 2048):                 # (r, k, k) comparisons, a block at a time
        r = need[a:a + 2048]
        ids[r] = missing_ids(ids[r], counts[r], k)
        c = counts[r]
        with np.errstate(divide="ignore"):
            pad = np.log(np.clip(w.tail[r], 0.0, 1.0) / (vocab - c))
        pad = np.maximum(np.minimum(pad, lp[r, c - 1]), -100.0)             # at most the row's smallest value
        pad = np.where(other[r], -100.0, pad)
        lp[r] = np.where(np.arange(k)[None, :] < c[:, None], lp[r], pad[:, None])
    return ids, lp, real, distilled


@register
class DistillKitFormat(ForeignFormat):
    name = "distillkit"
    summary = "DistillKit's parquet (compressed log-probs, bit-packed ids), both ways"
    follows = FOLLOWS
    export_options = (
        TOP_K_OPTION,
        Option("compression_config", "--compression-config", str,
               "DistillKit compression config (YAML: its compression_config.yaml, or a training config's "
               "teacher.logprob_compressor). Export default: its README's recommended settings at --top-k; "
               "import default: SRC's compression_config.yaml.", "FILE.yaml"),
    )
    import_options = (
        export_options[1],
        Option("samples_per_shard", "--samples-per-shard", int, "Samples per shard of the new cache (default 256).",
               "N"),
        Option("teacher_name", "--teacher-name", str,
               "The teacher that made the logits, as the manifest should name it (DistillKit's files do not say).",
               "NAME"),
    )

    # ---- export -------------------------------------------------------------------------------------
    def export(self, cache, out, *, sample_ids=None, selection="", storage_options=None, top_k=None,
               compression_config=None) -> ExportReport:
        from ..format.fingerprint import cache_fingerprint
        from ..store.target import new_output

        width = check_exportable(cache, "DistillKit's top-k")
        vocab = cache.manifest.teacher.vocab_size
        if compression_config is not None:
            if top_k is not None:
                raise LogitcacheError("--top-k: the compression config sets k; give one or the other")
            cfg = load_config(compression_config, storage_options, vocab)
        else:
            if top_k is not None and top_k < 1:
                raise LogitcacheError(f"--top-k must be at least 1, got {top_k}")
            cfg = default_config(vocab, top_k or default_top_k(width), cache.encoding.ragged)
        if cfg.k > width:
            raise LogitcacheError(f"k = {cfg.k} is more than the {width} entries a row of {cache.url} holds")
        if cfg.d < vocab:
            raise LogitcacheError(f"{cfg.where}: d = {cfg.d} is smaller than the teacher's vocabulary ({vocab}): "
                                  "its ids would not fit")
        stats = _ErrorStats(cfg.exact_k)
        files, record, n_samples, n_tokens, n_rows = [], [], 0, 0, 0
        with new_output(out, storage_options, "this export's destination") as (dst, lock):
            dst.write_atomic(CONFIG_FILE, _yaml(cfg.to_dict()).encode())
            for shard, samples in selected(cache, sample_ids):
                lock.heartbeat()
                pieces = [self._window(w, cfg, vocab, stats) for w in windows(cache, shard, samples, width)]
                table = pa.concat_tables([p[0] for p in pieces])
                rel = f"data_{len(files)}.parquet"
                data = parquet_bytes(table)
                dst.write_atomic(rel, data)
                files.append({"path": rel, "samples": table.num_rows, "bytes": len(data)})
                rec = pa.concat_tables([p[1] for p in pieces])
                record.append(rec.append_column("file", pa.array([rel] * rec.num_rows))
                              .append_column("file_row", pa.array(np.arange(rec.num_rows, dtype=np.int64))))
                n_samples += table.num_rows
                n_tokens += sum(p[2] for p in pieces)
                n_rows += sum(p[3] for p in pieces)
            if not files:
                raise LogitcacheError("no samples to export (the selection matches none of the cache)")
            worst = stats.summary()["approximated_values"]["max_abs_error"]
            if worst > WARN_ERROR:
                log.warning("%s: DistillKit's polynomial tail misses our log-probs by up to %.2f nats (k %d, exact_k %d): "
                            "raise exact_k or add residual_bins in the compression config", out, worst, cfg.k, cfg.exact_k)
            report = ExportReport(
                out=dst.url, to=self.name, source=cache.url, source_fingerprint=cache_fingerprint(cache.manifest),
                selection=selection, samples=n_samples, tokens=n_tokens, rows=n_rows, files=files,
                bytes=sum(f["bytes"] for f in files), options={"compression_config": cfg.to_dict()},
                checks={**stats.summary(), "codec_bytes_per_position": cfg.row_bytes, "follows": FOLLOWS})
            write_record(dst, report, record, cache)
        return report

    def _window(self, w, cfg: CompressionConfig, vocab: int, stats: "_ErrorStats"):
        ids, values, real, distilled = fixed_rows(w, cfg.k, vocab)
        keep = ~w.last                                                   # T - 1 rows per sample
        ids, values, real = ids[keep], values[keep], real[keep]
        lp_bytes, id_bytes = [], []
        for a in range(0, len(ids), CODEC_ROWS):
            b = compress_logprobs(values[a:a + CODEC_ROWS], cfg)
            i = pack_bits(ids[a:a + CODEC_ROWS], cfg.index_bits)
            stats.add(decompress_logprobs(b, cfg), values[a:a + CODEC_ROWS], real[a:a + CODEC_ROWS])
            if not np.array_equal(unpack_bits(i, cfg.index_bits, cfg.k).astype(np.int64), ids[a:a + CODEC_ROWS]):
                raise RuntimeError("bit-packed ids do not unpack to themselves")   # pragma: no cover - a bug
            lp_bytes.append(b)
            id_bytes.append(i)
        lp_bytes = np.concatenate(lp_bytes) if lp_bytes else np.zeros((0, cfg.logprob_bytes), np.uint8)
        id_bytes = np.concatenate(id_bytes) if id_bytes else np.zeros((0, cfg.index_bytes), np.uint8)
        labels = np.where(distilled, w.tokens, IGNORE)
        rows = np.maximum(w.lengths - 1, 0)
        table = pa.table({
            "input_ids": list_array(w.tokens.astype(np.uint64), w.lengths),
            "compressed_logprobs": list_array(lp_bytes, rows),
            "bytepacked_indices": list_array(id_bytes, rows),
            "labels": list_array(labels.astype(np.int64), w.lengths),
        })
        return table, w.samples, int(w.lengths.sum()), int(distilled.sum())

    # ---- import -------------------------------------------------------------------------------------
    def import_(self, src, out, *, tokenizer, storage_options=None, compression_config=None, samples_per_shard=None,
                teacher_name=None) -> ImportReport:
        from .distillkit_import import run_import

        return run_import(self, src, out, tokenizer=tokenizer, storage_options=storage_options,
                          compression_config=compression_config,
                          samples_per_shard=256 if samples_per_shard is None else samples_per_shard,
                          teacher_name=teacher_name)


class _ErrorStats:
    """|decoded - ours| over the real entries of exported rows, for the exact values and for the rest."""

    def __init__(self, exact_k: int):
        self.exact_k = exact_k
        self.sums = {"exact": [0.0, 0, 0.0], "approximated": [0.0, 0, 0.0]}    # sum, count, max

    def add(self, decoded: np.ndarray, values: np.ndarray, real: np.ndarray) -> None:
        err = np.abs(decoded.astype(np.float64) - values)
        if np.isnan(err[real]).any():
            raise LogitcacheError("the compression config decodes to values that are not finite (NaN): change its "
                                  "polynomial_terms or dtypes")
        col = np.arange(values.shape[1])[None, :]
        for key, part in (("exact", real & (col < self.exact_k)), ("approximated", real & (col >= self.exact_k))):
            e = err[part]
            s = self.sums[key]
            s[0] += float(e.sum())
            s[1] += int(e.size)
            s[2] = max(s[2], float(e.max(initial=0.0)))

    def summary(self) -> dict:
        return {f"{key}_values": {"count": c, "mean_abs_error": t / c if c else 0.0, "max_abs_error": m}
                for key, (t, c, m) in self.sums.items()}


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
