"""Encodings of a teacher's next-token distributions, as plain arrays (issue 7: smaller, less biased caches).

Pure numpy, array in / array out: every ``encode_*`` returns ``dict[str, np.ndarray]`` of plain integer or
float arrays that any Zarr v3 / numcodecs reader stores and reads back (no custom codec; the transforms
below are undone by the documented ``decode_*``). ``dist_arrays`` binds them to the stored format (1.2).
Choices and their numbers: ``benchmarks/results/encodings.md`` (``benchmarks/distribution_encodings.py``).

Input ("candidates"): per token the K most probable ids in descending log-prob order, their float32
log-probs (log-softmax at T=1 over the full vocabulary V), and the exact mass outside them,
``tail = sum of p over the other V - K ids`` (float32). ``select_topk`` makes them from full (N, V)
log-probs; a capture backend makes the same three arrays on its device (topk + logsumexp of the rest).

Encodings (N tokens, M stored entries in all, ragged rows laid end to end in token order):

``topk`` (the format today)
    ``ids`` (N, k) uint, ``logprobs`` (N, k) float16, rank order. The tail is derived
    (1 - sum exp(logprobs)), or stored as ``tail`` (N,) float32 with ``store_tail=True``.
``adaptive``
    Per token the smallest prefix of the sorted distribution whose mass reaches ``top_p``, at most
    ``k_max`` entries. ``ids`` (M,) uint, ``logprobs`` (M,) float16 in rank order, ``counts`` (N,) uint8
    (uint16 if k_max > 255), ``tail`` (N,) float32. **The tail is stored, exact**: derived from fp16
    values it would be off by up to ~sum(p) * 2^-11 (5e-4 absolute), i.e. 5 % of a 0.01 tail, and it is
    what the tail bucket of the loss is made of; it costs ~3 B/token compressed.
``compact``
    Adaptive selection, then values quantised on a log scale to ``bits`` bits:
    ``q = round((lp - lo) / step)``, ``step = -lo / (2^bits - 1)``, decoded ``lp' = lo + q * step``;
    **|lp' - lp| <= step / 2** for every stored entry (``max_abs_error``). Entries with lp < lo are not
    stored: their mass goes to the (exact) tail, so the bound holds for all stored entries.
    ``order="id"``: ids ascending within a token, delta-coded if ``delta`` (first id absolute, then the
    gaps, all >= 1), codes in that id order; the rank order is recovered by sorting the codes (ties,
    i.e. equal decoded values, come back in id order). ``order="rank"``: ids raw in rank order, codes
    non-increasing, delta-coded if ``delta`` (first code absolute, then ``q[i-1] - q[i] >= 0``); the
    rank order is kept exactly. Arrays: ``ids`` (M,) uint, ``codes`` (M,) uint8 (uint16 if bits > 8),
    ``counts`` (N,), ``tail`` (N,) float32. Decoding needs the same keyword parameters (record them
    with the arrays). Inverse of the id delta: per-token cumulative sum; of the code delta: first code
    minus the per-token cumulative sum of the rest.
``sampled`` (Sparse Logit Sampling, arXiv 2503.16870)
    Per token ``n_draws`` ids drawn with replacement from the proposal r = softmax(lp / temperature)
    over the full vocabulary (temperature >= 1: then w = p/r <= sum_j p_j^(1/T) is bounded; below 1
    the weights of rare ids are unbounded and the estimate heavy-tailed, so it is refused). Stored:
    the unique ids ascending (delta-coded if ``delta``) ``ids`` (M,),
    their draw counts ``counts`` (M,) uint8 (uint16 if n_draws > 255), the number of unique ids per
    token ``row_counts`` (N,). For temperature != 1 also ``logprobs`` (M,) (float16 by default) and
    ``log_z`` (N,) float32 = logsumexp(lp / T), giving the importance weights
    w = p / r = exp((1 - 1/T) lp + log_z). n_draws is the per-token sum of counts. The unbiased
    estimator is ``student_train.sampled_kd.sampled_cross_entropy``.
``hybrid`` (head exact, tail sampled)
    A compact head (as ``compact``, id order) with its exact tail mass m, plus ids drawn from the
    teacher's distribution restricted to the ids outside the head (``tail_ids`` / ``tail_counts`` /
    ``tail_row_counts``, like ``sampled``), a fixed number per token or ceil(n * m). Decoded as target
    weights: the head's values scaled to its exact mass 1 - m, the drawn ids m * count / n_t: an
    unbiased estimate of the full-vocabulary CE up to the head's quantisation, with the sampling noise
    confined to the tail (variance ~ m^2 / n_t instead of ~ 1 / n).

Decoded forms: ``SparseRows`` (top-k, adaptive, compact: ids + float32 log-probs in rank order + tail),
``SampledRows`` (ids + counts [+ log-weights]) and ``TargetRows`` (ids + target weights: hybrid, or
``SampledRows.to_targets()``); all have ``padded()`` for (N, width) tensors and ``rows(a, b)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .arrays import id_dtype
from .errors import LogitcacheError

__all__ = [
    "EncodingError", "SparseRows", "SampledRows", "TargetRows", "select_topk",
    "encode_topk", "decode_topk", "encode_adaptive", "decode_adaptive",
    "encode_compact", "decode_compact", "quantization_step", "max_abs_error",
    "sample_draws", "encode_sampled", "pack_sampled", "decode_sampled", "encode_hybrid", "pack_hybrid",
    "decode_hybrid",
    "delta_encode", "delta_decode", "payload_bytes",
]


class EncodingError(LogitcacheError, ValueError):
    """Bad arguments to, or inconsistent arrays for, an encoding."""


# ---------------------------------------------------------------------------------------------
# Decoded forms
# ---------------------------------------------------------------------------------------------

def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _pad(counts: np.ndarray, width: int | None, *flat_and_fill):
    counts = counts.astype(np.int64)
    w = int(counts.max(initial=0)) if width is None else int(width)
    if w < int(counts.max(initial=0)):
        raise EncodingError(f"width={w} is smaller than the longest row ({int(counts.max())} entries)")
    w = max(w, 1)
    n = len(counts)
    mask = np.arange(w)[None, :] < counts[:, None]
    outs = []
    for flat, fill, dtype in flat_and_fill:
        out = np.full((n, w), fill, dtype=dtype)
        out[mask] = flat
        outs.append(out)
    return outs, mask


@dataclass(frozen=True)
class SparseRows:
    """Decoded top-k / adaptive / compact rows. ``ids`` (M,) int64 and ``logprobs`` (M,) float32 are
    the rows laid end to end, each in rank order (descending log-prob); ``counts`` (N,) int64 entries
    per token; ``tail`` (N,) float32 exact mass outside the row's ids, or None (derive it)."""

    ids: np.ndarray
    logprobs: np.ndarray
    counts: np.ndarray
    tail: np.ndarray | None

    @property
    def num_tokens(self) -> int:
        return len(self.counts)

    @property
    def offsets(self) -> np.ndarray:
        return _offsets(self.counts)

    def tail_mass(self) -> np.ndarray:
        """The stored tail, or 1 - sum exp(logprobs) per token (clamped at 0), float64."""
        if self.tail is not None:
            return self.tail.astype(np.float64)
        s = np.zeros(self.num_tokens)
        np.add.at(s, np.repeat(np.arange(self.num_tokens), self.counts), np.exp(self.logprobs.astype(np.float64)))
        return np.clip(1.0 - s, 0.0, None)

    def padded(self, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N, W) int64 with -1 in padding, logprobs (N, W) float32 with -inf in padding);
        W = the longest row (at least 1) unless given."""
        (ids, lp), _ = _pad(self.counts, width, (self.ids, -1, np.int64), (self.logprobs, -np.inf, np.float32))
        return ids, lp

    def rows(self, start: int, stop: int) -> "SparseRows":
        """Tokens [start, stop) as their own SparseRows."""
        off = self.offsets
        a, b = off[start], off[stop]
        return SparseRows(self.ids[a:b], self.logprobs[a:b], self.counts[start:stop],
                          None if self.tail is None else self.tail[start:stop])


@dataclass(frozen=True)
class SampledRows:
    """Decoded sampled rows: per token the unique drawn ids (ascending) ``ids`` (M,) int64, how many of
    the token's n draws hit each ``counts`` (M,) int64, ``row_counts`` (N,) int64 unique ids per token,
    ``log_weights`` (M,) float64 importance log-weights log(p/r) (None: proposal T=1, all weights 1)."""

    ids: np.ndarray
    counts: np.ndarray
    row_counts: np.ndarray
    log_weights: np.ndarray | None
    temperature: float

    @property
    def num_tokens(self) -> int:
        return len(self.row_counts)

    @property
    def offsets(self) -> np.ndarray:
        return _offsets(self.row_counts)

    @property
    def n_draws(self) -> np.ndarray:
        """(N,) draws per token (the per-token sum of counts)."""
        s = np.zeros(self.num_tokens, dtype=np.int64)
        np.add.at(s, np.repeat(np.arange(self.num_tokens), self.row_counts), self.counts)
        return s

    def targets(self) -> np.ndarray:
        """(M,) float64 unbiased estimates of the teacher probabilities p_i: count * w / n_draws."""
        n = np.repeat(self.n_draws, self.row_counts).astype(np.float64)
        w = 1.0 if self.log_weights is None else np.exp(self.log_weights)
        return self.counts * w / n

    def padded(self, width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (N, W) int64, -1 pad; counts (N, W) int64, 0 pad; log_weights (N, W) float64, 0 pad)."""
        lw = np.zeros(len(self.ids)) if self.log_weights is None else self.log_weights
        (ids, c, w), _ = _pad(self.row_counts, width, (self.ids, -1, np.int64), (self.counts, 0, np.int64),
                              (lw, 0.0, np.float64))
        return ids, c, w

    def rows(self, start: int, stop: int) -> "SampledRows":
        off = self.offsets
        a, b = off[start], off[stop]
        return SampledRows(self.ids[a:b], self.counts[a:b], self.row_counts[start:stop],
                           None if self.log_weights is None else self.log_weights[a:b], self.temperature)

    def to_targets(self) -> "TargetRows":
        return TargetRows(self.ids, self.targets(), self.row_counts)


@dataclass(frozen=True)
class TargetRows:
    """Decoded rows as ids with target weights: ``targets`` (M,) float64 are unbiased estimates of the
    teacher's p on ``ids`` (M,) int64 (the full-vocabulary CE is estimated by -sum targets * log q);
    ``counts`` (N,) int64 entries per token. Made by ``decode_hybrid`` and ``SampledRows.to_targets``."""

    ids: np.ndarray
    targets: np.ndarray
    counts: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.counts)

    @property
    def offsets(self) -> np.ndarray:
        return _offsets(self.counts)

    def padded(self, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N, W) int64, -1 pad; targets (N, W) float64, 0 pad)."""
        (ids, t), _ = _pad(self.counts, width, (self.ids, -1, np.int64), (self.targets, 0.0, np.float64))
        return ids, t

    def rows(self, start: int, stop: int) -> "TargetRows":
        off = self.offsets
        a, b = off[start], off[stop]
        return TargetRows(self.ids[a:b], self.targets[a:b], self.counts[start:stop])


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

def _check_vocab(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise EncodingError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return int(vocab_size)


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo \
            or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise EncodingError(f"{name} must be an int {rng}, got {value!r}")
    return int(value)


def _check_top_p(top_p) -> float:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating)) or not 0.0 < float(top_p) <= 1.0:
        raise EncodingError(f"top_p must be a number in (0, 1], got {top_p!r}")
    return float(top_p)


def _check_candidates(ids, logprobs, tail, vocab_size: int):
    if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise EncodingError(f"ids must be a 2-D integer array (N, K), got {_desc(ids)}")
    if not isinstance(logprobs, np.ndarray) or logprobs.dtype.kind != "f" or logprobs.shape != ids.shape:
        raise EncodingError(f"logprobs must be a float array of the ids' shape {ids.shape}, got {_desc(logprobs)}")
    if not isinstance(tail, np.ndarray) or tail.dtype.kind != "f" or tail.shape != ids.shape[:1]:
        raise EncodingError(f"tail must be a float array of shape ({ids.shape[0]},), got {_desc(tail)}")
    if ids.shape[1] < 1:
        raise EncodingError("ids has no columns: need K >= 1 candidates per token")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise EncodingError(f"ids must be in [0, vocab_size={vocab_size}); found {int(ids.min())}..{int(ids.max())}")
    lp = logprobs.astype(np.float32)
    if np.isnan(lp).any() or (lp > 0).any():
        raise EncodingError("logprobs must be log-probabilities (<= 0, not NaN)")
    if (np.diff(lp, axis=1) > 0).any():
        raise EncodingError("logprobs must be sorted in descending order within each token (rank order)")
    t = tail.astype(np.float64)
    if np.isnan(t).any() or (t < 0).any() or (t > 1).any():
        raise EncodingError("tail must be a probability mass in [0, 1]")
    if ids.shape[1] > 1:
        s = np.sort(ids, axis=1)
        if (s[:, 1:] == s[:, :-1]).any():
            raise EncodingError("ids repeat within a token; candidate ids must be distinct")
    return ids.astype(np.int64), lp, t


def _desc(x) -> str:
    if isinstance(x, np.ndarray):
        return f"a {x.dtype} array of shape {x.shape}"
    return f"a {type(x).__name__}"


def _require(arrays: dict, names: tuple[str, ...], encoding: str) -> None:
    if not isinstance(arrays, dict):
        raise EncodingError(f"{encoding}: expected a dict of arrays, got {type(arrays).__name__}")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise EncodingError(f"{encoding}: missing array(s) {', '.join(missing)}; have {', '.join(arrays) or 'none'}")


def _count_dtype(max_count: int) -> np.dtype:
    return np.dtype(np.uint8 if max_count <= 0xFF else np.uint16 if max_count <= 0xFFFF else np.uint32)


def _check_counts(counts: np.ndarray, total: int, encoding: str, what: str = "counts") -> np.ndarray:
    if counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise EncodingError(f"{encoding}: {what} must be a 1-D integer array, got {_desc(counts)}")
    c = counts.astype(np.int64)
    if (c < 0).any() or int(c.sum()) != total:
        raise EncodingError(f"{encoding}: {what} sum to {int(c.sum())} but there are {total} stored entries")
    return c


# ---------------------------------------------------------------------------------------------
# Candidates from full log-probs
# ---------------------------------------------------------------------------------------------

def select_topk(logprobs: np.ndarray, k: int, *, block_rows: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full (N, V) log-probs -> (ids (N, k) int64, logprobs (N, k) float32 descending (ties by id),
    tail (N,) float32 = sum of exp(logprobs) over the other V - k ids, summed directly in float64)."""
    if not isinstance(logprobs, np.ndarray) or logprobs.ndim != 2 or logprobs.dtype.kind != "f":
        raise EncodingError(f"logprobs must be a 2-D float array (N, V), got {_desc(logprobs)}")
    n, v = logprobs.shape
    k = _check_int("k", k, 1, v)
    ids = np.empty((n, k), dtype=np.int64)
    vals = np.empty((n, k), dtype=np.float32)
    tail = np.empty(n, dtype=np.float32)
    for s in range(0, n, block_rows):
        lp = logprobs[s:s + block_rows].astype(np.float32)
        part = np.argpartition(-lp, k - 1, axis=1)[:, :k] if k < v else np.tile(np.arange(v), (len(lp), 1))
        pv = np.take_along_axis(lp, part, 1)
        order = np.lexsort((part, -pv), axis=1)                      # by -lp, then by id
        ids[s:s + len(lp)] = np.take_along_axis(part, order, 1)
        vals[s:s + len(lp)] = np.take_along_axis(pv, order, 1)
        e = np.exp(lp.astype(np.float64))
        np.put_along_axis(e, ids[s:s + len(lp)], 0.0, 1)
        tail[s:s + len(lp)] = e.sum(1)
    return ids, vals, tail


# ---------------------------------------------------------------------------------------------
# topk (baseline)
# ---------------------------------------------------------------------------------------------

def encode_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, *, vocab_size: int, k: int,
                value_dtype: str = "float16", store_tail: bool = False) -> dict[str, np.ndarray]:
    """The first k candidates as they are stored today: ``ids`` (N, k), ``logprobs`` (N, k) value_dtype,
    plus ``tail`` (N,) float32 (the candidates' tail plus the mass of candidates k..K-1) if store_tail."""
    v = _check_vocab(vocab_size)
    ids, lp, t = _check_candidates(ids, logprobs, tail, v)
    k = _check_int("k", k, 1, ids.shape[1])
    if value_dtype not in ("float16", "float32"):
        raise EncodingError(f"value_dtype must be 'float16' or 'float32', got {value_dtype!r}")
    out = {"ids": ids[:, :k].astype(id_dtype(v)), "logprobs": lp[:, :k].astype(value_dtype)}
    if store_tail:
        out["tail"] = (t + np.exp(lp[:, k:].astype(np.float64)).sum(1)).astype(np.float32)
    return out


def decode_topk(arrays: dict[str, np.ndarray]) -> SparseRows:
    _require(arrays, ("ids", "logprobs"), "topk")
    ids, lp = arrays["ids"], arrays["logprobs"]
    if ids.ndim != 2 or lp.shape != ids.shape:
        raise EncodingError(f"topk: ids {ids.shape} and logprobs {lp.shape} must be (N, k) of one shape")
    tail = arrays.get("tail")
    if tail is not None and tail.shape != ids.shape[:1]:
        raise EncodingError(f"topk: tail shape {tail.shape} does not match {ids.shape[0]} tokens")
    n, k = ids.shape
    return SparseRows(ids.reshape(-1).astype(np.int64), lp.reshape(-1).astype(np.float32),
                      np.full(n, k, dtype=np.int64), None if tail is None else tail.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# adaptive k
# ---------------------------------------------------------------------------------------------

def _adaptive_counts(lp: np.ndarray, top_p: float, k_max: int) -> np.ndarray:
    """Smallest r with sum_{i<r} p_i >= top_p, capped at min(k_max, K); at least 1."""
    cum = np.cumsum(np.exp(lp.astype(np.float64)), axis=1)
    r = (cum < top_p).sum(1) + 1
    return np.minimum(r, min(k_max, lp.shape[1])).astype(np.int64)


def _tails_after(lp: np.ndarray, t: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exact tail of each token's prefix: the candidates' tail plus the mass of candidates >= count
    (summed directly, no cancellation)."""
    e = np.exp(lp.astype(np.float64))
    e[np.arange(lp.shape[1])[None, :] < counts[:, None]] = 0.0
    return t + e.sum(1)


def encode_adaptive(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, *, vocab_size: int,
                    top_p: float = 0.99, k_max: int = 128, value_dtype: str = "float16") -> dict[str, np.ndarray]:
    """Per token the smallest rank-order prefix with mass >= top_p, at most k_max (and at most K) entries.
    Returns ``ids`` (M,), ``logprobs`` (M,) value_dtype, ``counts`` (N,), ``tail`` (N,) float32 exact."""
    v = _check_vocab(vocab_size)
    ids, lp, t = _check_candidates(ids, logprobs, tail, v)
    top_p = _check_top_p(top_p)
    k_max = _check_int("k_max", k_max, 1)
    if value_dtype not in ("float16", "float32"):
        raise EncodingError(f"value_dtype must be 'float16' or 'float32', got {value_dtype!r}")
    counts = _adaptive_counts(lp, top_p, k_max)
    keep = np.arange(ids.shape[1])[None, :] < counts[:, None]
    return {"ids": ids[keep].astype(id_dtype(v)), "logprobs": lp[keep].astype(value_dtype),
            "counts": counts.astype(_count_dtype(k_max)), "tail": _tails_after(lp, t, counts).astype(np.float32)}


def decode_adaptive(arrays: dict[str, np.ndarray]) -> SparseRows:
    _require(arrays, ("ids", "logprobs", "counts", "tail"), "adaptive")
    ids, lp, tail = arrays["ids"], arrays["logprobs"], arrays["tail"]
    if ids.ndim != 1 or lp.shape != ids.shape:
        raise EncodingError(f"adaptive: ids {ids.shape} and logprobs {lp.shape} must be flat and of one length")
    counts = _check_counts(arrays["counts"], len(ids), "adaptive")
    if tail.shape != counts.shape:
        raise EncodingError(f"adaptive: tail shape {tail.shape} does not match {len(counts)} tokens")
    return SparseRows(ids.astype(np.int64), lp.astype(np.float32), counts, tail.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Delta coding of ragged rows (plain integer arrays, exact inverse)
# ---------------------------------------------------------------------------------------------

def delta_encode(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row: first value as is, then ``values[i] - values[i-1]``. int64 in, int64 out."""
    v = values.astype(np.int64)
    d = v.copy()
    d[1:] -= v[:-1]
    starts = _offsets(counts)[:-1][counts > 0]
    d[starts] = v[starts]
    return d


def delta_decode(deltas: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Inverse of ``delta_encode``: per-row cumulative sum."""
    c = np.cumsum(deltas.astype(np.int64))
    off = _offsets(counts)
    before = np.where(off[:-1] > 0, c[np.maximum(off[:-1] - 1, 0)] if len(c) else 0, 0)
    return c - np.repeat(before, counts)


# ---------------------------------------------------------------------------------------------
# compact: adaptive selection + log-scale quantisation + sorted/delta-coded ids or codes
# ---------------------------------------------------------------------------------------------

def quantization_step(bits: int, lo: float) -> float:
    """Log-prob step of ``bits``-bit codes over [lo, 0]."""
    bits = _check_int("bits", bits, 1, 16)
    if not isinstance(lo, (int, float, np.floating)) or not math.isfinite(lo) or lo >= 0:
        raise EncodingError(f"lo must be a finite negative log-probability, got {lo!r}")
    return -float(lo) / ((1 << bits) - 1)


def max_abs_error(bits: int, lo: float) -> float:
    """The stated bound on |decoded log-prob - log-prob| of a compact entry: half a step."""
    return quantization_step(bits, lo) / 2


def _check_order(order: str) -> str:
    if order not in ("id", "rank"):
        raise EncodingError(f"order must be 'id' or 'rank', got {order!r}")
    return order


def encode_compact(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, *, vocab_size: int,
                   top_p: float = 1.0, k_max: int = 64, bits: int = 8, lo: float = -16.0, order: str = "id",
                   delta: bool = True, counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Adaptive selection (top_p, k_max; top_p=1 is a plain top-k_max), entries below ``lo`` moved to the
    tail, values quantised to ``bits`` bits over [lo, 0]. Returns ``ids`` (M,), ``codes`` (M,),
    ``counts`` (N,), ``tail`` (N,) float32 exact. See the module docstring for ``order`` and ``delta``.
    ``counts`` given: keep exactly that prefix per token (a capture device chose it; entries below lo
    are still refused rather than clipped)."""
    v = _check_vocab(vocab_size)
    ids, lp, t = _check_candidates(ids, logprobs, tail, v)
    top_p = _check_top_p(top_p)
    k_max = _check_int("k_max", k_max, 1)
    step = quantization_step(bits, lo)
    order = _check_order(order)
    if counts is None:
        counts = np.minimum(_adaptive_counts(lp, top_p, k_max), (lp >= lo).sum(1))  # sorted: a prefix
    else:
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (ids.shape[0],) or (counts < 0).any() or (counts > min(k_max, ids.shape[1])).any():
            raise EncodingError(f"counts must be (N={ids.shape[0]},) in [0, {min(k_max, ids.shape[1])}]")
        below = np.arange(ids.shape[1])[None, :] < counts[:, None]
        if (below & (lp < lo - quantization_step(bits, lo) / 2)).any():
            raise EncodingError(f"counts keep an entry below lo={lo}: it cannot be quantised within the bound")
    keep = np.arange(ids.shape[1])[None, :] < counts[:, None]
    new_tail = _tails_after(lp, t, counts)
    fid, flp = ids[keep], lp[keep].astype(np.float64)
    codes = np.clip(np.rint((flp - lo) / step), 0, (1 << bits) - 1).astype(np.int64)
    if order == "id":
        row = np.repeat(np.arange(len(counts)), counts)
        perm = np.lexsort((fid, row))
        fid, codes = fid[perm], codes[perm]
        if delta:
            fid = delta_encode(fid, counts)
    elif delta:
        codes = -delta_encode(codes, counts)                          # q[i-1] - q[i] >= 0 ...
        starts = _offsets(counts)[:-1][counts > 0]
        codes[starts] = -codes[starts]                                # ... and the first code as is
    return {"ids": fid.astype(id_dtype(v)), "codes": codes.astype(np.uint8 if bits <= 8 else np.uint16),
            "counts": counts.astype(_count_dtype(k_max)), "tail": new_tail.astype(np.float32)}


def decode_compact(arrays: dict[str, np.ndarray], *, vocab_size: int, bits: int = 8, lo: float = -16.0,
                   order: str = "id", delta: bool = True) -> SparseRows:
    """Inverse of ``encode_compact`` (same keyword parameters): rows in rank order, log-probs within
    ``max_abs_error(bits, lo)`` of the encoded ones, the exact tail."""
    v = _check_vocab(vocab_size)
    step = quantization_step(bits, lo)
    order = _check_order(order)
    _require(arrays, ("ids", "codes", "counts", "tail"), "compact")
    ids, codes, tail = arrays["ids"], arrays["codes"], arrays["tail"]
    if ids.ndim != 1 or codes.shape != ids.shape:
        raise EncodingError(f"compact: ids {ids.shape} and codes {codes.shape} must be flat and of one length")
    counts = _check_counts(arrays["counts"], len(ids), "compact")
    if tail.shape != counts.shape:
        raise EncodingError(f"compact: tail shape {tail.shape} does not match {len(counts)} tokens")
    fid, q = ids.astype(np.int64), codes.astype(np.int64)
    row = np.repeat(np.arange(len(counts)), counts)
    if order == "id":
        if delta:
            fid = delta_decode(fid, counts)
        perm = np.lexsort((fid, -q, row))                             # rank order; equal codes by id
        fid, q = fid[perm], q[perm]
    elif delta:
        starts = _offsets(counts)[:-1][counts > 0]
        d = -q
        d[starts] = q[starts]
        q = delta_decode(d, counts)
    if len(q) and (q.min() < 0 or q.max() > (1 << bits) - 1):
        raise EncodingError(f"compact: decoded codes fall outside [0, {(1 << bits) - 1}]: wrong bits/order/delta?")
    if len(fid) and (fid.min() < 0 or fid.max() >= v):
        raise EncodingError(f"compact: decoded ids fall outside [0, {v}): wrong order/delta or vocab_size?")
    return SparseRows(fid, (lo + q * step).astype(np.float32), counts, tail.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# sampled (Sparse Logit Sampling)
# ---------------------------------------------------------------------------------------------

def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise EncodingError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature < 1:
        raise EncodingError(f"temperature={temperature!r}: a proposal temperature below 1 gives unbounded importance "
                            "weights p/r (heavy-tailed, unreliable estimates); use temperature >= 1")
    return float(temperature)


def sample_draws(logprobs: np.ndarray, n_draws: int, *, temperature: float = 1.0,
                 rng: np.random.Generator | int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, n_draws) ids drawn with replacement from softmax(logprobs / temperature) (inverse CDF in
    float64, one row at a time), and log_z (N,) = logsumexp(logprobs / temperature)."""
    if not isinstance(logprobs, np.ndarray) or logprobs.ndim != 2 or logprobs.dtype.kind != "f":
        raise EncodingError(f"logprobs must be a 2-D float array (N, V), got {_desc(logprobs)}")
    n_draws = _check_int("n_draws", n_draws, 1, 0xFFFF)
    t = _check_temperature(temperature)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = logprobs.shape[0]
    out = np.empty((n, n_draws), dtype=np.int64)
    log_z = np.empty(n, dtype=np.float64)
    u = rng.random((n, n_draws))
    for i in range(n):
        x = logprobs[i].astype(np.float64) / t
        m = x.max()
        if not math.isfinite(m):
            raise EncodingError(f"logprobs row {i} has no finite entry")
        cdf = np.cumsum(np.exp(x - m))
        log_z[i] = m + math.log(cdf[-1])
        out[i] = np.searchsorted(cdf, u[i] * cdf[-1], side="right")
    np.minimum(out, logprobs.shape[1] - 1, out=out)
    return out, log_z


def encode_sampled(logprobs: np.ndarray, n_draws: int, *, vocab_size: int | None = None, temperature: float = 1.0,
                   rng: np.random.Generator | int | None = None, delta: bool = True,
                   value_dtype: str = "float16") -> dict[str, np.ndarray]:
    """Draw n_draws ids per token from the full (N, V) log-probs at the proposal ``temperature``; store
    unique ids (ascending; delta-coded if ``delta``), their counts, unique ids per token, and for
    temperature != 1 their log-probs (value_dtype) and log_z. See the module docstring."""
    v = logprobs.shape[1] if isinstance(logprobs, np.ndarray) and logprobs.ndim == 2 else None
    if v is None:
        raise EncodingError(f"logprobs must be a 2-D float array (N, V), got {_desc(logprobs)}")
    if vocab_size is not None and _check_vocab(vocab_size) != v:
        raise EncodingError(f"vocab_size={vocab_size} but logprobs has V={v} columns")
    t = _check_temperature(temperature)
    draws, log_z = sample_draws(logprobs, n_draws, temperature=t, rng=rng)
    draw_lp = np.take_along_axis(logprobs, draws, 1) if t != 1.0 else None
    return pack_sampled(draws, vocab_size=v, temperature=t, draw_logprobs=draw_lp, log_z=log_z, delta=delta,
                        value_dtype=value_dtype)


def pack_sampled(draws: np.ndarray, *, vocab_size: int, temperature: float = 1.0,
                 draw_logprobs: np.ndarray | None = None, log_z: np.ndarray | None = None, delta: bool = True,
                 value_dtype: str = "float16") -> dict[str, np.ndarray]:
    """(N, n) ids already drawn (on a capture device, say) -> the ``sampled`` arrays. For temperature
    != 1 the teacher log-probs of the draws (N, n) and log_z (N,) are needed for the weights."""
    v = _check_vocab(vocab_size)
    t = _check_temperature(temperature)
    if value_dtype not in ("float16", "float32"):
        raise EncodingError(f"value_dtype must be 'float16' or 'float32', got {value_dtype!r}")
    if not isinstance(draws, np.ndarray) or draws.ndim != 2 or draws.dtype.kind not in "iu" or draws.shape[1] < 1:
        raise EncodingError(f"draws must be a 2-D integer array (N, n >= 1), got {_desc(draws)}")
    if draws.size and (draws.min() < 0 or draws.max() >= v):
        raise EncodingError(f"draws must be ids in [0, {v})")
    if t != 1.0 and (draw_logprobs is None or log_z is None or draw_logprobs.shape != draws.shape
                     or log_z.shape != draws.shape[:1]):
        raise EncodingError("temperature != 1 needs draw_logprobs (N, n) and log_z (N,) for the importance weights")
    n_draws = draws.shape[1]
    order = np.argsort(draws, axis=1, kind="stable")
    d = np.take_along_axis(draws.astype(np.int64), order, 1)
    new = np.ones_like(d, dtype=bool)
    new[:, 1:] = d[:, 1:] != d[:, :-1]
    uid = d[new]
    row_counts = new.sum(1)
    pos = np.flatnonzero(new.reshape(-1))                             # first draw of each unique id
    counts = np.diff(np.append(pos, d.size))
    out = {"ids": (delta_encode(uid, row_counts) if delta else uid).astype(id_dtype(v)),
           "counts": counts.astype(_count_dtype(n_draws)), "row_counts": row_counts.astype(_count_dtype(n_draws))}
    if t != 1.0:
        out["logprobs"] = np.take_along_axis(draw_logprobs, order, 1)[new].astype(value_dtype)
        out["log_z"] = log_z.astype(np.float32)
    return out


def decode_sampled(arrays: dict[str, np.ndarray], *, temperature: float = 1.0, delta: bool = True,
                   vocab_size: int | None = None) -> SampledRows:
    """Inverse of ``encode_sampled`` (same temperature and delta). Importance log-weights for
    temperature != 1: log w = (1 - 1/T) * logprob + log_z."""
    t = _check_temperature(temperature)
    _require(arrays, ("ids", "counts", "row_counts") + (("logprobs", "log_z") if t != 1.0 else ()), "sampled")
    ids, counts = arrays["ids"], arrays["counts"]
    if ids.ndim != 1 or counts.shape != ids.shape:
        raise EncodingError(f"sampled: ids {ids.shape} and counts {counts.shape} must be flat and of one length")
    rc = _check_counts(arrays["row_counts"], len(ids), "sampled", "row_counts")
    uid = delta_decode(ids, rc) if delta else ids.astype(np.int64)
    if vocab_size is not None and len(uid) and (uid.min() < 0 or uid.max() >= _check_vocab(vocab_size)):
        raise EncodingError(f"sampled: decoded ids fall outside [0, {vocab_size}): wrong delta or vocab_size?")
    c = counts.astype(np.int64)
    if (c < 1).any():
        raise EncodingError("sampled: every stored id must have a count >= 1")
    lw = None
    if t != 1.0:
        lp, log_z = arrays["logprobs"].astype(np.float64), arrays["log_z"].astype(np.float64)
        if lp.shape != ids.shape or log_z.shape != rc.shape:
            raise EncodingError(f"sampled: logprobs {lp.shape} / log_z {log_z.shape} do not match ids / tokens")
        lw = (1.0 - 1.0 / t) * lp + np.repeat(log_z, rc)
    return SampledRows(uid, c, rc, lw, t)


# ---------------------------------------------------------------------------------------------
# hybrid: an exact (compact) head plus draws from the tail beyond it
# ---------------------------------------------------------------------------------------------

def _unique_per_row(draws: np.ndarray, n_per_row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat draws (rows laid end to end, n_per_row each) -> unique ids ascending per row, their counts,
    unique ids per row."""
    row = np.repeat(np.arange(len(n_per_row)), n_per_row)
    order = np.lexsort((draws, row))
    d, r = draws[order], row[order]
    new = np.ones(len(d), dtype=bool)
    new[1:] = (d[1:] != d[:-1]) | (r[1:] != r[:-1])
    pos = np.flatnonzero(new)
    counts = np.diff(np.append(pos, len(d)))
    return d[new], counts, np.bincount(r[new], minlength=len(n_per_row))


def encode_hybrid(logprobs: np.ndarray, *, vocab_size: int | None = None, top_p: float = 1.0, k_max: int = 32,
                  bits: int = 8, lo: float = -16.0, n_draws: int = 16, tail_draws: str = "fixed",
                  rng: np.random.Generator | int | None = None, delta: bool = True) -> dict[str, np.ndarray]:
    """Head: ``encode_compact`` of the top entries (top_p, k_max, bits, lo; id order) with the exact tail
    mass m. Tail: ids drawn with replacement from p restricted to the ids outside the head, n_t per token:
    ``tail_draws="fixed"``: n_t = n_draws; ``"proportional"``: n_t = ceil(n_draws * m) (fewer draws where
    the tail is small: the tail's share of the variance is m^2 / n_t), 0 where m = 0.
    Arrays: the head's ``ids``, ``codes``, ``counts``, ``tail``; the draws' ``tail_ids`` (unique,
    ascending, delta-coded if ``delta``), ``tail_counts``, ``tail_row_counts``. n_t = per-token sum of
    tail_counts. Estimator: targets = head p' renormalised to 1 - m, and m * count / n_t on drawn ids;
    unbiased for the full CE up to the head's quantisation (``max_abs_error``; see ``decode_hybrid``)."""
    if not isinstance(logprobs, np.ndarray) or logprobs.ndim != 2 or logprobs.dtype.kind != "f":
        raise EncodingError(f"logprobs must be a 2-D float array (N, V), got {_desc(logprobs)}")
    v = logprobs.shape[1]
    if vocab_size is not None and _check_vocab(vocab_size) != v:
        raise EncodingError(f"vocab_size={vocab_size} but logprobs has V={v} columns")
    n_draws = _check_int("n_draws", n_draws, 1, 0xFFFF)
    if tail_draws not in ("fixed", "proportional"):
        raise EncodingError(f"tail_draws must be 'fixed' or 'proportional', got {tail_draws!r}")
    k_max = _check_int("k_max", k_max, 1, v)
    cid, clp, ctail = select_topk(logprobs, k_max)
    head = encode_compact(cid, clp, ctail, vocab_size=v, top_p=top_p, k_max=k_max, bits=bits, lo=lo, order="id",
                          delta=delta)
    hc = head["counts"].astype(np.int64)
    m = head["tail"].astype(np.float64)
    n_t = np.full(len(m), n_draws, dtype=np.int64) if tail_draws == "fixed" else \
        np.ceil(n_draws * m - 1e-12).astype(np.int64)
    n_t[m <= 0] = 0
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    u = rng.random(int(n_t.sum()))
    draws = np.empty(len(u), dtype=np.int64)
    pos = 0
    for i in np.flatnonzero(n_t):
        x = logprobs[i].astype(np.float64)
        x[cid[i, :hc[i]]] = -np.inf
        mx = x.max()
        if not math.isfinite(mx):                     # nothing outside the head: no tail to draw from
            n_t[i] = 0
            continue
        cdf = np.cumsum(np.exp(x - mx))
        k = n_t[i]
        draws[pos:pos + k] = np.minimum(np.searchsorted(cdf, u[pos:pos + k] * cdf[-1], side="right"), v - 1)
        pos += k
    draws = draws[:pos]
    uid, counts, row_counts = _unique_per_row(draws, n_t)
    cdt = _count_dtype(n_draws)
    head.update({"tail_ids": (delta_encode(uid, row_counts) if delta else uid).astype(id_dtype(v)),
                 "tail_counts": counts.astype(cdt), "tail_row_counts": row_counts.astype(cdt)})
    return head


def pack_hybrid(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, *, head_counts: np.ndarray,
                tail_draws: np.ndarray, tail_n: np.ndarray, vocab_size: int, k_max: int = 16, bits: int = 10,
                lo: float = -16.0, delta: bool = True) -> dict[str, np.ndarray]:
    """Candidates (N, K) + a head chosen on the capture device (``head_counts`` (N,)) + ids drawn there
    from p restricted to the ids outside the head (``tail_draws`` (N, n), of which the first
    ``tail_n`` (N,) count) -> the ``hybrid`` arrays (as ``encode_hybrid`` returns them)."""
    v = _check_vocab(vocab_size)
    head = encode_compact(ids, logprobs, tail, vocab_size=v, top_p=1.0, k_max=k_max, bits=bits, lo=lo, order="id",
                          delta=delta, counts=head_counts)
    if not isinstance(tail_draws, np.ndarray) or tail_draws.ndim != 2 or tail_draws.shape[0] != ids.shape[0]:
        raise EncodingError(f"tail_draws must be (N={ids.shape[0]}, n), got {_desc(tail_draws)}")
    n_t = np.asarray(tail_n, dtype=np.int64)
    if n_t.shape != (ids.shape[0],) or (n_t < 0).any() or (n_t > tail_draws.shape[1]).any():
        raise EncodingError(f"tail_n must be (N,) in [0, {tail_draws.shape[1]}]")
    take = np.arange(tail_draws.shape[1])[None, :] < n_t[:, None]
    draws = tail_draws[take].astype(np.int64)
    if draws.size and (draws.min() < 0 or draws.max() >= v):
        raise EncodingError(f"tail_draws must be ids in [0, {v})")
    uid, counts, row_counts = _unique_per_row(draws, n_t)
    cdt = _count_dtype(tail_draws.shape[1])
    head.update({"tail_ids": (delta_encode(uid, row_counts) if delta else uid).astype(id_dtype(v)),
                 "tail_counts": counts.astype(cdt), "tail_row_counts": row_counts.astype(cdt)})
    return head


def decode_hybrid(arrays: dict[str, np.ndarray], *, vocab_size: int, bits: int = 8, lo: float = -16.0,
                  delta: bool = True) -> TargetRows:
    """Inverse of ``encode_hybrid`` (same vocab_size, bits, lo, delta) as target weights per token: the
    head's decoded p' scaled to sum to 1 - m (so only the split of the head's exact mass carries the
    quantisation error: each head target within a factor exp(+-2 * max_abs_error) of p), then m * c / n_t
    on the drawn tail ids. Per token the targets sum to 1 (to 1 - m if no tail draw was stored)."""
    _require(arrays, ("ids", "codes", "counts", "tail", "tail_ids", "tail_counts", "tail_row_counts"), "hybrid")
    head = decode_compact({k: arrays[k] for k in ("ids", "codes", "counts", "tail")}, vocab_size=vocab_size,
                          bits=bits, lo=lo, order="id", delta=delta)
    tid, tc = arrays["tail_ids"], arrays["tail_counts"]
    if tid.ndim != 1 or tc.shape != tid.shape:
        raise EncodingError(f"hybrid: tail_ids {tid.shape} and tail_counts {tc.shape} must be flat and of one length")
    trc = _check_counts(arrays["tail_row_counts"], len(tid), "hybrid", "tail_row_counts")
    if len(trc) != head.num_tokens:
        raise EncodingError(f"hybrid: tail_row_counts has {len(trc)} tokens, the head {head.num_tokens}")
    uid = delta_decode(tid, trc) if delta else tid.astype(np.int64)
    if len(uid) and (uid.min() < 0 or uid.max() >= vocab_size):
        raise EncodingError(f"hybrid: decoded tail ids fall outside [0, {vocab_size}): wrong delta or vocab_size?")
    c = tc.astype(np.int64)
    n = len(head.counts)
    hrow = np.repeat(np.arange(n), head.counts)
    trow = np.repeat(np.arange(n), trc)
    m = head.tail.astype(np.float64)
    e = np.exp(head.logprobs.astype(np.float64))
    hsum = np.bincount(hrow, e, n)
    h_t = e * ((1.0 - m) / np.where(hsum > 0, hsum, 1.0))[hrow]
    n_t = np.bincount(trow, c, n).astype(np.float64)
    t_t = m[trow] * c / np.where(n_t > 0, n_t, 1.0)[trow]
    order = np.argsort(np.concatenate([hrow, trow]), kind="stable")
    return TargetRows(np.concatenate([head.ids, uid])[order], np.concatenate([h_t, t_t])[order],
                      head.counts + trc)


# ---------------------------------------------------------------------------------------------
# Size on storage
# ---------------------------------------------------------------------------------------------

def payload_bytes(arrays: dict[str, np.ndarray], codec: str = "blosc-zstd-shuffle", *, level: int = 5,
                  chunk_bytes: int = 1 << 20) -> dict[str, int]:
    """Compressed bytes per array with a format codec (numcodecs: ``blosc-zstd-shuffle`` (the format's
    auto choice for these arrays), ``blosc-zstd-bitshuffle``, ``zstd``), compressing ~chunk_bytes of
    raw data at a time as the format's chunks do; plus ``total``."""
    import numcodecs

    if codec == "zstd":
        comp = numcodecs.Zstd(level=level)
    elif codec in ("blosc-zstd-shuffle", "blosc-zstd-bitshuffle"):
        shuffle = numcodecs.Blosc.SHUFFLE if codec.endswith("-shuffle") else numcodecs.Blosc.BITSHUFFLE
        comp = numcodecs.Blosc(cname="zstd", clevel=level, shuffle=shuffle)
    else:
        raise EncodingError(f"codec must be one of blosc-zstd-shuffle, blosc-zstd-bitshuffle, zstd; got {codec!r}")
    out = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.ndim == 0:
            out[name] = a.nbytes
            continue
        rows = max(1, chunk_bytes // max(1, a.nbytes // max(1, len(a))))
        out[name] = sum(len(comp.encode(a[s:s + rows])) for s in range(0, len(a), rows))
    out["total"] = sum(out.values())
    return out
