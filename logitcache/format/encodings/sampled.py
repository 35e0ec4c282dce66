"""``sampled`` (Sparse Logit Sampling, arXiv 2503.16870): per token ``draws`` ids drawn with
replacement from the proposal r = softmax(logits / temperature) over the full vocabulary; an unbiased
estimate of the teacher's p, trainable with forward KL / cross-entropy at T = 1 only.

The proposal temperature is >= 1: then w = p/r <= sum_j p_j^(1/T) is bounded (below 1 the weights of
rare ids are unbounded and the estimate heavy-tailed, so it is refused). Arrays: ``dist/counts``
(token: distinct ids drawn), ``dist/ids`` (entry: ascending, delta-coded), ``dist/draw_counts``
(entry: draws of each id; they sum to ``draws`` per token); if temperature != 1 also
``dist/logprobs`` (entry: the teacher's log-prob at T=1) and ``dist/log_z`` (token: logsumexp(logprobs
/ T)), giving the importance weights w = exp((1 - 1/T) lp + log_z). The estimator is
``student_train.sampled_kd.sampled_cross_entropy``.
"""

from __future__ import annotations

import math

import numpy as np

from ..dtypes import count_dtype, id_dtype
from ..errors import EncodingError
from ..specs import ArraySpec, entry_spec, token_spec
from .base import Encoding, ExtraSpec, Param, dist, inner, register, stored
from .coding import (
    check_int,
    check_temperature,
    check_value_dtype,
    check_vocab,
    delta_decode,
    delta_encode,
    describe,
    ragged_arrays,
    require,
)
from .rows import SampledRows


def draws_problem(v) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 0xFFFF
    return None if ok else "must be an int in [1, 65535]"


def temperature_problem(v) -> str | None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and float(v) >= 1
    return None if ok else "must be >= 1 (below 1 the importance weights are unbounded)"


def draws_param(default: int) -> Param:
    return Param("draws", default, "--draws", draws_problem, "draws per token")


def sample_draws(logprobs: np.ndarray, n_draws: int, *, temperature: float = 1.0,
                 rng: np.random.Generator | int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, n_draws) ids drawn with replacement from softmax(logprobs / temperature) (inverse CDF in
    float64, one row at a time), and log_z (N,) = logsumexp(logprobs / temperature)."""
    if not isinstance(logprobs, np.ndarray) or logprobs.ndim != 2 or logprobs.dtype.kind != "f":
        raise EncodingError(f"logprobs must be a 2-D float array (N, V), got {describe(logprobs)}")
    n_draws = check_int("n_draws", n_draws, 1, 0xFFFF)
    t = check_temperature(temperature)
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
    unique ids (ascending; delta-coded if ``delta``), how many draws hit each (``draw_counts``), unique
    ids per token (``counts``), and for temperature != 1 their log-probs (value_dtype) and log_z."""
    v = logprobs.shape[1] if isinstance(logprobs, np.ndarray) and logprobs.ndim == 2 else None
    if v is None:
        raise EncodingError(f"logprobs must be a 2-D float array (N, V), got {describe(logprobs)}")
    if vocab_size is not None and check_vocab(vocab_size) != v:
        raise EncodingError(f"vocab_size={vocab_size} but logprobs has V={v} columns")
    t = check_temperature(temperature)
    draws, log_z = sample_draws(logprobs, n_draws, temperature=t, rng=rng)
    draw_lp = np.take_along_axis(logprobs, draws, 1) if t != 1.0 else None
    return pack_sampled(draws, vocab_size=v, temperature=t, draw_logprobs=draw_lp, log_z=log_z, delta=delta,
                        value_dtype=value_dtype)


def pack_sampled(draws: np.ndarray, *, vocab_size: int, temperature: float = 1.0,
                 draw_logprobs: np.ndarray | None = None, log_z: np.ndarray | None = None, delta: bool = True,
                 value_dtype: str = "float16") -> dict[str, np.ndarray]:
    """(N, n) ids already drawn (on a capture device, say) -> the ``sampled`` arrays. For temperature
    != 1 the teacher log-probs of the draws (N, n) and log_z (N,) are needed for the weights."""
    v = check_vocab(vocab_size)
    t = check_temperature(temperature)
    check_value_dtype(value_dtype)
    if not isinstance(draws, np.ndarray) or draws.ndim != 2 or draws.dtype.kind not in "iu" or draws.shape[1] < 1:
        raise EncodingError(f"draws must be a 2-D integer array (N, n >= 1), got {describe(draws)}")
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
    counts = new.sum(1)                                               # distinct ids per token
    pos = np.flatnonzero(new.reshape(-1))                             # first draw of each unique id
    hits = np.diff(np.append(pos, d.size))
    out = {"ids": (delta_encode(uid, counts) if delta else uid).astype(id_dtype(v)),
           "draw_counts": hits.astype(count_dtype(n_draws)), "counts": counts.astype(count_dtype(n_draws))}
    if t != 1.0:
        out["logprobs"] = np.take_along_axis(draw_logprobs, order, 1)[new].astype(value_dtype)
        out["log_z"] = log_z.astype(np.float32)
    return out


def decode_sampled(arrays: dict[str, np.ndarray], *, temperature: float = 1.0, delta: bool = True,
                   vocab_size: int | None = None) -> SampledRows:
    """Inverse of ``encode_sampled`` (same temperature and delta). Importance log-weights for
    temperature != 1: log w = (1 - 1/T) * logprob + log_z."""
    t = check_temperature(temperature)
    require(arrays, ("ids", "draw_counts", "counts") + (("logprobs", "log_z") if t != 1.0 else ()), "sampled")
    ids, hits, counts = ragged_arrays(arrays, "sampled", "draw_counts", tail=False)
    uid = delta_decode(ids, counts) if delta else ids.astype(np.int64)
    if vocab_size is not None and len(uid) and (uid.min() < 0 or uid.max() >= check_vocab(vocab_size)):
        raise EncodingError(f"sampled: decoded ids fall outside [0, {vocab_size}): wrong delta or vocab_size?")
    c = hits.astype(np.int64)
    if (c < 1).any():
        raise EncodingError("sampled: every stored id must have a draw count >= 1")
    lw = None
    if t != 1.0:
        lp, log_z = arrays["logprobs"].astype(np.float64), arrays["log_z"].astype(np.float64)
        if lp.shape != ids.shape or log_z.shape != counts.shape:
            raise EncodingError(f"sampled: logprobs {lp.shape} / log_z {log_z.shape} do not match ids / tokens")
        lw = (1.0 - 1.0 / t) * lp + np.repeat(log_z, counts)
    return SampledRows(uid, c, counts, lw, t)


def draw_specs(vocab_size: int, draws: int, prefix: str, descriptions: tuple[str, str, str]) -> list[ArraySpec]:
    """The three arrays of drawn ids (sampled; hybrid's tail with ``prefix`` "tail_"): distinct ids per
    token (``dist/<prefix>counts``), the ids ascending and delta-coded, and the draws of each."""
    d, counts = count_dtype(draws), dist(f"{prefix}counts")
    return [token_spec(counts, d, True, descriptions[0]),
            entry_spec(dist(f"{prefix}ids"), id_dtype(vocab_size), True, descriptions[1], counts),
            entry_spec(dist(f"{prefix}draw_counts"), d, True, descriptions[2], counts)]


@register
class Sampled(Encoding):
    name = "sampled"
    params = (draws_param(64), Param("temperature", 1.0, "--proposal-temperature", temperature_problem,
                                     "the proposal temperature of the draws (not the generation's, not the loss's)"))
    default_top_k = 1
    needs_full_distribution = True
    reads_top_k = False
    estimated = True
    summary = "--draws ids drawn from the teacher (unbiased; forward KL / CE only)"

    def specs(self, vocab_size: int, logprob_dtype: str, top_k: int) -> list[ArraySpec]:
        out = draw_specs(vocab_size, self["draws"], "", ("distinct ids among this token's draws from the teacher",
                         "drawn ids ascending within a token, delta-coded: first id, then gaps",
                         "how many of the token's draws hit each id"))
        if self["temperature"] != 1.0:
            out += [entry_spec(dist("logprobs"), logprob_dtype, logprob_dtype == "float32",
                               "teacher log-prob (T=1) of each drawn id, for the importance weights", dist("counts"),
                               float("nan")),
                    token_spec(dist("log_z"), "float32", True, "logsumexp(logprobs / temperature) of the proposal",
                               float("nan"))]
        return out

    def width(self, top_k: int) -> int:
        return self["draws"]

    def extras(self, top_k: int, vocab_size: int) -> list[ExtraSpec]:
        n = self["draws"]
        out = [ExtraSpec("draws", (n,), "int64", 0, "draws")]
        if float(self["temperature"]) != 1.0:
            out += [ExtraSpec("draw_logprobs", (n,), "float32", float("nan"), "draws"),
                    ExtraSpec("log_z", (), "float32", float("nan"), "draws")]
        return out

    def encode(self, top_k, vocab_size, ids, logprobs, tail, extras, value_dtype):
        t = float(self["temperature"])
        return stored(pack_sampled(extras["draws"], vocab_size=vocab_size, temperature=t,
                                   draw_logprobs=extras.get("draw_logprobs"), log_z=extras.get("log_z"),
                                   value_dtype=value_dtype))

    def decode(self, arrays: dict[str, np.ndarray], vocab_size: int) -> SampledRows:
        return decode_sampled(inner(arrays), temperature=float(self["temperature"]), vocab_size=vocab_size)
