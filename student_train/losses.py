"""Distillation losses for a student trained from a logitcache cache.

The cache holds, per token position, the teacher's distribution in one of the registered encodings
(logitcache.format.encodings). Every encoding decodes, before it reaches this module, to one of two
target types (student_train/targets.py): a sparse row (up to k teacher ids with their log-probs,
log-softmax at T=1 over the full vocabulary V, sorted descending, plus the exact tail mass outside
the ids where the encoding stores it: adaptive, compact; for topk and full the loss derives it as
1 - sum exp(log-probs)) or an estimated target (sampled ids with importance weights: sampled,
hybrid; see ``sampled_kd``). This module holds the losses on
sparse rows; the stored precision (fp16/fp32 values, 8/10-bit codes) is the encoding's business. The
student produces logits (N, V) for the same positions. Everything here is a pure function of tensors,
plus the ``TailPolicy`` enum, a small validated ``DistillationConfig`` and one ``HiddenStateProjector``
module for feature distillation.

How the two distributions are made comparable (``TailPolicy``):

* ``BUCKET`` (default): both distributions are coarsened to k+1 outcomes, the k stored ids plus one
  "tail" outcome holding all the remaining mass. Teacher: p_i = exp(lp_i), p_tail = m = 1 - sum_i p_i
  (clamped at 0; the k+1 values are then renormalised, which only matters when fp16 rounding made
  sum_i p_i > 1). Student: q_i = softmax(z)_{id_i}, q_tail = sum_{j not in ids} softmax(z)_j, computed
  directly as logsumexp(z over the complement) - logsumexp(z), never as 1 - sum q_i (exact, and finite
  gradients when the tail is tiny). On rows whose ids cover all of V the tail outcome does not exist:
  the teacher's m can only be fp16 rounding, so it is dropped and the top-k renormalised. On every
  other row it is kept, so a student that gives the tail no mass at all (logits -inf on the whole
  complement) while the teacher gives it some has an infinite forward KL, as it should.
  At T=1 every divergence on these k+1 outcomes is the exact divergence of the coarsened distributions.
  A row without any stored id (ids all -1) has no teacher distribution: it contributes nothing to
  the loss and does not count in its mean, whatever its weight.
* ``RENORMALIZE``: p_i = exp(lp_i) / sum_j exp(lp_j) and q_i = softmax(z)_{id_i} / sum_j softmax(z)_{id_j}
  over the k stored ids only (biased for small k: arXiv 2503.16870).

Temperature T (Hinton et al. 2015): the student's logits and the teacher's log-probs are divided by T
and renormalised over the stored support; the loss is multiplied by T^2. Under ``RENORMALIZE`` this is
exact: it equals softmax(z/T) and softmax(teacher_logits/T) restricted and renormalised to the k ids.
Under ``BUCKET`` the tail cannot be tempered exactly (its members' logits are not stored), so the tail
is treated as ONE pseudo-token on BOTH sides: its log-mass (log m for the teacher, the exact log q_tail
at T=1 for the student) is divided by T like the real tokens and the k+1 outcomes are renormalised,
i.e. p^(T) = softmax([lp_1..lp_k, log m] / T) and likewise for q. The ratios among the top-k ids are
exactly those of the tempered distributions; only the tail's share is approximate (for T > 1 it is
smaller than the true tempered tail, since sum_j x_j^(1/T) >= (sum_j x_j)^(1/T)). Because the same map
is applied to teacher and student, the loss is still zero exactly when the coarsened T=1 distributions
agree. At T=1 nothing is approximated.

Memory: the student's log-softmax is computed in float32 (float64 if the logits are float64) in row
chunks by a custom autograd Function that saves only per-row scalars (logsumexp over V and over the
complement of the ids) and recomputes softmax(z) chunk by chunk in backward, writing the gradient into
one (N, V) buffer of the logits' dtype. No (N, V) float32 tensor is ever saved for backward.
Measured (bf16 logits N=2048, V=32768, k=64, 128-row chunks, CPU, peak RSS above the inputs for
forward + backward; saved-for-backward bytes via saved_tensors_hooks): plain per-chunk autograd 705 MiB
(514 MiB saved), torch.utils.checkpoint per chunk 401 MiB (its slice backward materialises full-size
gradients; forward runs twice), this Function 169 MiB (1.6 MiB saved; 128 MiB of it is the gradient).
Teacher tensors are constants: no gradient flows into them.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "IGNORE_INDEX", "TailPolicy", "DistillationConfig", "DIVERGENCES",
    "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd", "total_variation",
    "coarsen_distributions", "distillation_loss", "hard_label_cross_entropy", "mix_ce_and_kd",
    "entropy_token_weights", "HiddenStateProjector", "hidden_state_loss", "combine_teacher_losses",
]

IGNORE_INDEX = -100
# 64-128 rows were fastest on 2 CPU cores (N=2048, V=32768; the chunk stays in cache); peak extra
# memory is ~3 x chunk_rows x V x 4 bytes on top of the (N, V) gradient
DEFAULT_CHUNK_ROWS = 128
DEFAULT_TEACHER_FLOOR = 1e-8
_NEG_INF = float("-inf")


class TailPolicy(str, enum.Enum):
    """What to do with the teacher's probability mass outside the stored top-k ids (see module doc)."""

    BUCKET = "bucket"            # k+1 outcomes: the k ids plus one tail bucket, on both sides
    RENORMALIZE = "renormalize"  # k outcomes: both distributions renormalised over the k ids


# ---------------------------------------------------------------------------------------------
# Elementwise helpers, safe at log-prob -inf (value AND gradient)
# ---------------------------------------------------------------------------------------------

def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise a * (log a - log b), with 0 where a == 0 (log a = -inf), whatever log b is.

    Both branches of the ``where`` are sanitised first, so a zero gradient never meets a NaN local
    derivative (the NaN-gradient trap of ``where`` and of ``0 * log 0``).
    """
    pos = log_a > _NEG_INF
    la = torch.where(pos, log_a, torch.zeros_like(log_a))
    lb = torch.where(pos, log_b, torch.zeros_like(log_b))
    return torch.where(pos, la.exp() * (la - lb), torch.zeros_like(la))


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, wa: float, wb: float) -> torch.Tensor:
    """log(wa * a + wb * b) from log a, log b; -inf (with zero, not NaN, gradients) where both terms are 0."""
    x = log_a + (math.log(wa) if wa > 0 else _NEG_INF)
    y = log_b + (math.log(wb) if wb > 0 else _NEG_INF)
    both = (x == _NEG_INF) & (y == _NEG_INF)
    zero = torch.zeros_like(x)
    out = torch.logaddexp(torch.where(both, zero, x), torch.where(both, zero, y))
    return torch.where(both, torch.full_like(out, _NEG_INF), out)


def _check_unit_interval(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_floor(teacher_floor: float) -> None:
    if not (isinstance(teacher_floor, (int, float)) and 0.0 <= float(teacher_floor) < 1.0):
        raise ValueError(f"teacher_floor must be a number in [0, 1), got {teacher_floor!r}")


# ---------------------------------------------------------------------------------------------
# Divergences over K outcomes (K = k+1 with BUCKET, k with RENORMALIZE); all return (N,)
# ---------------------------------------------------------------------------------------------

def forward_kl(teacher_logp: torch.Tensor, student_logq: torch.Tensor) -> torch.Tensor:
    """Forward KL, KL(p_teacher || q_student) = sum_o p_o (log p_o - log q_o)  (mode-covering).

    teacher_logp, student_logq: (N, K) log-probabilities of two distributions over the same K
    outcomes (entries may be -inf). Returns (N,). Terms with p_o = 0 are 0.
    """
    return _kl_terms(teacher_logp, student_logq).sum(-1)


def reverse_kl(teacher_logp: torch.Tensor, student_logq: torch.Tensor, *,
               teacher_floor: float = DEFAULT_TEACHER_FLOOR) -> torch.Tensor:
    """Reverse KL, KL(q_student || p_teacher) = sum_o q_o (log q_o - log p_o)  (mode-seeking; MiniLLM,
    arXiv 2306.08543).

    (N, K), (N, K) -> (N,). The exact value is +inf wherever the teacher gives 0 (a tail mass of 0, a
    -inf cached log-prob) and the student does not, so teacher probabilities are floored at
    ``teacher_floor`` (log p_o >= log teacher_floor; 0 disables the floor). Above the floor it is exact.
    """
    _check_floor(teacher_floor)
    logp = teacher_logp.clamp_min(math.log(teacher_floor)) if teacher_floor > 0 else teacher_logp
    return _kl_terms(student_logq, logp).sum(-1)


def skew_forward_kl(teacher_logp: torch.Tensor, student_logq: torch.Tensor, *, alpha: float = 0.1) -> torch.Tensor:
    """Skew forward KL (DistiLLM, arXiv 2402.03898): KL(p_teacher || alpha p + (1 - alpha) q_student).

    (N, K), (N, K) -> (N,). alpha in [0, 1]; alpha = 0 is ``forward_kl``, alpha = 1 is 0. Finite whenever
    q > 0 on the teacher's support (the mixture is >= alpha p).
    """
    _check_unit_interval("alpha", alpha)
    mix = _log_mix(teacher_logp, student_logq, alpha, 1.0 - alpha)
    return _kl_terms(teacher_logp, mix).sum(-1)


def skew_reverse_kl(teacher_logp: torch.Tensor, student_logq: torch.Tensor, *, alpha: float = 0.1,
                    teacher_floor: float = DEFAULT_TEACHER_FLOOR) -> torch.Tensor:
    """Skew reverse KL (DistiLLM, arXiv 2402.03898): KL(q_student || (1 - alpha) p_teacher + alpha q).

    (N, K), (N, K) -> (N,). alpha in [0, 1]; alpha > 0 keeps it finite without any floor (the mixture is
    >= alpha q); alpha = 0 is ``reverse_kl`` (with its ``teacher_floor``); alpha = 1 is 0.
    """
    _check_unit_interval("alpha", alpha)
    if alpha == 0:
        return reverse_kl(teacher_logp, student_logq, teacher_floor=teacher_floor)
    _check_floor(teacher_floor)
    mix = _log_mix(teacher_logp, student_logq, 1.0 - alpha, alpha)
    return _kl_terms(student_logq, mix).sum(-1)


def generalized_jsd(teacher_logp: torch.Tensor, student_logq: torch.Tensor, *, beta: float = 0.5,
                    teacher_floor: float = DEFAULT_TEACHER_FLOOR) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, arXiv 2306.13649):
    JSD(beta) = beta KL(p_teacher || M) + (1 - beta) KL(q_student || M),  M = beta p + (1 - beta) q.

    (N, K), (N, K) -> (N,). For 0 < beta < 1 it is bounded (<= log 2 scaled) and needs no floor.
    JSD(beta) itself tends to 0 at both ends; the useful limits are JSD(beta)/beta -> KL(p || q) as
    beta -> 0 and JSD(beta)/(1 - beta) -> KL(q || p) as beta -> 1, so (as in TRL's GKD trainer)
    beta = 0 returns ``forward_kl`` and beta = 1 returns ``reverse_kl`` (with ``teacher_floor``).
    Note the change of scale at the end points.
    """
    _check_unit_interval("beta", beta)
    if beta == 0:
        return forward_kl(teacher_logp, student_logq)
    if beta == 1:
        return reverse_kl(teacher_logp, student_logq, teacher_floor=teacher_floor)
    _check_floor(teacher_floor)
    mix = _log_mix(teacher_logp, student_logq, beta, 1.0 - beta)
    return beta * _kl_terms(teacher_logp, mix).sum(-1) + (1.0 - beta) * _kl_terms(student_logq, mix).sum(-1)


def total_variation(teacher_logp: torch.Tensor, student_logq: torch.Tensor) -> torch.Tensor:
    """Total variation distance, TVD(p_teacher, q_student) = 1/2 sum_o |p_o - q_o|, in [0, 1].

    (N, K), (N, K) -> (N,). Symmetric; the subgradient at p_o = q_o is 0.
    """
    return 0.5 * (teacher_logp.exp() - student_logq.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "generalized_jsd": generalized_jsd,
    "total_variation": total_variation,
}
# keyword arguments each divergence accepts (``distillation_loss(..., **kind_kwargs)``)
_KIND_KWARGS: dict[str, tuple[str, ...]] = {
    "forward_kl": (),
    "reverse_kl": ("teacher_floor",),
    "skew_forward_kl": ("alpha",),
    "skew_reverse_kl": ("alpha", "teacher_floor"),
    "generalized_jsd": ("beta", "teacher_floor"),
    "total_variation": (),
}


def _check_kind(kind: str, kind_kwargs: Mapping[str, object]) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"kind={kind!r} is not a known divergence; valid kinds: {', '.join(DIVERGENCES)}")
    allowed = _KIND_KWARGS[kind]
    for name, value in kind_kwargs.items():
        if name not in allowed:
            raise ValueError(f"kind={kind!r} takes no argument {name}={value!r}; it accepts: "
                             f"{', '.join(allowed) if allowed else 'no arguments'}")
        if name in ("alpha", "beta"):
            _check_unit_interval(name, value)  # type: ignore[arg-type]
        else:
            _check_floor(value)  # type: ignore[arg-type]


def _check_tail(tail: TailPolicy | str) -> TailPolicy:
    try:
        return TailPolicy(tail)
    except ValueError:
        raise ValueError(f"tail={tail!r} is not a TailPolicy; valid: "
                         f"{', '.join(p.value for p in TailPolicy)}") from None


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_chunk_rows(chunk_rows: int | None) -> None:
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None (one chunk), got {chunk_rows!r}")


def device_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits a loss works on at once: ``DEFAULT_CHUNK_ROWS`` on the CPU; on an accelerator
    enough rows for ~2^26 values a chunk (256 MiB in float32: 523 rows at V = 128256), since there each
    chunk costs a dozen kernel launches whatever its size. The values do not depend on it."""
    if device.type == "cpu":
        return DEFAULT_CHUNK_ROWS
    return max(DEFAULT_CHUNK_ROWS, (1 << 26) // max(1, int(vocab)))


@dataclass(frozen=True)
class DistillationConfig:
    """The knobs of one distillation loss, validated on construction (kinds, tail, T, CE mix).

    ``loss = ce_alpha * CE(hard labels) + (1 - ce_alpha) * KD``; pass ``kd_kwargs()`` to
    ``distillation_loss``.
    """

    kind: str = "forward_kl"
    tail: TailPolicy = TailPolicy.BUCKET
    temperature: float = 1.0
    ce_alpha: float = 0.0
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS
    kind_kwargs: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_kind(self.kind, self.kind_kwargs)
        object.__setattr__(self, "tail", _check_tail(self.tail))
        _check_temperature(self.temperature)
        _check_unit_interval("ce_alpha", self.ce_alpha)
        _check_chunk_rows(self.chunk_rows)

    def kd_kwargs(self) -> dict:
        return dict(kind=self.kind, tail=self.tail, temperature=self.temperature,
                    chunk_rows=self.chunk_rows, **self.kind_kwargs)


# ---------------------------------------------------------------------------------------------
# The student's log-probs at the stored ids (and its tail), chunked, in fp32
# ---------------------------------------------------------------------------------------------

def _row_chunks(x: torch.Tensor, chunk_rows: int):
    """(start, end, rows) over the rows of x (N, V) or (B, T, V) in flattened order, ``rows`` being a
    view: no copy even when x is a non-contiguous slice such as ``logits[:, :-1]``."""
    if x.dim() == 2:
        blocks = [x]
    else:
        try:
            blocks = [x.view(-1, x.shape[-1])]
        except RuntimeError:  # not viewable as 2-D: walk the batch
            blocks = list(x.unbind(0))
    offset = 0
    for block in blocks:
        for s in range(0, block.shape[0], chunk_rows):
            e = min(s + chunk_rows, block.shape[0])
            yield offset + s, offset + e, block[s:e]
        offset += block.shape[0]


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(len(rows), V) copy of the rows of x (N, V) or (B, T, V) at flattened indices ``rows``; only those
    rows are read, also when x is a non-contiguous slice such as ``logits[:, :-1]``."""
    if x.dim() == 2:
        return x.index_select(0, rows)
    try:
        return x.view(-1, x.shape[-1]).index_select(0, rows)
    except RuntimeError:
        return x[rows // x.shape[1], rows % x.shape[1]]


def _valid_row_chunks(x: torch.Tensor, valid: torch.Tensor, chunk_rows: int):
    """(where, rows) over the rows of x (N, V) or (B, T, V) with ``valid`` (N,) True, ``chunk_rows`` at a
    time: ``where`` a slice (every row valid: ``rows`` is a view) or an index tensor (``rows`` a copy of
    just those rows). Rows with weight 0 (masked prompts, padding, positions ``--token-select`` left
    out) are never read or computed; telling which costs one count of ``valid`` per call."""
    n = valid.numel()
    count = int(valid.sum())
    if count == n:
        for s, e, rows in _row_chunks(x, chunk_rows):
            yield slice(s, e), rows
        return
    idx = torch.nonzero(valid).squeeze(-1)
    for s in range(0, count, chunk_rows):
        r = idx[s:s + chunk_rows]
        yield r, _take_rows(x, r)


class StudentLogProbsAtIds(torch.autograd.Function):
    """logits (N, V) or (B, T, V) with N = B*T, any float dtype, ids (N, k) int64, valid (N,) bool ->
    logq_ids (N, k) = z_id - L and logq_tail (N,) = L_rest - L, in ``compute_dtype``, where
    L = logsumexp_j z_j and L_rest = logsumexp_{j not in ids} z_j (-inf if the complement is empty).

    Every row is shifted by its max M first and L, L_rest are kept shifted (L - M, L_rest - M): the
    differences above then never subtract two large numbers, so log q keeps log_softmax's precision at
    any logit offset (unshifted, logits near 1e4 lose 1e-3 to float32's spacing there).

    Backward (s = softmax(z), r_j = exp(z_j - L_rest) off the ids, 0 on them; g = incoming grads):
        dz_j = sum_o g_o [j = id_o] + g_tail r_j - (sum_o g_o + g_tail) s_j
    recomputed chunk by chunk (M with it); only L - M, L_rest - M (N,) and the ids are saved besides
    the logits themselves. Rows with valid = False are not computed: they read as a row of zero logits would
    (log q = -log V at the ids, log((V - k) / V) for the tail) and get a zero gradient.
    """

    @staticmethod
    def forward(ctx, logits, ids, valid, chunk_rows, with_tail, compute_dtype):
        n, vocab = logits.numel() // logits.shape[-1], logits.shape[-1]
        k = ids.shape[1]
        dev = logits.device
        # rows left out read as zero logits: max 0, L = log V, L_rest = log(V - k)
        lse = torch.full((n,), math.log(vocab), dtype=compute_dtype, device=dev)             # L - M
        lse_rest = torch.full((n,), math.log(vocab - k) if vocab > k else _NEG_INF, dtype=compute_dtype,
                              device=dev)                                                      # L_rest - M
        z_ids = torch.zeros(n, k, dtype=compute_dtype, device=dev)                           # z_id - M
        for where, rows in _valid_row_chunks(logits, valid, chunk_rows):
            z = _shifted_rows(rows, compute_dtype)                           # (c, V)
            lse[where] = torch.logsumexp(z, -1)
            z_ids[where] = z.gather(1, ids[where])
            if with_tail:
                z.scatter_(1, ids[where], _NEG_INF)                           # the complement of the ids
                lse_rest[where] = torch.logsumexp(z, -1)
        ctx.save_for_backward(logits, ids, valid, lse, lse_rest)
        ctx.chunk_rows, ctx.with_tail, ctx.compute_dtype = chunk_rows, with_tail, compute_dtype
        logq_ids = z_ids - lse[:, None]
        logq_tail = lse_rest - lse if with_tail else torch.zeros_like(lse)
        return logq_ids, logq_tail

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ids, g_tail):
        logits, ids, valid, lse, lse_rest = ctx.saved_tensors
        cdt = ctx.compute_dtype
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)  # logits' shape and dtype
        grad_rows = grad.view(-1, grad.shape[-1])                          # (N, V)
        g_ids = g_ids.to(cdt)
        g_tail = g_tail.to(cdt) if ctx.with_tail else torch.zeros_like(lse)
        for where, rows in _valid_row_chunks(logits, valid, ctx.chunk_rows):
            idx, gi, gt = ids[where], g_ids[where], g_tail[where]
            z = _shifted_rows(rows, cdt)                                    # (c, V), the forward's shift
            out = (z - lse[where][:, None]).exp_()                          # softmax(z)
            out.mul_(-(gi.sum(-1) + gt)[:, None])
            if ctx.with_tail:
                rest = lse_rest[where]
                ok = torch.isfinite(rest)                                  # empty complement: r = 0
                z.scatter_(1, idx, _NEG_INF)
                z.sub_(torch.where(ok, rest, torch.zeros_like(rest))[:, None]).exp_()
                z.masked_fill_(~ok[:, None], 0.0)
                out.addcmul_(z, torch.where(ok, gt, torch.zeros_like(gt))[:, None])
            out.scatter_add_(1, idx, gi)
            grad_rows[where] = out.to(grad_rows.dtype)
        return grad, None, None, None, None, None


def _shifted_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A chunk of logits (c, V) in ``dtype``, each row minus its max (0 for a row without a finite
    logit): the same shift whenever the same rows are read, so the backward pass recomputes it."""
    z = rows.to(dtype, copy=True)                                          # (c, V)
    m = z.amax(-1)
    return z.sub_(torch.where(torch.isfinite(m), m, torch.zeros_like(m))[:, None])


# ---------------------------------------------------------------------------------------------
# Argument checking and sanitising
# ---------------------------------------------------------------------------------------------

def _describe(x) -> str:
    """How to name a bad argument in an error: its dtype and shape, or its Python type."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _prepare(student_logits, teacher_ids, teacher_logprobs, mask_or_weights, teacher_tail=None):
    """Check shapes/dtypes/values and flatten the teacher side to rows. Returns z (the logits as given,
    (N, V) or (B, T, V)), ids (N, k) int64, lp (N, k) and w (N,) in the compute dtype, valid (N,) bool,
    present (N, k) bool (False on -1 padding: ragged encodings), tail (N,) or None; masked rows are
    sanitised (ids 0..k-1, log-probs -log k) so garbage there cannot reach the maths."""
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be a floating-point tensor, got {_describe(student_logits)}")
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be (N, V) or (B, T, V), got shape {tuple(student_logits.shape)}")
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if not isinstance(teacher_ids, torch.Tensor) or teacher_ids.is_floating_point() or teacher_ids.dtype == torch.bool:
        raise ValueError(f"teacher_ids must be an integer tensor, got {_describe(teacher_ids)}")
    if tuple(teacher_ids.shape[:-1]) != lead or teacher_ids.dim() != len(lead) + 1:
        raise ValueError(f"teacher_ids shape {tuple(teacher_ids.shape)} does not match student_logits shape "
                         f"{tuple(student_logits.shape)}: expected {lead + ('k',)}")
    k = teacher_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_ids has k={k} ids per row; need 1 <= k <= V={vocab}")
    if not isinstance(teacher_logprobs, torch.Tensor) or not teacher_logprobs.is_floating_point():
        raise ValueError(f"teacher_logprobs must be a floating-point tensor, got {_describe(teacher_logprobs)}")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logprobs shape {tuple(teacher_logprobs.shape)} does not match "
                         f"teacher_ids shape {tuple(teacher_ids.shape)}")
    cdt = _compute_dtype(student_logits)
    w = _weights(mask_or_weights, lead, "mask_or_weights", cdt, student_logits.device)
    n = math.prod(lead)
    z = student_logits  # kept in its own shape: reshaping a sliced (B, T, V) would copy it
    ids = teacher_ids.reshape(n, k).to(torch.int64)
    lp = teacher_logprobs.detach().reshape(n, k).to(cdt)
    # a row without any stored id (all -1: a ragged encoding's unscored or empty row) has no teacher
    # distribution: it contributes nothing and does not count, whatever its weight
    w = torch.where((ids >= 0).any(-1), w.reshape(n), torch.zeros_like(w.reshape(n)))
    valid = w > 0
    ids = torch.where(valid[:, None], ids, torch.arange(k, device=ids.device))
    lp = torch.where(valid[:, None], lp, torch.full_like(lp, -math.log(k)))
    if bool(((ids < -1) | (ids >= vocab)).any()):
        bad = ids[(ids < -1) | (ids >= vocab)][0].item()
        raise ValueError(f"teacher_ids has id {bad} outside [0, V={vocab}) on a row with nonzero weight "
                         "(-1 marks padding after a row's ids)")
    present = ids >= 0
    if k > 1 and bool((present[:, 1:] & ~present[:, :-1]).any()):
        raise ValueError("teacher_ids padding (-1) must come after a row's stored ids")
    if k > 1:
        srt = torch.where(present, ids, -2 - torch.arange(k, device=ids.device)).sort(-1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("teacher_ids repeats an id within a row with nonzero weight; top-k ids must be distinct")
    if bool((lp.isnan() & present).any() | (lp == float("inf")).any()):
        raise ValueError("teacher_logprobs has NaN or +inf on a row with nonzero weight")
    lp = torch.where(present, lp, torch.full_like(lp, _NEG_INF))
    ids = torch.where(present, ids, ids[:, :1].clamp_min(0).expand_as(ids))   # padding -> a duplicate, masked
    tail = None
    if teacher_tail is not None:
        if not isinstance(teacher_tail, torch.Tensor) or not teacher_tail.is_floating_point() \
                or tuple(teacher_tail.shape) != lead:
            raise ValueError(f"teacher_tail must be a float tensor of the token shape {lead}, got "
                             f"{_describe(teacher_tail)}")
        tail = torch.where(valid, teacher_tail.detach().reshape(n).to(cdt), torch.zeros(n, dtype=cdt, device=lp.device))
        if bool((tail.isnan() | (tail < 0) | (tail > 1)).any()):
            raise ValueError("teacher_tail must be a probability mass in [0, 1] on rows with nonzero weight")
    return z, ids, lp, w, valid, present, tail


def _weights(mask_or_weights, lead: tuple, name: str, cdt, device) -> torch.Tensor:
    if mask_or_weights is None:
        return torch.ones(lead, dtype=cdt, device=device)
    if not isinstance(mask_or_weights, torch.Tensor):
        raise ValueError(f"{name} must be a bool mask or float weight tensor, got {_describe(mask_or_weights)}")
    if tuple(mask_or_weights.shape) != lead:
        raise ValueError(f"{name} shape {tuple(mask_or_weights.shape)} does not match the token shape {lead}")
    if mask_or_weights.dtype == torch.bool:
        return mask_or_weights.to(cdt)
    if not mask_or_weights.is_floating_point():
        raise ValueError(f"{name} must be bool or floating point, got dtype {mask_or_weights.dtype}")
    w = mask_or_weights.detach().to(cdt)
    if bool((~torch.isfinite(w) | (w < 0)).any()):
        raise ValueError(f"{name} must be finite and >= 0; got a value {w[~torch.isfinite(w) | (w < 0)][0].item()}")
    return w


def _weighted_mean(per_token: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum(w l) / sum(w); 0 (still attached to the graph, zero gradient) when sum(w) == 0."""
    total = (per_token * w).sum()
    wsum = w.sum()
    return total / torch.where(wsum > 0, wsum, torch.ones_like(wsum))


# ---------------------------------------------------------------------------------------------
# Coarsening and the top-level KD loss
# ---------------------------------------------------------------------------------------------

def _coarsen(z, ids, lp, valid, tail: TailPolicy, temperature: float, chunk_rows: int | None,
             present=None, exact_tail=None):
    n, k = ids.shape
    cdt = lp.dtype
    chunk = max(1, n) if chunk_rows is None else chunk_rows
    if tail is TailPolicy.BUCKET:
        logq_ids, logq_tail = StudentLogProbsAtIds.apply(z, ids, valid, chunk, True, cdt)
        if present is not None:                                                     # ragged rows: padding
            logq_ids = torch.where(present, logq_ids, torch.full_like(logq_ids, _NEG_INF))
        if exact_tail is not None:                                                  # stored by the encoding
            m = exact_tail
        else:  # teacher tail m = 1 - sum exp(lp) = -expm1(logsumexp(lp)): accurate when m is tiny
            m = (-torch.expm1(torch.logsumexp(lp, -1))).clamp_min(0.0)               # (N,)
        log_m = teacher_tail_log_mass(m, ids_cover_vocab(present, n, k, z.shape[-1]))
        logp = torch.log_softmax(torch.cat([lp, log_m[:, None]], -1), -1)            # (N, k+1)
        logq = torch.cat([logq_ids, logq_tail[:, None]], -1)                        # (N, k+1)
        if temperature != 1.0:
            logp = torch.log_softmax(logp / temperature, -1)
            logq = torch.log_softmax(logq / temperature, -1)
    else:
        z_ids = z.gather(-1, ids.view(*z.shape[:-1], k)).reshape(n, k).to(cdt)       # (N, k)
        z_ids = torch.where(valid[:, None], z_ids, torch.zeros_like(z_ids))
        if present is not None:
            z_ids = torch.where(present, z_ids, torch.full_like(z_ids, _NEG_INF))
        logp = torch.log_softmax(lp / temperature, -1)                               # (N, k)
        logq = torch.log_softmax(z_ids / temperature, -1)                            # (N, k)
    return logp, logq


def ids_cover_vocab(present: torch.Tensor | None, n: int, k: int, vocab: int) -> torch.Tensor:
    """(N,) bool: the row's stored ids (distinct by contract) are the whole vocabulary."""
    count = torch.full((n,), k) if present is None else present.sum(-1)
    return count.to(torch.int64) == vocab


def teacher_tail_log_mass(m: torch.Tensor, covers: torch.Tensor) -> torch.Tensor:
    """log of the teacher's tail bucket m (N,): dropped (-inf) only where the ids cover the whole
    vocabulary, where m can only be rounding of the stored values. Anywhere else it is a real outcome:
    a student that gives it no mass (logits -inf on the whole complement) has an infinite forward KL,
    and the loss says so."""
    return torch.where(covers.to(m.device), torch.full_like(m, _NEG_INF), torch.log(m))


def coarsen_distributions(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                          mask_or_weights: torch.Tensor | None = None, *, tail: TailPolicy | str = TailPolicy.BUCKET,
                          temperature: float = 1.0, chunk_rows: int | None = DEFAULT_CHUNK_ROWS
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's and the student's distributions over the compared outcomes, as log-probs.

    student_logits (N, V) or (B, T, V); teacher_ids, teacher_logprobs (..., k); mask_or_weights (...)
    (rows with weight 0 are sanitised). Returns (teacher_logp, student_logq), each (N, K) with
    N = B*T, K = k+1 for BUCKET (column k is the tail) and K = k for RENORMALIZE, tempered as described
    in the module docstring (T^2 is NOT applied here). Feed them to any divergence above.
    """
    tail = _check_tail(tail)
    _check_temperature(temperature)
    _check_chunk_rows(chunk_rows)
    z, ids, lp, _, valid, present, exact = _prepare(student_logits, teacher_ids, teacher_logprobs, mask_or_weights)
    return _coarsen(z, ids, lp, valid, tail, float(temperature), chunk_rows, present, exact)


def distillation_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                      mask_or_weights: torch.Tensor | None, *, kind: str = "forward_kl",
                      tail: TailPolicy | str = TailPolicy.BUCKET, temperature: float = 1.0,
                      chunk_rows: int | None = DEFAULT_CHUNK_ROWS, teacher_tail: torch.Tensor | None = None,
                      **kind_kwargs) -> torch.Tensor:
    """Token-weighted mean distillation loss from cached teacher top-k log-probs.

        loss = T^2 * sum_n w_n D(p_n^(T), q_n^(T)) / sum_n w_n      (0 when sum_n w_n = 0)

    student_logits: (N, V) or (B, T, V), any float dtype (the maths runs in fp32, fp64 for fp64 input).
    teacher_ids: (..., k) int, distinct per row, in [0, V), or -1 as padding at the end of a row (ragged
    encodings; that entry is left out on both sides). teacher_logprobs: (..., k) log-softmax at T=1
    (fp16 is fine; -inf allowed). teacher_tail: (...) the exact teacher mass outside the ids, when the
    encoding stores it (BUCKET uses it instead of 1 - sum exp(teacher_logprobs)). mask_or_weights: (...) bool mask or float weights >= 0, or None (all 1).
    kind: one of ``DIVERGENCES``; kind_kwargs go to it (alpha, beta, teacher_floor).
    tail, temperature: see the module docstring (BUCKET tail at T != 1 = one pseudo-token on both sides).
    chunk_rows: rows of the (N, V) fp32 log-softmax alive at once, forward and backward; None = all.
    Returns a 0-dim tensor in the compute dtype, differentiable w.r.t. student_logits only.
    """
    _check_kind(kind, kind_kwargs)
    tail = _check_tail(tail)
    _check_temperature(temperature)
    _check_chunk_rows(chunk_rows)
    z, ids, lp, w, valid, present, exact = _prepare(student_logits, teacher_ids, teacher_logprobs, mask_or_weights,
                                                    teacher_tail)
    logp, logq = _coarsen(z, ids, lp, valid, tail, float(temperature), chunk_rows, present, exact)
    per_token = DIVERGENCES[kind](logp, logq, **kind_kwargs) * float(temperature) ** 2   # (N,)
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    return _weighted_mean(per_token, w)


def dense_distillation_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
                            mask_or_weights: torch.Tensor | None, *, kind: str = "forward_kl",
                            temperature: float = 1.0, chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
                            **kind_kwargs) -> torch.Tensor:
    """Token-weighted mean divergence against the teacher's whole distribution (no tail, no coarsening):

        loss = T^2 * sum_n w_n D(p_n^(T), q_n^(T)) / sum_n w_n,   p^(T) = softmax(log p / T) over all V ids

    student_logits: (N, V) or (B, T, V); teacher_logprobs: the same shape, log-probs at T=1 (renormalised
    here: stored values are rounded); mask_or_weights: (...) bool or float >= 0, or None (all 1). kind and
    kind_kwargs as in ``distillation_loss``. Rows with weight 0 are skipped (never computed). Returns a
    0-dim float32 tensor, differentiable w.r.t. student_logits only; the (rows, V) log-softmax of at most
    ``chunk_rows`` rows is alive at once in the forward pass.
    """
    _check_kind(kind, kind_kwargs)
    _check_temperature(temperature)
    _check_chunk_rows(chunk_rows)
    if student_logits.shape != teacher_logprobs.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must have the same shape")
    vocab = student_logits.shape[-1]
    z, lp = student_logits.reshape(-1, vocab), teacher_logprobs.reshape(-1, vocab)
    cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
    w = (torch.ones(z.shape[0], device=z.device, dtype=cdt) if mask_or_weights is None
         else mask_or_weights.reshape(-1).to(cdt))
    rows = torch.nonzero(w > 0)[:, 0]
    total = z.new_zeros((), dtype=cdt)
    step = max(1, rows.numel()) if chunk_rows is None else chunk_rows
    for s in range(0, rows.numel(), step):
        r = rows[s:s + step]
        logq = torch.log_softmax(z[r].to(cdt) / temperature, -1)
        logp = torch.log_softmax(lp[r].to(cdt) / temperature, -1)
        total = total + (DIVERGENCES[kind](logp, logq, **kind_kwargs) * w[r]).sum()
    wsum = w.sum()
    return total * float(temperature) ** 2 / torch.where(wsum > 0, wsum, torch.ones_like(wsum))


# ---------------------------------------------------------------------------------------------
# Hard labels and the mix
# ---------------------------------------------------------------------------------------------

def uld_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, mask_or_weights: torch.Tensor | None,
             *, teacher_tail: torch.Tensor | None = None,
             chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): the Wasserstein-1 distance
    between the teacher's and the student's next-token probabilities, each sorted in decreasing order,
    so the two need no common vocabulary. Per row n with k_n stored teacher entries:

        ULD_n = sum_{i <= k_n} |p_(i) - q_(i)| + |P_tail - Q_tail|
        loss  = sum_n w_n ULD_n / sum_n w_n                            (0 when sum_n w_n = 0)

    p_(i): the i-th largest stored teacher probability; q_(i): the i-th largest of softmax(z_n) over the
    student's vocabulary; P_tail: ``teacher_tail`` where given, else 1 - sum_i p_(i); Q_tail = 1 -
    sum_{i <= k_n} q_(i). With every teacher entry stored (k = V) this is the paper's distance; with
    top-k it is a lower bound of it (past rank k only the masses are compared).

    student_logits: (N, V) or (B, T, V), any float dtype (maths in fp32). teacher_logprobs: (..., k) in
    any order, -inf for absent entries; k <= V. mask_or_weights: (...) bool or float >= 0, or None.
    teacher_tail: (...) or None. chunk_rows: rows of the fp32 softmax alive at once (recomputed in the
    backward pass); None = all. Returns a 0-dim tensor differentiable w.r.t. student_logits only.
    """
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point() \
            or student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be a floating-point (N, V) or (B, T, V) tensor, got "
                         f"{_describe(student_logits)}")
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if not isinstance(teacher_logprobs, torch.Tensor) or not teacher_logprobs.is_floating_point() \
            or tuple(teacher_logprobs.shape[:-1]) != lead or teacher_logprobs.dim() != len(lead) + 1:
        raise ValueError(f"teacher_logprobs must be a float tensor of shape {lead + ('k',)}, got "
                         f"{_describe(teacher_logprobs)}")
    k = teacher_logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_logprobs has k={k} entries per row; need 1 <= k <= V={vocab}")
    _check_chunk_rows(chunk_rows)
    cdt = _compute_dtype(student_logits)
    n = math.prod(lead)
    w = _weights(mask_or_weights, lead, "mask_or_weights", cdt, student_logits.device).reshape(n)
    p = teacher_logprobs.detach().reshape(n, k).to(cdt).exp().nan_to_num(0.0).sort(-1, descending=True).values
    count = (p > 0).sum(-1)                                                   # (N,) stored entries per row
    w = torch.where(count > 0, w, torch.zeros_like(w))
    rows = torch.nonzero(w > 0).squeeze(-1)
    if rows.numel() == 0:
        return student_logits.sum() * 0.0
    if teacher_tail is not None:
        if tuple(teacher_tail.shape) != lead:
            raise ValueError(f"teacher_tail must have the token shape {lead}, got {_describe(teacher_tail)}")
        p_tail = teacher_tail.detach().reshape(n).to(cdt)
    else:
        p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    z = student_logits.reshape(n, vocab)

    def chunk(z_c, p_c, present_c, tail_c):
        q = torch.softmax(z_c.to(cdt), -1).topk(k, -1).values * present_c    # (n_c, k) sorted, masked
        return (p_c - q).abs().sum(-1) + (tail_c - (1.0 - q.sum(-1))).abs()

    present = torch.arange(k, device=p.device)[None, :] < count[:, None]
    step = rows.numel() if chunk_rows is None else chunk_rows
    total = torch.zeros((), dtype=cdt, device=student_logits.device)
    for s in range(0, rows.numel(), step):
        r = rows[s:s + step]
        per_row = torch.utils.checkpoint.checkpoint(chunk, z[r], p[r], present[r], p_tail[r], use_reentrant=False)
        total = total + (per_row * w[r]).sum()
    return total / w.sum()


def hard_label_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, *,
                             ignore_index: int = IGNORE_INDEX,
                             chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token cross-entropy on hard labels, CE = -1/|S| sum_{n in S} log softmax(z_n)_{y_n},
    S = {n : y_n != ignore_index}; 0 (with a zero gradient) when S is empty.

    student_logits (N, V) or (B, T, V) any float dtype; labels (N,) or (B, T) int. Same chunked fp32
    log-softmax as ``distillation_loss`` (no (N, V) fp32 tensor saved for backward).
    """
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point() \
            or student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be a floating-point (N, V) or (B, T, V) tensor, got "
                         f"{_describe(student_logits)}")
    _check_chunk_rows(chunk_rows)
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or tuple(labels.shape) != lead:
        raise ValueError(f"labels must be an integer tensor of shape {lead}, got {_describe(labels)}")
    n = math.prod(lead)
    y = labels.reshape(n).to(torch.int64)
    valid = y != ignore_index
    if bool((valid & ((y < 0) | (y >= vocab))).any()):
        bad = y[valid & ((y < 0) | (y >= vocab))][0].item()
        raise ValueError(f"labels has {bad}, outside [0, V={vocab}) and not ignore_index={ignore_index}")
    y = torch.where(valid, y, torch.zeros_like(y))
    cdt = _compute_dtype(student_logits)
    chunk = max(1, n) if chunk_rows is None else chunk_rows
    logq, _ = StudentLogProbsAtIds.apply(student_logits, y[:, None], valid, chunk, False, cdt)
    nll = torch.where(valid, -logq[:, 0], torch.zeros_like(logq[:, 0]))             # (N,)
    return _weighted_mean(nll, valid.to(cdt))


def mix_ce_and_kd(ce_loss: torch.Tensor, kd_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """loss = alpha * CE + (1 - alpha) * KD, alpha in [0, 1] (alpha = 0: pure distillation)."""
    _check_unit_interval("alpha", alpha)
    return alpha * ce_loss + (1.0 - alpha) * kd_loss


# ---------------------------------------------------------------------------------------------
# Token selection by the cached teacher entropy
# ---------------------------------------------------------------------------------------------

def entropy_token_weights(entropy: torch.Tensor, mask: torch.Tensor, *, above: float | None = None,
                          below: float | None = None, top_frac: float | None = None,
                          bottom_frac: float | None = None) -> torch.Tensor:
    """0/1 float weights (same shape as ``entropy``) keeping valid tokens chosen by teacher entropy H (nats).

    entropy: (N,) or (B, T) float; mask: same shape, bool or float (nonzero = valid). Either thresholds:
    keep H > above and/or H < below (both: the band between); or one fraction: keep the
    ceil(frac * n_valid) valid tokens with the highest (``top_frac``) or lowest (``bottom_frac``) H in the
    batch, ties broken arbitrarily. Thresholds and fractions cannot be mixed. Nothing given: the mask.
    Invalid tokens always get 0 (their entropy may be garbage).
    """
    if not isinstance(entropy, torch.Tensor) or not entropy.is_floating_point():
        raise ValueError(f"entropy must be a floating-point tensor, got {_describe(entropy)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != entropy.shape:
        raise ValueError(f"mask ({_describe(mask)}) does not match entropy shape {tuple(entropy.shape)}")
    thresholds = above is not None or below is not None
    fracs = [(name, f) for name, f in (("top_frac", top_frac), ("bottom_frac", bottom_frac)) if f is not None]
    if thresholds and fracs:
        raise ValueError(f"give thresholds (above/below) or a fraction, not both: above={above!r}, "
                         f"below={below!r}, {fracs[0][0]}={fracs[0][1]!r}")
    if len(fracs) > 1:
        raise ValueError(f"give top_frac or bottom_frac, not both: top_frac={top_frac!r}, bottom_frac={bottom_frac!r}")
    for name, f in fracs:
        if not (isinstance(f, (int, float)) and 0.0 < f <= 1.0):
            raise ValueError(f"{name} must be a number in (0, 1], got {f!r}")
    for name, t in (("above", above), ("below", below)):
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t)):
            raise ValueError(f"{name} must be a finite number of nats, got {t!r}")
    if above is not None and below is not None and above >= below:
        raise ValueError(f"above={above!r} must be < below={below!r} (keep above < H < below)")
    valid = mask != 0
    h = torch.where(valid, entropy.detach(), torch.zeros_like(entropy))
    if bool(h.isnan().any()):
        raise ValueError("entropy is NaN on a valid token")
    keep = valid.clone()
    if above is not None:
        keep &= h > above
    if below is not None:
        keep &= h < below
    if fracs:
        name, frac = fracs[0]
        keep = top_fraction(h if name == "top_frac" else -h, valid, frac) > 0
    return keep.to(entropy.dtype if entropy.dtype in (torch.float32, torch.float64) else torch.float32)


SELECT_PER = ("batch", "sequence")


def top_fraction(score: torch.Tensor, mask: torch.Tensor, frac: float, per: str = "batch") -> torch.Tensor:
    """0/1 float32 weights keeping, among the valid positions (``mask`` nonzero), the ceil(frac * n)
    with the highest ``score``: n counted over the whole batch (``per="batch"``) or over each row
    (``per="sequence"``, score and mask (B, T)). Ties are broken by position (the earlier first), so the
    choice is deterministic. score: (N,) or (B, T) float, garbage allowed where invalid."""
    if per not in SELECT_PER:
        raise ValueError(f"per must be one of {', '.join(SELECT_PER)}, got {per!r}")
    if not (isinstance(frac, (int, float)) and 0.0 < frac <= 1.0):
        raise ValueError(f"frac must be a number in (0, 1], got {frac!r}")
    if mask.shape != score.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match score shape {tuple(score.shape)}")
    valid = mask != 0
    rows = score.reshape(1, -1) if per == "batch" or score.dim() == 1 else score.reshape(score.shape[0], -1)
    ok = valid.reshape(rows.shape)
    s = torch.where(ok, rows.detach().float(), torch.full_like(rows, _NEG_INF, dtype=torch.float32))
    count = torch.ceil(ok.sum(-1, keepdim=True) * frac - 1e-6)                     # (R, 1)
    # rank of each position within its row: a stable sort by descending score (earlier position first on ties)
    order = torch.sort(-s, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    keep = ok & (rank < count)
    return keep.reshape(score.shape).float()


def student_entropy(logits: torch.Tensor, mask: torch.Tensor, chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """The student's entropy H(q) = logsumexp(z) - sum softmax(z) z, in nats, at the valid positions of
    ``mask``: (B, T) float32 (0 elsewhere), no gradient. logits (B, T, V) any float dtype, computed in
    fp32 ``chunk_rows`` rows at a time (None: all), so no (B, T, V) fp32 copy exists."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    idx = torch.nonzero(mask.reshape(-1) != 0).squeeze(-1)
    out = torch.zeros(flat.shape[0], dtype=torch.float32, device=logits.device)
    step = max(idx.numel(), 1) if chunk_rows is None else chunk_rows
    for s in range(0, idx.numel(), step):
        z = flat[idx[s:s + step]].float()
        lse = torch.logsumexp(z, -1)
        out[idx[s:s + step]] = lse - (torch.softmax(z, -1) * z).sum(-1)
    return out.reshape(mask.shape)


# ---------------------------------------------------------------------------------------------
# Hidden-state (feature) distillation (Minitron, arXiv 2407.14679)
# ---------------------------------------------------------------------------------------------

class HiddenStateProjector(nn.Module):
    """Per mapped (student layer, teacher layer) pair, a map from student width d_s to teacher width d_t.

    student_dims, teacher_dims: one int each, or one per pair. ``project``: None (default) = a learned
    ``nn.Linear(d_s, d_t)`` where the widths differ and the identity where they are equal; True = a
    learned linear map for every pair (identity-initialised where the widths are equal); False = never
    project (equal widths required). forward(h (..., d_s), pair=0) -> (..., d_t).
    """

    def __init__(self, student_dims: int | Sequence[int], teacher_dims: int | Sequence[int], *,
                 project: bool | None = None, bias: bool = False) -> None:
        super().__init__()
        sd = [student_dims] if isinstance(student_dims, int) else list(student_dims)
        td = [teacher_dims] if isinstance(teacher_dims, int) else list(teacher_dims)
        if len(sd) != len(td) or not sd:
            raise ValueError(f"student_dims {sd} and teacher_dims {td} must be non-empty and of equal length")
        for name, dims in (("student_dims", sd), ("teacher_dims", td)):
            if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
                raise ValueError(f"{name} must be positive ints, got {dims}")
        if project not in (None, True, False):
            raise ValueError(f"project must be None, True or False, got {project!r}")
        maps = []
        for ds, dt in zip(sd, td):
            if ds == dt and not project:
                maps.append(nn.Identity())
            elif project is False:
                raise ValueError(f"project=False but student width {ds} != teacher width {dt}")
            else:
                lin = nn.Linear(ds, dt, bias=bias)
                if ds == dt:
                    with torch.no_grad():
                        lin.weight.copy_(torch.eye(ds))
                        if lin.bias is not None:
                            lin.bias.zero_()
                maps.append(lin)
        self.student_dims, self.teacher_dims = sd, td
        self.maps = nn.ModuleList(maps)

    def forward(self, hidden: torch.Tensor, pair: int = 0) -> torch.Tensor:
        if not 0 <= pair < len(self.maps):
            raise ValueError(f"pair={pair!r} is out of range for {len(self.maps)} layer pair(s)")
        if hidden.shape[-1] != self.student_dims[pair]:
            raise ValueError(f"hidden shape {tuple(hidden.shape)} does not end in the student width "
                             f"{self.student_dims[pair]} of pair {pair}")
        return self.maps[pair](hidden)


def hidden_state_loss(student_h: torch.Tensor, teacher_h: torch.Tensor, weights: torch.Tensor | None = None, *,
                      kind: str = "cosine", projector: Callable[..., torch.Tensor] | None = None,
                      pair: int = 0) -> torch.Tensor:
    """Token-weighted mean feature loss between (projected) student and teacher hidden states.

    student_h (N, d_s) or (B, T, d_s); teacher_h (..., d_t) with the same leading shape; weights (...)
    bool/float or None. h = projector(student_h[, pair]) (a ``HiddenStateProjector`` gets ``pair``;
    no projector = identity, so d_s must equal d_t). Per token, in fp32:
      cosine: 1 - <h, t> / (max(|h| |t|, 1e-8))   (0 for parallel vectors, in [0, 2])
      mse:    1/d_t sum_i (h_i - t_i)^2
    Rows with weight 0 are zeroed before the maths (garbage there cannot leak).
    """
    if kind not in ("cosine", "mse"):
        raise ValueError(f"kind={kind!r} is not a hidden-state loss; valid kinds: cosine, mse")
    for name, t in (("student_h", student_h), ("teacher_h", teacher_h)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2:
            raise ValueError(f"{name} must be a floating-point (N, d) or (B, T, d) tensor, got {_describe(t)}")
    if student_h.shape[:-1] != teacher_h.shape[:-1]:
        raise ValueError(f"student_h shape {tuple(student_h.shape)} and teacher_h shape "
                         f"{tuple(teacher_h.shape)} differ in their token dimensions")
    if projector is None:
        h = student_h
    elif isinstance(projector, HiddenStateProjector):
        h = projector(student_h, pair)
    elif callable(projector):
        h = projector(student_h)
    else:
        raise ValueError(f"projector must be callable or None, got {type(projector).__name__}")
    if h.shape != teacher_h.shape:
        raise ValueError(f"projected student shape {tuple(h.shape)} does not match teacher_h shape "
                         f"{tuple(teacher_h.shape)}; pass a projector (HiddenStateProjector) to map widths")
    lead = tuple(teacher_h.shape[:-1])
    w = _weights(weights, lead, "weights", torch.float32, teacher_h.device).reshape(-1)
    valid = (w > 0)[:, None]
    h = h.reshape(-1, h.shape[-1]).float()
    t = teacher_h.detach().reshape(-1, teacher_h.shape[-1]).float()
    h = torch.where(valid, h, torch.zeros_like(h))
    t = torch.where(valid, t, torch.zeros_like(t))
    if kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(h, t, dim=-1, eps=1e-8)
    else:
        per_token = (h - t).pow(2).mean(-1)
    return _weighted_mean(per_token, w)


# ---------------------------------------------------------------------------------------------
# Several teachers
# ---------------------------------------------------------------------------------------------

def combine_teacher_losses(losses: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Multi-teacher loss: sum_i (w_i / sum_j w_j) L_i. losses: same-shaped tensors (usually 0-dim);
    weights: floats >= 0, one per loss, not all 0."""
    losses, weights = list(losses), list(weights)
    if len(losses) != len(weights):
        raise ValueError(f"losses has {len(losses)} entries but weights has {len(weights)}")
    if not losses:
        raise ValueError("losses is empty: need at least one teacher loss")
    for i, wt in enumerate(weights):
        if isinstance(wt, bool) or not isinstance(wt, (int, float)) or not math.isfinite(wt) or wt < 0:
            raise ValueError(f"weights[{i}]={wt!r} must be a finite number >= 0")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights={weights!r} sum to 0; at least one teacher needs weight > 0")
    for i, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"losses[{i}] must be a tensor, got {type(loss).__name__}")
        if loss.shape != losses[0].shape:
            raise ValueError(f"losses[{i}] shape {tuple(loss.shape)} differs from losses[0] shape "
                             f"{tuple(losses[0].shape)}")
    return sum((wt / total) * loss for wt, loss in zip(weights, losses))
