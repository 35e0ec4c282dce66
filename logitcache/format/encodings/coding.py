"""What the encodings share: argument checks, the top-k candidates of full log-probs, delta coding of
ragged rows, the log-scale quantiser, and unique ids per row of draws. Pure numpy, array in / array out."""

from __future__ import annotations

import math

import numpy as np

from ..dtypes import count_dtype
from ..errors import EncodingError
from .rows import offsets

VALUE_DTYPES = ("float16", "float32")


# ---- argument checks ----------------------------------------------------------------------------
def describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"a {x.dtype} array of shape {x.shape}"
    return f"a {type(x).__name__}"


def check_vocab(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise EncodingError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return int(vocab_size)


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo \
            or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise EncodingError(f"{name} must be an int {rng}, got {value!r}")
    return int(value)


def check_top_p(top_p) -> float:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating)) or not 0.0 < float(top_p) <= 1.0:
        raise EncodingError(f"top_p must be a number in (0, 1], got {top_p!r}")
    return float(top_p)


def check_value_dtype(value_dtype: str) -> str:
    if value_dtype not in VALUE_DTYPES:
        raise EncodingError(f"value_dtype must be 'float16' or 'float32', got {value_dtype!r}")
    return value_dtype


def check_temperature(temperature) -> float:
    """A proposal temperature for draws: finite and >= 1 (below 1 the importance weights are unbounded)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise EncodingError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature < 1:
        raise EncodingError(f"temperature={temperature!r}: a proposal temperature below 1 gives unbounded importance "
                            "weights p/r (heavy-tailed, unreliable estimates); use temperature >= 1")
    return float(temperature)


def check_candidates(ids, logprobs, tail, vocab_size: int):
    """Candidates (ids (N, K), logprobs (N, K) in rank order, tail (N,)) checked -> (int64, float32, float64)."""
    if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise EncodingError(f"ids must be a 2-D integer array (N, K), got {describe(ids)}")
    if not isinstance(logprobs, np.ndarray) or logprobs.dtype.kind != "f" or logprobs.shape != ids.shape:
        raise EncodingError(f"logprobs must be a float array of the ids' shape {ids.shape}, got {describe(logprobs)}")
    if not isinstance(tail, np.ndarray) or tail.dtype.kind != "f" or tail.shape != ids.shape[:1]:
        raise EncodingError(f"tail must be a float array of shape ({ids.shape[0]},), got {describe(tail)}")
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


def require(arrays: dict, names: tuple[str, ...], encoding: str) -> None:
    if not isinstance(arrays, dict):
        raise EncodingError(f"{encoding}: expected a dict of arrays, got {type(arrays).__name__}")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise EncodingError(f"{encoding}: missing array(s) {', '.join(missing)}; have {', '.join(arrays) or 'none'}")


def check_counts(counts: np.ndarray, total: int, encoding: str, what: str = "counts") -> np.ndarray:
    if counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise EncodingError(f"{encoding}: {what} must be a 1-D integer array, got {describe(counts)}")
    c = counts.astype(np.int64)
    if (c < 0).any() or int(c.sum()) != total:
        raise EncodingError(f"{encoding}: {what} sum to {int(c.sum())} but there are {total} stored entries")
    return c


def counts_as(counts: np.ndarray, max_count: int) -> np.ndarray:
    return counts.astype(count_dtype(max_count))


# ---- candidates from full log-probs ------------------------------------------------------------
def select_topk(logprobs: np.ndarray, k: int, *, block_rows: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full (N, V) log-probs -> (ids (N, k) int64, logprobs (N, k) float32 descending (ties by id),
    tail (N,) float32 = sum of exp(logprobs) over the other V - k ids, summed directly in float64)."""
    if not isinstance(logprobs, np.ndarray) or logprobs.ndim != 2 or logprobs.dtype.kind != "f":
        raise EncodingError(f"logprobs must be a 2-D float array (N, V), got {describe(logprobs)}")
    n, v = logprobs.shape
    k = check_int("k", k, 1, v)
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


def adaptive_counts(lp: np.ndarray, top_p: float, k_max: int) -> np.ndarray:
    """Smallest r with sum_{i<r} p_i >= top_p, capped at min(k_max, K); at least 1."""
    cum = np.cumsum(np.exp(lp.astype(np.float64)), axis=1)
    r = (cum < top_p).sum(1) + 1
    return np.minimum(r, min(k_max, lp.shape[1])).astype(np.int64)


def tails_after(lp: np.ndarray, t: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exact tail of each token's prefix: the candidates' tail plus the mass of candidates >= count
    (summed directly, no cancellation)."""
    e = np.exp(lp.astype(np.float64))
    e[np.arange(lp.shape[1])[None, :] < counts[:, None]] = 0.0
    return t + e.sum(1)


# ---- delta coding of ragged rows (plain integer arrays, exact inverse) -------------------------
def delta_encode(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row: first value as is, then ``values[i] - values[i-1]``. int64 in, int64 out."""
    v = values.astype(np.int64)
    d = v.copy()
    d[1:] -= v[:-1]
    starts = offsets(counts)[:-1][counts > 0]
    d[starts] = v[starts]
    return d


def ragged_arrays(arrays: dict, encoding: str, values: str, tail: bool) -> tuple[np.ndarray, ...]:
    """Check the stored arrays of a ragged encoding: ``ids`` and ``values`` (entry, flat, one length),
    ``counts`` (token) adding up to them and, with ``tail``, a per-token ``tail``. Returns
    (ids, values, counts int64[, tail]) as stored (counts excepted)."""
    require(arrays, ("ids", values, "counts") + (("tail",) if tail else ()), encoding)
    ids, vals = arrays["ids"], arrays[values]
    if ids.ndim != 1 or vals.shape != ids.shape:
        raise EncodingError(f"{encoding}: ids {ids.shape} and {values} {vals.shape} must be flat and of one length")
    counts = check_counts(arrays["counts"], len(ids), encoding)
    if not tail:
        return ids, vals, counts
    if arrays["tail"].shape != counts.shape:
        raise EncodingError(f"{encoding}: tail shape {arrays['tail'].shape} does not match {len(counts)} tokens")
    return ids, vals, counts, arrays["tail"]


def delta_decode(deltas: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Inverse of ``delta_encode``: per-row cumulative sum."""
    c = np.cumsum(deltas.astype(np.int64))
    off = offsets(counts)
    before = np.where(off[:-1] > 0, c[np.maximum(off[:-1] - 1, 0)] if len(c) else 0, 0)
    return c - np.repeat(before, counts)


# ---- log-scale quantisation ------------------------------------------------------------------
def quantization_step(bits: int, lo: float) -> float:
    """Log-prob step of ``bits``-bit codes over [lo, 0]."""
    bits = check_int("bits", bits, 1, 16)
    if not isinstance(lo, (int, float, np.floating)) or not math.isfinite(lo) or lo >= 0:
        raise EncodingError(f"lo must be a finite negative log-probability, got {lo!r}")
    return -float(lo) / ((1 << bits) - 1)


def max_abs_error(bits: int, lo: float) -> float:
    """The stated bound on |decoded log-prob - log-prob| of a quantised entry: half a step."""
    return quantization_step(bits, lo) / 2


# ---- draws --------------------------------------------------------------------------------------
def unique_per_row(draws: np.ndarray, n_per_row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat draws (rows laid end to end, n_per_row each) -> unique ids ascending per row, how many
    draws hit each, unique ids per row."""
    row = np.repeat(np.arange(len(n_per_row)), n_per_row)
    order = np.lexsort((draws, row))
    d, r = draws[order], row[order]
    new = np.ones(len(d), dtype=bool)
    new[1:] = (d[1:] != d[:-1]) | (r[1:] != r[:-1])
    pos = np.flatnonzero(new)
    hits = np.diff(np.append(pos, len(d)))
    return d[new], hits, np.bincount(r[new], minlength=len(n_per_row))


# ---- size on storage --------------------------------------------------------------------------
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
