"""``topk``: per token the k most probable ids and their log-probs, as they are (the layout of format
1.0 and 1.1, and the reference the other encodings are measured against).

Arrays: ``topk_ids`` (N, k) uint, ``topk_logprobs`` (N, k) float16/32 in rank order. The tail is
derived (1 - sum exp(logprobs)); ``encode_topk(store_tail=True)`` also returns it exactly (benchmarks).
"""

from __future__ import annotations

import numpy as np

from ..dtypes import id_dtype
from ..errors import EncodingError
from ..specs import TOPK_IDS, TOPK_LOGPROBS, ArraySpec
from .base import Encoding, register
from .coding import check_candidates, check_int, check_value_dtype, check_vocab, require
from .rows import SparseRows


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, *, vocab_size: int, k: int,
                value_dtype: str = "float16", store_tail: bool = False) -> dict[str, np.ndarray]:
    """The first k candidates as they are stored: ``ids`` (N, k), ``logprobs`` (N, k) value_dtype,
    plus ``tail`` (N,) float32 (the candidates' tail plus the mass of candidates k..K-1) if store_tail."""
    v = check_vocab(vocab_size)
    ids, lp, t = check_candidates(ids, logprobs, tail, v)
    k = check_int("k", k, 1, ids.shape[1])
    check_value_dtype(value_dtype)
    out = {"ids": ids[:, :k].astype(id_dtype(v)), "logprobs": lp[:, :k].astype(value_dtype)}
    if store_tail:
        out["tail"] = (t + np.exp(lp[:, k:].astype(np.float64)).sum(1)).astype(np.float32)
    return out


def decode_topk(arrays: dict[str, np.ndarray]) -> SparseRows:
    require(arrays, ("ids", "logprobs"), "topk")
    ids, lp = arrays["ids"], arrays["logprobs"]
    if ids.ndim != 2 or lp.shape != ids.shape:
        raise EncodingError(f"topk: ids {ids.shape} and logprobs {lp.shape} must be (N, k) of one shape")
    tail = arrays.get("tail")
    if tail is not None and tail.shape != ids.shape[:1]:
        raise EncodingError(f"topk: tail shape {tail.shape} does not match {ids.shape[0]} tokens")
    n, k = ids.shape
    return SparseRows(ids.reshape(-1).astype(np.int64), lp.reshape(-1).astype(np.float32),
                      np.full(n, k, dtype=np.int64), None if tail is None else tail.astype(np.float32))


def topk_specs(vocab_size: int, logprob_dtype: str, top_k: int) -> list[ArraySpec]:
    ids = id_dtype(vocab_size)
    return [
        ArraySpec(TOPK_IDS, ids, ids, (top_k,), 0, True,
                  "ids of the k most probable next tokens, by descending log-probability"),
        ArraySpec(TOPK_LOGPROBS, logprob_dtype, logprob_dtype, (top_k,), float("nan"), logprob_dtype == "float32",
                  "log-softmax (T=1, full vocabulary) of those ids"),
    ]


@register
class TopK(Encoding):
    name = "topk"
    default_top_k = 64
    ragged = False
    summary = "k ids + fp16 log-probs (the 1.1 layout)"

    def specs(self, vocab_size: int, logprob_dtype: str, top_k: int) -> list[ArraySpec]:
        return topk_specs(vocab_size, logprob_dtype, top_k)

    def describe(self, top_k: int) -> str:
        return f"top-k {top_k}" if self.name == TopK.name else super().describe(top_k)

    def stored_names(self) -> list[str]:
        return [TOPK_IDS, TOPK_LOGPROBS]

    def encode_rows(self, top_k, vocab_size, cand_ids, cand_logprobs, extras, scored, value_dtype="float16"):
        """The candidates are the stored rows (a backend makes exactly k, fill values where not scored)."""
        return {TOPK_IDS: cand_ids[:, :top_k].astype(id_dtype(vocab_size)),
                TOPK_LOGPROBS: cand_logprobs[:, :top_k].astype(value_dtype)}

    def decode(self, arrays: dict[str, np.ndarray], vocab_size: int) -> SparseRows:
        return decode_topk({"ids": arrays[TOPK_IDS], "logprobs": arrays[TOPK_LOGPROBS]})
