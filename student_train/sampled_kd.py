"""Losses on the decoded encodings of ``logitcache.format.encodings`` (issue 7).

* ``bucket_forward_kl``: forward KL with the tail bucket (as ``losses.distillation_loss(kind="forward_kl",
  tail=BUCKET)``) for ragged rows (adaptive / compact: a different number of ids per token, padded with
  id -1) and an explicit, exact tail mass per token (None: derived as 1 - sum exp(logprobs)). Teacher:
  the k_t ids plus one tail outcome, p = softmax([lp_1..lp_k, log m]) (the renormalisation only matters
  when the stored values are rounded); student: q_i = softmax(z)_{id_i}, q_tail = the exact mass of the
  complement. On rows where the student's complement is empty m is dropped (it can only be rounding).
  Rows with no stored id are skipped (weight 0).
* ``sampled_cross_entropy``: the Sparse Logit Sampling estimator (arXiv 2503.16870). Per token, n draws
  from the proposal r (r = p at temperature 1); with c_i the draws of id i and w_i = p_i / r_i,

      CE_hat = -(1/n) sum_i c_i w_i log q_i,   E[CE_hat] = sum_j n r_j w_j (-log q_j) / n = CE(p, q)

  over the FULL vocabulary, because E[c_i] = n r_i. The gradient is linear in the c_i, so
  E[d CE_hat / dz] = d CE(p, q) / dz = q - p as well (at temperature 1: (sum_i c_i/n) q - c/n).
* ``sparse_cross_entropy``: -sum_i t_i log q_i for target weights t (``TargetRows``: hybrid encoding,
  or sampled counts turned into weights); unbiased for CE(p, q) whenever E[t_i] = p_i for every id.
  Gradient: (sum_i t_i) q - t.
* ``sampled_forward_kl``: CE_hat - H(p) with the cache's exact teacher entropy: an unbiased estimate of
  KL(p || q) with the same gradient (it can be negative on one draw).
* ``kd_loss``: dispatch on a decoded ``SparseRows`` (bucket) / ``SampledRows`` or ``TargetRows``
  (CE_hat - H): the one call a training loop needs for any encoding.
* Hybrid (``encode_hybrid``: exact compact head + draws from the tail beyond it): targets = head values
  scaled to the exact head mass 1 - m, plus m * c_j / n_t on the drawn tail ids; E[t_j] = p_j off the
  head, so the estimate is unbiased up to the head's quantisation, and its noise comes from the tail only.
* ``dense_cross_entropy`` / ``dense_forward_kl``: full-vocabulary references from full teacher log-probs.

All take student_logits (N, V) (any float dtype; maths in float32, float64 for float64 logits), work on
the student's log-softmax with the memory-saving kernel of ``student_train.losses`` (only per-row
scalars saved for backward), and return the weighted mean over tokens (``reduction="mean"``, like
``distillation_loss``) or per-token values (``reduction="none"``). Teacher tensors get no gradient.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.format.encodings import SampledRows, SparseRows, TargetRows

from .losses import DEFAULT_CHUNK_ROWS, StudentLogProbsAtIds, forward_kl, ids_cover_vocab, teacher_tail_log_mass

__all__ = ["bucket_forward_kl", "sparse_cross_entropy", "sampled_cross_entropy", "sampled_forward_kl",
           "estimated_forward_kl", "kd_loss",
           "dense_cross_entropy", "dense_forward_kl"]

_NEG_INF = float("-inf")


def _cdt(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_logits(student_logits) -> tuple[int, int]:
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point() \
            or student_logits.dim() != 2:
        raise ValueError("student_logits must be a floating-point (N, V) tensor, got "
                         + (f"shape {tuple(student_logits.shape)} dtype {student_logits.dtype}"
                            if isinstance(student_logits, torch.Tensor) else type(student_logits).__name__))
    return student_logits.shape[0], student_logits.shape[1]


def _as_tensor(x, name: str, shape: tuple, *, integer: bool, device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor or numpy array, got {type(x).__name__}")
    if integer and (x.is_floating_point() or x.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if not integer and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match the expected {tuple(shape)}")
    return x.to(device)


def _weights(mask, n: int, cdt, device) -> torch.Tensor:
    """(N,) weights in the compute dtype from None (all 1), a bool mask or float weights >= 0."""
    if mask is None:
        return torch.ones(n, dtype=cdt, device=device)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n,):
        raise ValueError(f"mask must be a bool or float tensor of shape ({n},), got "
                         + (f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__))
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be bool or floating point, got dtype {mask.dtype}")
    m = mask.detach().to(device=device, dtype=cdt)
    if bool((~torch.isfinite(m) | (m < 0)).any()):
        raise ValueError("mask weights must be finite and >= 0")
    return m


def _reduce(per_token: torch.Tensor, w: torch.Tensor, reduction: str) -> torch.Tensor:
    per_token = torch.where(w > 0, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token * (w > 0)
    total, wsum = (per_token * w).sum(), w.sum()
    return total / torch.where(wsum > 0, wsum, torch.ones_like(wsum))


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _sanitize_ids(ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding (-1) -> the row's first id (a duplicate: harmless for the complement and, with zero
    teacher weight, for the gradient). Returns (ids int64, present mask)."""
    ids = ids.to(torch.int64)
    present = ids >= 0
    if bool((ids >= vocab).any()) or bool((ids < -1).any()):
        bad = ids[(ids >= vocab) | (ids < -1)][0].item()
        raise ValueError(f"ids has {bad}: ids must be in [0, V={vocab}) or -1 for padding")
    if bool((present[:, 1:] & ~present[:, :-1]).any()):
        raise ValueError("ids padding (-1) must come after a row's stored ids")
    first = torch.where(present[:, :1], ids[:, :1], torch.zeros_like(ids[:, :1]))
    return torch.where(present, ids, first.expand_as(ids)), present


def bucket_forward_kl(student_logits: torch.Tensor, ids, logprobs, tail=None, mask=None, *,
                      reduction: str = "mean", chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Forward KL over the stored ids plus one tail bucket (module docstring).

    ids (N, W) int, -1 padding at the end of a row; logprobs (N, W) float (-inf or anything in padding);
    tail (N,) exact teacher mass outside the ids, or None to derive 1 - sum exp(logprobs) (clamped at 0);
    mask (N,) bool or float weights. Distinct ids per row are assumed (the encoders guarantee it).
    """
    _check_reduction(reduction)
    n, vocab = _check_logits(student_logits)
    dev, cdt = student_logits.device, _cdt(student_logits)
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != n:
        raise ValueError(f"ids must be an (N={n}, W) integer tensor, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    ids = _as_tensor(ids, "ids", tuple(ids.shape), integer=True, device=dev)
    lp = _as_tensor(logprobs, "logprobs", tuple(ids.shape), integer=False, device=dev).detach().to(cdt)
    ids, present = _sanitize_ids(ids, vocab)
    lp = torch.where(present, lp, torch.full_like(lp, _NEG_INF))
    if bool((lp.isnan() | (lp > 0)).any()):
        raise ValueError("logprobs must be <= 0 and not NaN on stored ids")
    w = _weights(mask, n, cdt, dev)
    valid = (w > 0) & present[:, 0]
    if tail is None:
        m = (-torch.expm1(torch.logsumexp(lp, -1))).clamp_min(0.0)
    else:
        m = _as_tensor(tail, "tail", (n,), integer=False, device=dev).detach().to(cdt)
        if bool((m.isnan() | (m < 0) | (m > 1)).any()):
            raise ValueError("tail must be a mass in [0, 1]")
    ids = torch.where(valid[:, None], ids, torch.zeros_like(ids))
    logq_ids, logq_tail = StudentLogProbsAtIds.apply(student_logits, ids, valid, chunk_rows, True, cdt)
    log_m = teacher_tail_log_mass(m, ids_cover_vocab(present, n, ids.shape[1], vocab))
    logp = torch.log_softmax(torch.cat([lp, log_m[:, None]], -1), -1)
    logp = torch.where(valid[:, None], logp, torch.full_like(logp, _NEG_INF))   # invalid rows: no terms
    logq = torch.cat([logq_ids, logq_tail[:, None]], -1)
    return _reduce(forward_kl(logp, logq), torch.where(valid, w, torch.zeros_like(w)), reduction)


def _ids_arg(ids, n: int, dev) -> torch.Tensor:
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != n:
        raise ValueError(f"ids must be an (N={n}, W) integer tensor, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    return _as_tensor(ids, "ids", tuple(ids.shape), integer=True, device=dev)


def sparse_cross_entropy(student_logits: torch.Tensor, ids, targets, mask=None, *, reduction: str = "mean",
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """-sum_i t_i log q_{id_i} per token: ids (N, W) int (-1 padding at the end of a row), targets (N, W)
    float >= 0 (0 in padding), unbiased estimates of the teacher's p on the ids. Rows without targets
    are skipped."""
    _check_reduction(reduction)
    n, vocab = _check_logits(student_logits)
    dev, cdt = student_logits.device, _cdt(student_logits)
    ids = _ids_arg(ids, n, dev)
    t = _as_tensor(targets, "targets", tuple(ids.shape), integer=False, device=dev).detach().to(cdt)
    ids, present = _sanitize_ids(ids, vocab)
    if bool((~torch.isfinite(t) | (t < 0)).any()) or bool(((t > 0) & ~present).any()):
        raise ValueError("targets must be finite, >= 0, and 0 in padding")
    w = _weights(mask, n, cdt, dev)
    valid = (w > 0) & (t.sum(-1) > 0)
    t = torch.where(present, t, torch.zeros_like(t))
    ids = torch.where(valid[:, None], ids, torch.zeros_like(ids))
    logq, _ = StudentLogProbsAtIds.apply(student_logits, ids, valid, chunk_rows, False, cdt)
    per_token = -(t * logq).sum(-1)
    return _reduce(per_token, torch.where(valid, w, torch.zeros_like(w)), reduction)


def sampled_cross_entropy(student_logits: torch.Tensor, ids, counts, log_weights=None, mask=None, *,
                          reduction: str = "mean", chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Unbiased estimate of the full-vocabulary CE(p_teacher, q_student) from sampled ids.

    ids (N, W) int (-1 padding at the end of a row), counts (N, W) int draws per id (0 in padding),
    log_weights (N, W) float log(p/r) (None: proposal at T=1, weights 1). n per token = sum of counts.
    Targets t = counts * exp(log_weights) / n, then ``sparse_cross_entropy``.
    """
    _check_reduction(reduction)
    n, _ = _check_logits(student_logits)
    dev, cdt = student_logits.device, _cdt(student_logits)
    ids = _ids_arg(ids, n, dev)
    c = _as_tensor(counts, "counts", tuple(ids.shape), integer=True, device=dev).to(cdt)
    present = ids >= 0
    if bool((c < 0).any()) or bool(((c > 0) & ~present).any()):
        raise ValueError("counts must be >= 0, and 0 in padding")
    lw = torch.zeros_like(c) if log_weights is None else \
        _as_tensor(log_weights, "log_weights", tuple(ids.shape), integer=False, device=dev).detach().to(cdt)
    if bool((~torch.isfinite(lw) & present).any()):
        raise ValueError("log_weights must be finite on stored ids")
    draws = c.sum(-1)
    per_draw = 1.0 / torch.where(draws > 0, draws, torch.ones_like(draws))
    t = c * torch.where(present, lw, torch.zeros_like(lw)).exp() * per_draw[:, None]
    return sparse_cross_entropy(student_logits, ids, t, mask, reduction=reduction, chunk_rows=chunk_rows)


def sampled_forward_kl(student_logits: torch.Tensor, ids, counts, entropy, log_weights=None, mask=None, *,
                       reduction: str = "mean", chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """CE_hat - H(p): unbiased for KL(p || q); ``entropy`` (N,) is the cache's exact teacher entropy."""
    _check_reduction(reduction)
    n, _ = _check_logits(student_logits)
    h = _as_tensor(entropy, "entropy", (n,), integer=False, device=student_logits.device).detach()
    ce = sampled_cross_entropy(student_logits, ids, counts, log_weights, mask, reduction="none",
                               chunk_rows=chunk_rows)
    drawn = torch.as_tensor(counts).to(student_logits.device).sum(-1) > 0      # rows with draws
    w = _weights(mask, n, ce.dtype, student_logits.device) * drawn
    return _reduce(ce - h.to(ce.dtype), w, reduction)


def estimated_forward_kl(student_logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor,
                         entropy: torch.Tensor, mask: torch.Tensor | None = None, *,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """The training-loop form for sampled / hybrid caches: logits (..., V), ids / targets (..., W) as the
    loader pads them (-1 / 0), entropy and mask (...) -> weighted mean of CE_hat - H(p), an unbiased
    estimate of forward KL(p_teacher || q_student) with the gradient of the full-vocabulary loss in
    expectation. No temperature: the estimator is for the teacher's distribution at T=1."""
    v = student_logits.shape[-1]
    z = student_logits.reshape(-1, v)
    n = z.shape[0]
    m = None if mask is None else mask.reshape(n)
    t = targets.reshape(n, -1)
    ce = sparse_cross_entropy(z, ids.reshape(n, -1), t, m, reduction="none", chunk_rows=chunk_rows)
    h = _as_tensor(entropy.reshape(n), "entropy", (n,), integer=False, device=z.device).detach().to(ce.dtype)
    return _reduce(ce - h, _weights(m, n, ce.dtype, z.device) * (t.sum(-1) > 0), "mean")


def kd_loss(student_logits: torch.Tensor, decoded: SparseRows | SampledRows | TargetRows, mask=None, *,
            entropy=None, reduction: str = "mean", chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Forward-KL distillation loss from a decoded encoding: ``bucket_forward_kl`` for SparseRows; for
    SampledRows / TargetRows the estimate CE_hat - H(p) with the cache's exact ``entropy`` (N,), or
    CE_hat alone if entropy is None (same gradient)."""
    if isinstance(decoded, SparseRows):
        ids, lp = decoded.padded()
        return bucket_forward_kl(student_logits, ids, lp, decoded.tail, mask, reduction=reduction,
                                 chunk_rows=chunk_rows)
    if isinstance(decoded, SampledRows):
        decoded = decoded.to_targets()
    if isinstance(decoded, TargetRows):
        ids, t = decoded.padded()
        if entropy is None:
            return sparse_cross_entropy(student_logits, ids, t, mask, reduction=reduction, chunk_rows=chunk_rows)
        n, _ = _check_logits(student_logits)
        h = _as_tensor(entropy, "entropy", (n,), integer=False, device=student_logits.device).detach()
        ce = sparse_cross_entropy(student_logits, ids, t, mask, reduction="none", chunk_rows=chunk_rows)
        has = torch.as_tensor(t).to(student_logits.device).sum(-1) > 0           # rows with targets
        return _reduce(ce - h.to(ce.dtype), _weights(mask, n, ce.dtype, student_logits.device) * has, reduction)
    raise ValueError(f"decoded must be a SparseRows, SampledRows or TargetRows, got {type(decoded).__name__}")


def _dense_teacher(student_logits: torch.Tensor, teacher_logprobs, reduction: str):
    """Checks of the dense references: (N, compute dtype, teacher log-probs (N, V) in it, detached)."""
    _check_reduction(reduction)
    n, vocab = _check_logits(student_logits)
    cdt = _cdt(student_logits)
    lp = _as_tensor(teacher_logprobs, "teacher_logprobs", (n, vocab), integer=False,
                    device=student_logits.device).detach().to(cdt)
    return n, cdt, lp


def dense_cross_entropy(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, mask=None, *,
                        reduction: str = "mean") -> torch.Tensor:
    """Full-vocabulary CE(p, q) = -sum_j p_j log q_j from full (N, V) teacher log-probs (reference)."""
    n, cdt, lp = _dense_teacher(student_logits, teacher_logprobs, reduction)
    logq = torch.log_softmax(student_logits.to(cdt), -1)
    p = lp.exp()
    per_token = -(p * torch.where(p > 0, logq, torch.zeros_like(logq))).sum(-1)
    return _reduce(per_token, _weights(mask, n, cdt, student_logits.device), reduction)


def dense_forward_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, mask=None, *,
                     reduction: str = "mean") -> torch.Tensor:
    """Full-vocabulary KL(p || q) = CE(p, q) - H(p) (reference)."""
    n, cdt, lp = _dense_teacher(student_logits, teacher_logprobs, reduction)
    p = lp.exp()
    h = -(p * torch.where(p > 0, lp, torch.zeros_like(lp))).sum(-1)
    ce = dense_cross_entropy(student_logits, lp, None, reduction="none")
    return _reduce(ce - h, _weights(mask, n, cdt, student_logits.device), reduction)

