"""Attention transfer from a cache (format 1.5 ``attn/<block>_q`` / ``k``): the teacher's attention
rebuilt per document from its stored post-rotary queries and keys, and the student's matched to it.

Relations (MiniLMv2, arXiv 2012.15828): a block's queries of all heads, concatenated (heads x head_dim
numbers per token, keys expanded to every query head of their KV group first), are split into ``R``
relation heads of equal width d_r; relation r's attention is softmax(q_r k_r^T / sqrt(d_r)) over the
document's earlier positions. With R = the number of heads and the same head_dim this is exactly each
head's attention; with other head counts (a student with fewer heads) teacher and student are compared
relation by relation, which needs no head mapping. The loss is KL(A_teacher || A_student) per relation
and query row, the mean over valid query rows and relations.

Shapes: q (B, T, heads, head_dim), k (B, T, kv_heads, head_dim), float; ``valid`` (B, T) bool (the
positions of the sequence, padding False); ``segments`` (B, T) int (positions of one document share a
value; keys of other documents are masked), or None (one document per row).
"""

from __future__ import annotations

import torch


def rebuild_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(heads, t, t) causal attention probabilities of one document from its stored (t, heads, head_dim)
    queries and (t, kv_heads, head_dim) keys: the block's own attention (each KV head shared by
    heads / kv_heads query heads)."""
    heads, kv = q.shape[1], k.shape[1]
    qh = q.transpose(0, 1).double()
    kh = k.transpose(0, 1).double().repeat_interleave(heads // kv, 0)
    scores = qh @ kh.transpose(1, 2) / q.shape[-1] ** 0.5
    t = q.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)


def relations(q: torch.Tensor, k: torch.Tensor, num_relations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R, T, d_r) relation queries and keys from (B, T, heads, dh) q and (B, T, kv_heads, dh) k."""
    b, t, heads, dh = q.shape
    width = heads * dh
    if width % num_relations:
        raise ValueError(f"{heads} heads x {dh} = {width} numbers per token do not split into {num_relations} "
                         "relation heads")
    k = k.repeat_interleave(heads // k.shape[2], 2)
    d_r = width // num_relations
    return (q.reshape(b, t, num_relations, d_r).transpose(1, 2), k.reshape(b, t, num_relations, d_r).transpose(1, 2))


def attention_transfer_loss(student_q: torch.Tensor, student_k: torch.Tensor, teacher_q: torch.Tensor,
                            teacher_k: torch.Tensor, valid: torch.Tensor, num_relations: int,
                            segments: torch.Tensor | None = None, block_rows: int = 256) -> torch.Tensor:
    """Mean over valid query rows and relations of KL(A_teacher || A_student), nats (a 0-dim tensor).

    Computed in blocks of ``block_rows`` query rows, so at most (B, R, block_rows, T) scores exist at once.
    """
    sq, sk = relations(_at_least_f32(student_q), _at_least_f32(student_k), num_relations)
    with torch.no_grad():
        tq, tk = relations(_at_least_f32(teacher_q).to(sq.dtype), _at_least_f32(teacher_k).to(sq.dtype), num_relations)
    b, r, t, _ = sq.shape
    pos = torch.arange(t, device=sq.device)
    same = valid[:, None, :] & valid[:, :, None]                                    # (B, Tq, Tk)
    if segments is not None:
        same = same & (segments[:, :, None] == segments[:, None, :])
    total = sq.new_zeros(())
    for s in range(0, t, block_rows):
        e = min(s + block_rows, t)
        allowed = (same[:, s:e] & (pos[None, None, :] <= pos[s:e, None]))[:, None]  # (B, 1, rows, T)
        ls = _masked_log_softmax(sq[:, :, s:e] @ sk.transpose(2, 3) / sq.shape[-1] ** 0.5, allowed)
        with torch.no_grad():
            lt = _masked_log_softmax(tq[:, :, s:e] @ tk.transpose(2, 3) / tq.shape[-1] ** 0.5, allowed)
            pt = lt.exp()
        kl = (pt * (lt - ls)).masked_fill(~allowed, 0.0).sum(-1)                    # (B, R, rows)
        total = total + kl.masked_fill(~valid[:, None, s:e], 0.0).sum()
    return total / (valid.sum() * r).clamp_min(1)


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _masked_log_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log-softmax over the allowed keys (rows without any give zeros, never NaN)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min).detach()
    lse = (scores - m).exp().sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny).log() + m
    return (scores - lse).masked_fill(~allowed, 0.0)


class AttentionTransfer:
    """The student's side of attention transfer: forward hooks on the query / key projections of its
    blocks in ``pairs`` ([[student_block, teacher_block], ...], non-negative), and, after the student's
    forward pass on a batch, the mean over the pairs of ``attention_transfer_loss`` against the batch's
    ``attn_q.<teacher_block>`` / ``attn_k.<teacher_block>`` (documents kept apart by ``document_ids``,
    positions from ``position_ids``, padding ``document_ids == 0``)."""

    def __init__(self, model, pairs: list[list[int]], relations: int):
        from logitcache.teacher.attention_capture import QKRecorder

        from .model import decoder_body

        self.pairs, self.relations = [tuple(p) for p in pairs], int(relations)
        self.recorder = QKRecorder(decoder_body(model), model.config, sorted({s for s, _ in self.pairs}))

    def loss(self, batch: dict) -> torch.Tensor:
        qk = self.recorder.take(batch["position_ids"])
        valid = batch["document_ids"] != 0
        total = sum(attention_transfer_loss(qk[(s, "q")], qk[(s, "k")], batch[f"attn_q.{t}"], batch[f"attn_k.{t}"],
                                            valid, self.relations, batch["document_ids"]) for s, t in self.pairs)
        return total / len(self.pairs)

    def close(self) -> None:
        self.recorder.close()
