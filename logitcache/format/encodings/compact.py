"""``compact`` (the default): the adaptive selection, entries below ``lo`` left to the tail, values
quantised on a log scale to ``bits`` bits, ids sorted and delta-coded: ~70 B/token.

``q = round((lp - lo) / step)``, ``step = -lo / (2^bits - 1)``, decoded ``lp' = lo + q * step``;
**|lp' - lp| <= step / 2** for every stored entry (``max_abs_error``). Entries with lp < lo are not
stored: their mass goes to the (exact) tail, so the bound holds for all stored entries.
``order="id"`` (the format's): ids ascending within a token, delta-coded if ``delta`` (first id
absolute, then the gaps, all >= 1), codes in that id order; the rank order is recovered by sorting the
codes (ties, i.e. equal decoded values, come back in id order). ``order="rank"`` (benchmarks): ids raw
in rank order, codes non-increasing, delta-coded if ``delta`` (first code absolute, then
``q[i-1] - q[i] >= 0``). Arrays: ``dist/counts`` (token), ``dist/ids`` (entry), ``dist/codes`` (entry,
uint8 if bits <= 8 else uint16), ``dist/tail`` (token, float32).
"""

from __future__ import annotations

import numpy as np

from ..dtypes import count_dtype, id_dtype
from ..errors import EncodingError
from ..specs import ArraySpec, entry_spec
from .adaptive import KEEP_MASS, TAIL_EXTRA, head_counts_spec, tail_spec
from .base import Encoding, ExtraSpec, Param, dist, inner, register, stored
from .coding import (
    adaptive_counts,
    check_candidates,
    check_int,
    check_top_p,
    check_vocab,
    delta_decode,
    delta_encode,
    max_abs_error,
    quantization_step,
    ragged_arrays,
    tails_after,
)
from .rows import SparseRows, offsets


def bits_problem(v) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 16 else "must be an int in [2, 16]"


def lo_problem(v) -> str | None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and -1e6 < float(v) < 0
    return None if ok else "must be a negative log-probability"


def bits_param(default: int) -> Param:
    return Param("bits", default, "--bits", bits_problem, "bits per log-prob code")


LO = Param("lo", -16.0, None, lo_problem, "the lowest log-prob a code represents (entries below go to the tail)")


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
    v = check_vocab(vocab_size)
    ids, lp, t = check_candidates(ids, logprobs, tail, v)
    top_p = check_top_p(top_p)
    k_max = check_int("k_max", k_max, 1)
    step = quantization_step(bits, lo)
    order = _check_order(order)
    if counts is None:
        counts = np.minimum(adaptive_counts(lp, top_p, k_max), (lp >= lo).sum(1))  # sorted: a prefix
    else:
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (ids.shape[0],) or (counts < 0).any() or (counts > min(k_max, ids.shape[1])).any():
            raise EncodingError(f"counts must be (N={ids.shape[0]},) in [0, {min(k_max, ids.shape[1])}]")
        below = np.arange(ids.shape[1])[None, :] < counts[:, None]
        if (below & (lp < lo - quantization_step(bits, lo) / 2)).any():
            raise EncodingError(f"counts keep an entry below lo={lo}: it cannot be quantised within the bound")
    keep = np.arange(ids.shape[1])[None, :] < counts[:, None]
    new_tail = tails_after(lp, t, counts)
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
        starts = offsets(counts)[:-1][counts > 0]
        codes[starts] = -codes[starts]                                # ... and the first code as is
    return {"ids": fid.astype(id_dtype(v)), "codes": codes.astype(np.uint8 if bits <= 8 else np.uint16),
            "counts": counts.astype(count_dtype(k_max)), "tail": new_tail.astype(np.float32)}


def rank_order(fid: np.ndarray, q: np.ndarray, counts: np.ndarray, top: int) -> np.ndarray:
    """The permutation that puts each token's entries (ids ``fid`` in id order, codes ``q`` in [0, top])
    in rank order: code descending, equal codes by ascending id. Ids stored ascending within a token (as
    every writer of this format stores them) need only a stable sort on (token, -code): two passes of
    numpy's radix sort on small integer keys, 6-8x faster than the three-key lexsort, which remains for
    ids stored in another order."""
    n, m = len(counts), len(fid)
    new_token = np.zeros(m, dtype=bool)
    new_token[offsets(counts)[:-1][counts > 0]] = True
    ascending = bool((np.diff(fid)[~new_token[1:]] > 0).all()) if m > 1 else True
    if not ascending or top >= 1 << 16:
        return np.lexsort((fid, -q, np.repeat(np.arange(n), counts)))
    key = (top - q).astype(np.uint8 if top < 1 << 8 else np.uint16)
    by_code = np.argsort(key, kind="stable")                          # ids stay ascending within a code
    row = np.repeat(np.arange(n, dtype=np.uint16 if n <= 1 << 16 else np.int64), counts)
    return by_code[np.argsort(row[by_code], kind="stable")]


def decode_compact(arrays: dict[str, np.ndarray], *, vocab_size: int, bits: int = 8, lo: float = -16.0,
                   order: str = "id", delta: bool = True) -> SparseRows:
    """Inverse of ``encode_compact`` (same keyword parameters): rows in rank order, log-probs within
    ``max_abs_error(bits, lo)`` of the encoded ones, the exact tail."""
    v = check_vocab(vocab_size)
    step = quantization_step(bits, lo)
    order = _check_order(order)
    ids, codes, counts, tail = ragged_arrays(arrays, "compact", "codes", tail=True)
    fid, q = ids.astype(np.int64), codes.astype(np.int64)
    top = (1 << bits) - 1
    if order != "id" and delta:
        starts = offsets(counts)[:-1][counts > 0]
        d = -q
        d[starts] = q[starts]
        q = delta_decode(d, counts)
    if len(q) and (q.min() < 0 or q.max() > top):
        raise EncodingError(f"compact: decoded codes fall outside [0, {top}]: wrong bits/order/delta?")
    if order == "id":
        if delta:
            fid = delta_decode(fid, counts)
        perm = rank_order(fid, q, counts, top)
        fid, q = fid[perm], q[perm]
    if len(fid) and (fid.min() < 0 or fid.max() >= v):
        raise EncodingError(f"compact: decoded ids fall outside [0, {v}): wrong order/delta or vocab_size?")
    return SparseRows(fid, (lo + q * step).astype(np.float32), counts, tail.astype(np.float32))


def code_specs(vocab_size: int, bits: int, lo: float, index: str) -> list[ArraySpec]:
    """Delta-coded ids and their log-scale codes, located by the count array ``index``."""
    err = max_abs_error(bits, lo)
    return [entry_spec(dist("ids"), id_dtype(vocab_size), True,
                       "ids ascending within a token, delta-coded: first id, then gaps", index),
            entry_spec(dist("codes"), "uint8" if bits <= 8 else "uint16", False,
                       f"log-prob codes q in id order: logprob = lo + q * (-lo / (2^bits - 1)), "
                       f"bits={bits}, lo={lo}, |error| <= {err:.3g}", index)]


@register
class Compact(Encoding):
    name = "compact"
    params = (KEEP_MASS, bits_param(8), LO)
    default_top_k = 64
    stores_tail = True
    summary = "adaptive with ids delta-coded and --bits-bit log-scale values (the default: ~70 B/token)"

    def specs(self, vocab_size: int, logprob_dtype: str, top_k: int) -> list[ArraySpec]:
        head = "the smallest set of most probable ids with mass >= top_p, at most k, log-prob >= lo"
        return [head_counts_spec(top_k, head), *code_specs(vocab_size, self["bits"], self["lo"], dist("counts")),
                tail_spec()]

    def extras(self, top_k: int, vocab_size: int) -> list[ExtraSpec]:
        return [TAIL_EXTRA]

    def value_tolerance(self, value_dtype: str) -> tuple[float, float]:
        return max_abs_error(self["bits"], self["lo"]), 0.0

    def encode(self, top_k, vocab_size, ids, logprobs, tail, extras, value_dtype):
        return stored(encode_compact(ids, logprobs, tail, vocab_size=vocab_size, top_p=self["top_p"], k_max=top_k,
                                     bits=self["bits"], lo=self["lo"]))

    def decode(self, arrays: dict[str, np.ndarray], vocab_size: int) -> SparseRows:
        return decode_compact(inner(arrays), vocab_size=vocab_size, bits=self["bits"], lo=self["lo"])
