"""Top-k log-probabilities, exact entropy and the target's log-probability from logits, in row
chunks so that at most ``chunk_rows x V`` float32 logits are alive at once."""

from __future__ import annotations

from typing import Callable

import torch

FLOAT32_MIN = torch.finfo(torch.float32).min


def distribution_stats(logp: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From full-vocabulary log-probs (rows, V): top-k ids and values (rows, k), entropy (rows,).

    H = -sum p log p. Clamping -inf (masked ids, p = 0) to a finite value makes 0 * log 0 count as 0
    without the extra log that torch.special.entr takes (15% faster on CPU, same value).
    """
    values, ids = logp.topk(top_k, dim=-1)
    entropy = -(logp.exp() * logp.clamp_min(FLOAT32_MIN)).sum(-1)
    return ids, values, entropy


@torch.no_grad()
def next_token_stats(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                     targets: torch.Tensor, top_k: int, chunk_rows: int = 64):
    """For each row of ``hidden`` (N, d): the k most probable ids and their log-probs, the entropy
    (nats) and log p(target), all from log_softmax over the full vocabulary at T=1.

    Returns topk_ids (N, k) int64, topk_logprobs (N, k) float32, entropy (N,) float32,
    target_logprob (N,) float32. Equal log-probs may come in either order (torch.topk's choice).
    Small chunks are fastest on CPU: the softmax passes then stay in cache.
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
        ids[s:e], vals[s:e], ent[s:e] = distribution_stats(logp, top_k)
        tgt[s:e] = logp.gather(-1, targets[s:e, None]).squeeze(-1)
    return ids, vals, ent, tgt
