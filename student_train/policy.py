"""On-policy reverse KL by policy gradient: the loss of a student on its own samples, scored by the teacher.

A round cache (``student-onpolicy``, docs/training.md "On-policy rounds") holds, per sampled response
token x_t, the teacher's log-probability log p(x_t | x_<t) (``target_logprob``) and the log-probability
under the student that sampled it, the behaviour policy q_b (``behaviour_logprob``). The per-token
advantage is

    A_t = log p(x_t) - log q_b(x_t)          (a one-sample estimate of -KL(q_b || p) at step t)

and, with a discount gamma over the later tokens of the same response (MiniLLM's long-term part;
gamma = 0 is the per-token form of the on-policy distillation recipe),

    G_t = sum_{s >= t, same response} gamma^(s - t) A_s.

With a baseline b (``baseline=1``, the default: b = the w-weighted mean of G over the micro-batch's
loss tokens; ``baseline=0``: b = 0), the importance ratio r_t = q_theta(x_t) / q_b(x_t) (1 while the
student has not moved since it sampled) and D_t = G_t - b, the loss is PPO's clipped surrogate over the
loss tokens (weights w_t):

    loss = - sum_t w_t min(r_t D_t, clip(r_t, 1 - eps, 1 + eps) D_t) / sum_t w_t

Its gradient at r = 1 is - sum_t w_t D_t grad log q_theta(x_t) / sum_t w_t: the score-function gradient
of the reverse KL, KL(q || p) = E_q[log q - log p] (the term E_q[grad log q] is 0, which is also why a
constant b leaves the expectation unchanged; the batch mean moves it by O(1/N) for N tokens). D_t, b and
q_b carry no gradient. Without a baseline every A_t of a student far from its teacher is negative, each
step pushes down whatever was sampled, and the mass runs to tokens nobody sampled: measured, a student
collapsed to repeating one token within one round (docs/results.md). Shapes: (B, T, V) logits, (B, T)
everything else.
"""

from __future__ import annotations

import torch

from .losses import DEFAULT_CHUNK_ROWS, IGNORE_INDEX, StudentLogProbsAtIds

PG_ARGS = ("discount", "clip", "baseline")     # --loss-arg names of the policy-gradient loss


def check_pg_args(args: dict) -> tuple[float, float, bool]:
    """(discount, clip, baseline) from ``--loss-arg`` values, checked: discount in [0, 1], clip > 0,
    baseline 0 or 1."""
    unknown = sorted(set(args) - set(PG_ARGS))
    if unknown:
        raise ValueError(f"policy_gradient takes no argument {', '.join(unknown)}; it accepts {', '.join(PG_ARGS)}")
    discount, clip = float(args.get("discount", 0.0)), float(args.get("clip", 0.2))
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if args.get("baseline", 1) not in (0, 1):
        raise ValueError(f"baseline must be 0 (none) or 1 (the batch's mean return), got {args['baseline']}")
    return discount, clip, bool(args.get("baseline", 1))


def discounted_returns(advantage: torch.Tensor, document_ids: torch.Tensor, discount: float) -> torch.Tensor:
    """G (B, T): G_t = sum_{s >= t, same document} discount^(s - t) A_s, for A (B, T) (0 where a position
    is not a loss token) and document_ids (B, T) (0 = padding). discount 0 returns A itself. One (T, T)
    matrix per batch row (no loop over positions)."""
    if discount == 0.0:
        return advantage
    B, T = advantage.shape
    pos = torch.arange(T, device=advantage.device)
    gap = (pos[None, :] - pos[:, None]).to(advantage.dtype)        # [t, s] = s - t
    later = gap >= 0
    decay = torch.where(later, torch.pow(torch.tensor(discount, dtype=advantage.dtype, device=advantage.device),
                                         gap.clamp_min(0)), torch.zeros_like(gap))
    out = torch.empty_like(advantage)
    for b in range(B):                                               # one row at a time: (T, T) memory
        same = document_ids[b][:, None] == document_ids[b][None, :]
        out[b] = (decay * same) @ advantage[b]
    return out


def policy_gradient_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logprob: torch.Tensor,
                         behaviour_logprob: torch.Tensor, weights: torch.Tensor, document_ids: torch.Tensor, *,
                         discount: float = 0.0, clip: float = 0.2, baseline: bool = True,
                         chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> tuple[torch.Tensor, dict]:
    """The clipped reverse-KL policy-gradient loss of the module docstring (``baseline``: subtract the
    micro-batch's mean return) and its statistics.

    logits (B, T, V) any float dtype; labels (B, T) int64, the sampled token x_t at each position
    (``IGNORE_INDEX`` elsewhere); teacher_logprob, behaviour_logprob (B, T) float32 log p(x_t), log q_b(x_t)
    (any value where weights are 0); weights (B, T) >= 0; document_ids (B, T). Returns (loss, stats):
    loss 0-dim float32 (float64 for float64 logits), differentiable w.r.t. logits only; stats detached
    0-dim tensors: ``pg_advantage`` (mean A_t), ``reverse_kl_estimate`` (mean of log q_b - log p, the
    one-sample reverse KL per token at the behaviour policy), ``pg_ratio`` (mean r_t), ``pg_clipped``
    (share of tokens whose ratio was clipped).
    """
    B, T, V = logits.shape
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = weights.to(cdt)
    on = (w > 0) & (labels != IGNORE_INDEX)
    w = torch.where(on, w, torch.zeros_like(w))
    ids = torch.where(on, labels, torch.zeros_like(labels)).reshape(-1, 1)
    chunk = max(1, B * T) if chunk_rows is None else chunk_rows
    logq, _ = StudentLogProbsAtIds.apply(logits, ids, on.reshape(-1), chunk, False, cdt)
    logq = logq.reshape(B, T)
    zero = torch.zeros_like(w)
    p_t = torch.where(on, teacher_logprob.to(cdt), zero)
    b_t = torch.where(on, behaviour_logprob.to(cdt), zero)
    advantage = p_t - b_t
    returns = discounted_returns(advantage, torch.where(on, document_ids, torch.zeros_like(document_ids)), discount)
    wsum = w.sum()
    denom = torch.where(wsum > 0, wsum, torch.ones_like(wsum))
    if baseline:
        returns = torch.where(on, returns - (returns * w).sum() / denom, zero)
    ratio = torch.exp(torch.where(on, logq - b_t, zero))
    surrogate = torch.minimum(ratio * returns, ratio.clamp(1.0 - clip, 1.0 + clip) * returns)
    loss = -(surrogate * w).sum() / denom
    with torch.no_grad():
        clipped = ((ratio < 1.0 - clip) | (ratio > 1.0 + clip)).to(cdt)
        stats = {"pg_advantage": (advantage * w).sum() / denom, "reverse_kl_estimate": -(advantage * w).sum() / denom,
                 "pg_ratio": (ratio * w).sum() / denom, "pg_clipped": (clipped * w).sum() / denom}
    return loss, stats
