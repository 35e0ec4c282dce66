"""``hybrid`` (head exact, tail sampled): a compact head of the top ``k`` ids with log-prob >= ``lo``
and its exact tail mass m, plus ``ceil(draws * m)`` ids drawn from the teacher's distribution
restricted to the ids outside the head. Decoded as target weights: the head's values scaled to its
exact mass 1 - m, the drawn ids m * draw count / n_t: an unbiased estimate of the full-vocabulary CE
up to the head's quantisation, with the sampling noise confined to the tail (variance ~ m^2 / n_t
instead of ~ 1 / n). Trainable with forward KL / cross-entropy at T = 1 only.

Arrays: the head's ``dist/counts``, ``dist/ids``, ``dist/codes``, ``dist/tail`` (as ``compact``), and
``dist/tail_counts`` (token: distinct ids drawn from the tail), ``dist/tail_ids`` (entry, index
``dist/tail_counts``, ascending, delta-coded), ``dist/tail_draw_counts`` (entry: draws of each).
"""

from __future__ import annotations

import math

import numpy as np

from ..dtypes import count_dtype, id_dtype
from ..errors import EncodingError
from ..specs import ArraySpec
from .adaptive import TAIL_EXTRA, head_counts_spec, tail_spec
from .base import Encoding, ExtraSpec, dist, inner, register, stored
from .coding import (check_counts, check_int, check_vocab, delta_decode, delta_encode, describe, max_abs_error,
                     require, select_topk, unique_per_row)
from .compact import LO, bits_param, code_specs, decode_compact, encode_compact
from .rows import TargetRows
from .sampled import draw_specs, draws_param


def _tail_arrays(draws: np.ndarray, n_t: np.ndarray, max_draws: int, v: int, delta: bool) -> dict[str, np.ndarray]:
    uid, hits, counts = unique_per_row(draws, n_t)
    cdt = count_dtype(max_draws)
    return {"tail_ids": (delta_encode(uid, counts) if delta else uid).astype(id_dtype(v)),
            "tail_draw_counts": hits.astype(cdt), "tail_counts": counts.astype(cdt)}


def encode_hybrid(logprobs: np.ndarray, *, vocab_size: int | None = None, top_p: float = 1.0, k_max: int = 32,
                  bits: int = 8, lo: float = -16.0, n_draws: int = 16, tail_draws: str = "fixed",
                  rng: np.random.Generator | int | None = None, delta: bool = True) -> dict[str, np.ndarray]:
    """Head: ``encode_compact`` of the top entries (top_p, k_max, bits, lo; id order) with the exact tail
    mass m. Tail: ids drawn with replacement from p restricted to the ids outside the head, n_t per token:
    ``tail_draws="fixed"``: n_t = n_draws; ``"proportional"``: n_t = ceil(n_draws * m) (fewer draws where
    the tail is small: the tail's share of the variance is m^2 / n_t), 0 where m = 0.
    Arrays: the head's ``ids``, ``codes``, ``counts``, ``tail``; the draws' ``tail_ids`` (unique,
    ascending, delta-coded if ``delta``), ``tail_draw_counts``, ``tail_counts``. n_t = per-token sum of
    tail_draw_counts. Estimator: targets = head p' renormalised to 1 - m, and m * draw count / n_t on
    drawn ids; unbiased for the full CE up to the head's quantisation (see ``decode_hybrid``)."""
    if not isinstance(logprobs, np.ndarray) or logprobs.ndim != 2 or logprobs.dtype.kind != "f":
        raise EncodingError(f"logprobs must be a 2-D float array (N, V), got {describe(logprobs)}")
    v = logprobs.shape[1]
    if vocab_size is not None and check_vocab(vocab_size) != v:
        raise EncodingError(f"vocab_size={vocab_size} but logprobs has V={v} columns")
    n_draws = check_int("n_draws", n_draws, 1, 0xFFFF)
    if tail_draws not in ("fixed", "proportional"):
        raise EncodingError(f"tail_draws must be 'fixed' or 'proportional', got {tail_draws!r}")
    k_max = check_int("k_max", k_max, 1, v)
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
    head.update(_tail_arrays(draws[:pos], n_t, n_draws, v, delta))
    return head


def pack_hybrid(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, *, head_counts: np.ndarray,
                tail_draws: np.ndarray, tail_n: np.ndarray, vocab_size: int, k_max: int = 16, bits: int = 10,
                lo: float = -16.0, delta: bool = True) -> dict[str, np.ndarray]:
    """Candidates (N, K) + a head chosen on the capture device (``head_counts`` (N,)) + ids drawn there
    from p restricted to the ids outside the head (``tail_draws`` (N, n), of which the first
    ``tail_n`` (N,) count) -> the ``hybrid`` arrays (as ``encode_hybrid`` returns them)."""
    v = check_vocab(vocab_size)
    head = encode_compact(ids, logprobs, tail, vocab_size=v, top_p=1.0, k_max=k_max, bits=bits, lo=lo, order="id",
                          delta=delta, counts=head_counts)
    if not isinstance(tail_draws, np.ndarray) or tail_draws.ndim != 2 or tail_draws.shape[0] != ids.shape[0]:
        raise EncodingError(f"tail_draws must be (N={ids.shape[0]}, n), got {describe(tail_draws)}")
    n_t = np.asarray(tail_n, dtype=np.int64)
    if n_t.shape != (ids.shape[0],) or (n_t < 0).any() or (n_t > tail_draws.shape[1]).any():
        raise EncodingError(f"tail_n must be (N,) in [0, {tail_draws.shape[1]}]")
    take = np.arange(tail_draws.shape[1])[None, :] < n_t[:, None]
    draws = tail_draws[take].astype(np.int64)
    if draws.size and (draws.min() < 0 or draws.max() >= v):
        raise EncodingError(f"tail_draws must be ids in [0, {v})")
    head.update(_tail_arrays(draws, n_t, tail_draws.shape[1], v, delta))
    return head


def decode_hybrid(arrays: dict[str, np.ndarray], *, vocab_size: int, bits: int = 8, lo: float = -16.0,
                  delta: bool = True) -> TargetRows:
    """Inverse of ``encode_hybrid`` (same vocab_size, bits, lo, delta) as target weights per token: the
    head's decoded p' scaled to sum to 1 - m (so only the split of the head's exact mass carries the
    quantisation error: each head target within a factor exp(+-2 * max_abs_error) of p), then m * c / n_t
    on the drawn tail ids. Per token the targets sum to 1 (to 1 - m if no tail draw was stored)."""
    require(arrays, ("ids", "codes", "counts", "tail", "tail_ids", "tail_draw_counts", "tail_counts"), "hybrid")
    head = decode_compact({k: arrays[k] for k in ("ids", "codes", "counts", "tail")}, vocab_size=vocab_size,
                          bits=bits, lo=lo, order="id", delta=delta)
    tid, tc = arrays["tail_ids"], arrays["tail_draw_counts"]
    if tid.ndim != 1 or tc.shape != tid.shape:
        raise EncodingError(f"hybrid: tail_ids {tid.shape} and tail_draw_counts {tc.shape} must be flat and of one "
                            "length")
    trc = check_counts(arrays["tail_counts"], len(tid), "hybrid", "tail_counts")
    if len(trc) != head.num_tokens:
        raise EncodingError(f"hybrid: tail_counts has {len(trc)} tokens, the head {head.num_tokens}")
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


@register
class Hybrid(Encoding):
    name = "hybrid"
    params = (bits_param(10), LO, draws_param(64))
    default_top_k = 16
    needs_full_distribution = True
    estimated = True
    summary = "exact top-k head + draws from the tail (unbiased; forward KL / CE only)"

    def specs(self, vocab_size: int, logprob_dtype: str, top_k: int) -> list[ArraySpec]:
        return [head_counts_spec(top_k, "the k most probable ids with log-prob >= lo (the exact head)"),
                *code_specs(vocab_size, self["bits"], self["lo"], dist("counts")), tail_spec(),
                *draw_specs(vocab_size, self["draws"], "tail_", (
                    "distinct ids drawn from the tail (p outside the head)",
                    "drawn tail ids ascending within a token, delta-coded",
                    "how many of the token's ceil(draws * tail) draws hit each"))]

    def width(self, top_k: int) -> int:
        return top_k + self["draws"]

    def value_tolerance(self, value_dtype: str) -> tuple[float, float]:
        return max_abs_error(self["bits"], self["lo"]), 0.0     # of the head's log-probs

    def extras(self, top_k: int, vocab_size: int) -> list[ExtraSpec]:
        n = self["draws"]
        return [TAIL_EXTRA, ExtraSpec("head_counts", (), "int64", 0, "hybrid_tail"),
                ExtraSpec("tail_draws", (n,), "int64", 0, "hybrid_tail"),
                ExtraSpec("tail_n", (), "int64", 0, "hybrid_tail")]

    def encode(self, top_k, vocab_size, ids, logprobs, tail, extras, value_dtype):
        return stored(pack_hybrid(ids, logprobs, tail, head_counts=extras["head_counts"],
                                  tail_draws=extras["tail_draws"], tail_n=extras["tail_n"], vocab_size=vocab_size,
                                  k_max=top_k, bits=self["bits"], lo=self["lo"]))

    def decode(self, arrays: dict[str, np.ndarray], vocab_size: int) -> TargetRows:
        return decode_hybrid(inner(arrays), vocab_size=vocab_size, bits=self["bits"], lo=self["lo"])
