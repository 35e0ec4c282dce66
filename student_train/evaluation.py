"""Held-out evaluation against the cached teacher, importable without the training loop."""

from __future__ import annotations

import math

import torch

from . import losses
from .data import CacheStream
from .attention import DENSE, Attention
from .objective import forward, teacher_loss
from .targets import EstimatedTargets


def teacher_top1(batch: dict) -> torch.Tensor:
    """(B, T) the teacher's most probable id: from the full distribution when loaded, else from the
    stored entries (rank order for topk; the largest value or target otherwise)."""
    if "teacher_full_logprobs" in batch:
        return batch["teacher_full_logprobs"].argmax(-1)
    t = batch["teacher"]
    values = t.targets if isinstance(t, EstimatedTargets) else t.logprobs
    return t.ids.gather(-1, values.argmax(-1, keepdim=True))[..., 0]


def exact_kl_sums(logits: torch.Tensor, full_logprobs: torch.Tensor, mask: torch.Tensor,
                  chunk_rows: int = 256) -> tuple[float, float]:
    """Sums over the masked tokens of forward KL(p || q) and reverse KL(q || p) over the whole vocabulary,
    p from the cache's full distribution (renormalised after its fp16 rounding), q the student's."""
    z, lp = logits[mask].float(), full_logprobs[mask].float()
    fwd = rev = 0.0
    for s in range(0, z.shape[0], chunk_rows):
        logq = torch.log_softmax(z[s:s + chunk_rows], -1)
        logp = torch.log_softmax(lp[s:s + chunk_rows], -1)
        fwd += float((logp.exp() * (logp - logq)).sum())
        rev += float((logq.exp() * (logq - logp)).sum())
    return fwd, rev


@torch.no_grad()
def evaluate(model, stream: CacheStream, device, amp_dtype, max_batches: int | None = None,
             attention: Attention = DENSE) -> dict:
    """Against the cached teacher on held-out samples: forward KL(p_teacher || q_student) as the cache's
    encoding gives it (stored ids + tail bucket, or the sampled estimate), the student's perplexity on
    the tokens, top-1 agreement; on a ``--encoding full`` cache also the exact forward and reverse KL
    over the whole vocabulary (``kl_forward_exact``, ``kl_reverse_exact``)."""
    was_training = model.training
    model.eval()
    kl_sum = nll_sum = agree = n = n_labels = 0.0
    exact_fwd = exact_rev = 0.0
    for i, batch in enumerate(stream):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = forward(model, batch, False, attention).logits
        mask = batch["loss_mask"]
        count = float(mask.sum())
        if count == 0:
            continue
        kl_sum += float(teacher_loss(logits, batch["teacher"], mask)) * count
        labelled = float((batch["labels"] != losses.IGNORE_INDEX).sum())   # = count, except across tokenizers
        nll_sum += float(losses.hard_label_cross_entropy(logits, batch["labels"])) * labelled
        n_labels += labelled
        agree += float(((logits.argmax(-1) == teacher_top1(batch)) & mask).sum())
        if "teacher_full_logprobs" in batch:
            f, r = exact_kl_sums(logits, batch["teacher_full_logprobs"], mask)
            exact_fwd, exact_rev = exact_fwd + f, exact_rev + r
        n += count
    model.train(was_training)
    if n == 0:
        return {"tokens": 0}
    out = {"tokens": int(n), "kl_forward": kl_sum / n, "perplexity": math.exp(nll_sum / max(n_labels, 1.0)), "top1_agreement": agree / n}
    if stream.with_full:
        out.update(kl_forward_exact=exact_fwd / n, kl_reverse_exact=exact_rev / n)
    return out
