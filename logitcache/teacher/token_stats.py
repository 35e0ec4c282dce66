"""Top-k log-probabilities, exact entropy and the target's log-probability from logits, in row
chunks so that at most ``chunk_rows x V`` float32 logits are alive at once."""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def next_token_stats(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                     targets: torch.Tensor, top_k: int, chunk_rows: int = 512):
    """For each row of ``hidden`` (N, d): the k most probable ids and their log-probs, the entropy
    H = -sum p log p (nats) and log p(target), all from log_softmax over the full vocabulary at T=1.

    Returns topk_ids (N, k) int64, topk_logprobs (N, k) float32, entropy (N,) float32,
    target_logprob (N,) float32. Ties in top-k are broken as torch.topk does (lowest id first is not
    guaranteed); tests allow swaps at equal values.
    """
    n = hidden.shape[0]
    device = hidden.device
    ids = torch.empty((n, top_k), dtype=torch.int64, device=device)
    vals = torch.empty((n, top_k), dtype=torch.float32, device=device)
    ent = torch.empty((n,), dtype=torch.float32, device=device)
    tgt = torch.empty((n,), dtype=torch.float32, device=device)
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        logp = torch.log_softmax(head(hidden[s:e]).float(), dim=-1)   # (c, V)
        v, i = logp.topk(top_k, dim=-1)
        vals[s:e], ids[s:e] = v, i
        ent[s:e] = torch.special.entr(logp.exp()).sum(-1)             # 0 * log 0 counts as 0
        tgt[s:e] = logp.gather(-1, targets[s:e, None]).squeeze(-1)
    return ids, vals, ent, tgt
