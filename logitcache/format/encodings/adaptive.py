"""``adaptive``: per token the smallest prefix of the sorted distribution whose mass reaches ``top_p``
(the keep mass), at most ``k`` entries, with fp16/32 values and the exact tail.

Arrays: ``dist/counts`` (token: entries per token, uint8/16), ``dist/ids`` (entry: rank order),
``dist/logprobs`` (entry, float16/32), ``dist/tail`` (token, float32). **The tail is stored, exact**:
derived from fp16 values it would be off by up to ~sum(p) * 2^-11 (5e-4 absolute), i.e. 5 % of a
0.01 tail, and it is what the tail bucket of the loss is made of; it costs ~3 B/token compressed.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import count_dtype, id_dtype
from ..specs import ArraySpec, entry_spec, token_spec
from .base import Encoding, ExtraSpec, Param, dist, inner, register, stored
from .coding import (
    adaptive_counts,
    check_candidates,
    check_int,
    check_top_p,
    check_value_dtype,
    check_vocab,
    ragged_arrays,
    tails_after,
)
from .rows import SparseRows


def keep_mass_problem(v) -> str | None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < float(v) <= 1
    return None if ok else "must be in (0, 1]"


KEEP_MASS = Param("top_p", 0.99, "--keep-mass", keep_mass_problem,
                  "the mass each token's stored ids reach (manifest key top_p, format 1.2)")
TAIL_EXTRA = ExtraSpec("tail", (), "float32", float("nan"), "tail")


def encode_adaptive(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, *, vocab_size: int,
                    top_p: float = 0.99, k_max: int = 128, value_dtype: str = "float16") -> dict[str, np.ndarray]:
    """Per token the smallest rank-order prefix with mass >= top_p, at most k_max (and at most K) entries.
    Returns ``ids`` (M,), ``logprobs`` (M,) value_dtype, ``counts`` (N,), ``tail`` (N,) float32 exact."""
    v = check_vocab(vocab_size)
    ids, lp, t = check_candidates(ids, logprobs, tail, v)
    top_p = check_top_p(top_p)
    k_max = check_int("k_max", k_max, 1)
    check_value_dtype(value_dtype)
    counts = adaptive_counts(lp, top_p, k_max)
    keep = np.arange(ids.shape[1])[None, :] < counts[:, None]
    return {"ids": ids[keep].astype(id_dtype(v)), "logprobs": lp[keep].astype(value_dtype),
            "counts": counts.astype(count_dtype(k_max)), "tail": tails_after(lp, t, counts).astype(np.float32)}


def decode_adaptive(arrays: dict[str, np.ndarray]) -> SparseRows:
    ids, lp, counts, tail = ragged_arrays(arrays, "adaptive", "logprobs", tail=True)
    return SparseRows(ids.astype(np.int64), lp.astype(np.float32), counts, tail.astype(np.float32))


def head_counts_spec(top_k: int, head: str) -> ArraySpec:
    return token_spec(dist("counts"), count_dtype(top_k), True, f"entries of this token: {head}")


def tail_spec() -> ArraySpec:
    return token_spec(dist("tail"), "float32", True, "exact teacher mass outside this token's stored ids", float("nan"))


@register
class Adaptive(Encoding):
    name = "adaptive"
    params = (KEEP_MASS,)
    default_top_k = 128
    stores_tail = True
    summary = "per token the fewest ids with mass >= --keep-mass, at most --top-k, fp16 values, exact tail"

    def specs(self, vocab_size: int, logprob_dtype: str, top_k: int) -> list[ArraySpec]:
        return [head_counts_spec(top_k, "the smallest set of most probable ids with mass >= top_p, at most k"),
                entry_spec(dist("ids"), id_dtype(vocab_size), True, "ids, by descending log-probability", dist("counts")),
                entry_spec(dist("logprobs"), logprob_dtype, logprob_dtype == "float32",
                           "log-softmax (T=1, full vocabulary) of those ids", dist("counts"), float("nan")),
                tail_spec()]

    def extras(self, top_k: int, vocab_size: int) -> list[ExtraSpec]:
        return [TAIL_EXTRA]

    def encode(self, top_k, vocab_size, ids, logprobs, tail, extras, value_dtype):
        return stored(encode_adaptive(ids, logprobs, tail, vocab_size=vocab_size, top_p=self["top_p"], k_max=top_k,
                                      value_dtype=value_dtype))

    def decode(self, arrays: dict[str, np.ndarray], vocab_size: int) -> SparseRows:
        return decode_adaptive(inner(arrays))
