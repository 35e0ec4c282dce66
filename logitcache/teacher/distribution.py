"""The teacher's next-token distribution on the capture device: top-k log-probabilities, exact
entropy, the target's log-probability and whatever the encoding needs beyond them (its declared
``extras``), from logits in row chunks so that at most ``chunk_rows x V`` float32 logits are alive at
once."""

from __future__ import annotations

from typing import Callable

import torch

from ..format.encodings import Encoding

FLOAT32_MIN = torch.finfo(torch.float32).min


def distribution_stats(logp: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From full-vocabulary log-probs (rows, V): top-k ids and values (rows, k), entropy (rows,).

    H = -sum p log p. Clamping -inf (masked ids, p = 0) to a finite value makes 0 * log 0 count as 0
    without the extra log that torch.special.entr takes (15% faster on CPU, same value).
    """
    values, ids = logp.topk(top_k, dim=-1)
    entropy = -(logp.exp() * logp.clamp_min(FLOAT32_MIN)).sum(-1)
    return ids, values, entropy


def _tail(logp, top_ids, top_vals, enc, generator) -> dict[str, torch.Tensor]:
    """The exact mass outside the top-k ids: a logsumexp over the rest, never 1 - sum p."""
    return {"tail": logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1).exp()}


def _draws(logp, top_ids, top_vals, enc, generator) -> dict[str, torch.Tensor]:
    """``draws`` (rows, n) ids drawn with replacement from softmax(logp / T) [+ their ``draw_logprobs``
    and ``log_z`` = logsumexp(logp / T) when T != 1]."""
    t = float(enc["temperature"])
    x = logp if t == 1.0 else logp / t
    draws = torch.multinomial(torch.softmax(x, -1), int(enc["draws"]), replacement=True, generator=generator)
    out = {"draws": draws}
    if t != 1.0:
        out["draw_logprobs"] = logp.gather(-1, draws)
        out["log_z"] = x.logsumexp(-1)
    return out


def _hybrid_tail(logp, top_ids, top_vals, enc, generator) -> dict[str, torch.Tensor]:
    """``head_counts`` (the top-k entries with log-prob >= lo), ``tail_draws`` (rows, n) from p
    restricted to the ids outside that head, of which the first ``tail_n`` = ceil(n * m) count (m = the
    mass outside the head, 0 draws where m = 0)."""
    n = int(enc["draws"])
    head = top_vals >= float(enc["lo"])                                  # a prefix: values are sorted
    p = logp.exp().scatter(-1, top_ids, torch.where(head, 0.0, top_vals.exp()))
    m = p.sum(-1)
    has_tail = m > 0
    p = torch.where(has_tail[:, None], p, torch.ones_like(p))            # rows without a tail: draws unused
    return {"head_counts": head.sum(-1), "tail_draws": torch.multinomial(p, n, replacement=True, generator=generator),
            "tail_n": torch.where(has_tail, torch.ceil(n * m.double() - 1e-12).clamp(0, n).long(), 0)}


def _every_value(logp, top_ids, top_vals, enc, generator) -> dict[str, torch.Tensor]:
    return {"all_logprobs": logp}


# the device computations an encoding's extras name (``ExtraSpec.producer``): one per kind of quantity
PRODUCERS = {"tail": _tail, "draws": _draws, "hybrid_tail": _hybrid_tail, "every_value": _every_value}


def extras_fill(encoding: Encoding | None, top_k: int, vocab_size: int
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype, float]]:
    """Per-row shape, torch dtype and fill of each extra the encoding declares (empty for topk)."""
    if encoding is None:
        return {}
    return {e.name: (e.row_shape, getattr(torch, e.dtype), e.fill) for e in encoding.extras(top_k, vocab_size)}


def distribution_extras(logp: torch.Tensor, top_ids: torch.Tensor, top_vals: torch.Tensor,
                        encoding: Encoding | None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """What the encoding needs beyond the top-k, from full log-probs (rows, V) while they are on the
    device: every extra it declares (``Encoding.extras``), made by its producer (``PRODUCERS``)."""
    if encoding is None:
        return {}
    specs = encoding.extras(top_ids.shape[-1], logp.shape[-1])
    out: dict[str, torch.Tensor] = {}
    for producer in dict.fromkeys(e.producer for e in specs):
        out.update(PRODUCERS[producer](logp, top_ids, top_vals, encoding, generator))
    return {e.name: out[e.name] for e in specs}


@torch.no_grad()
def next_token_stats(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                     targets: torch.Tensor, top_k: int, chunk_rows: int = 64, encoding: Encoding | None = None,
                     generator: torch.Generator | None = None):
    """For each row of ``hidden`` (N, d): the k most probable ids and their log-probs, the entropy
    (nats) and log p(target), all from log_softmax over the full vocabulary at T=1, plus the
    encoding's ``distribution_extras``.

    Returns topk_ids (N, k) int64, topk_logprobs (N, k) float32, entropy (N,) float32,
    target_logprob (N,) float32, extras {name: (N, ...)}. Equal log-probs may come in either order
    (torch.topk's choice). Small chunks are fastest on CPU: the softmax passes then stay in cache.
    """
    n = hidden.shape[0]
    device = hidden.device
    ids = torch.empty((n, top_k), dtype=torch.int64, device=device)
    vals = torch.empty((n, top_k), dtype=torch.float32, device=device)
    ent = torch.empty((n,), dtype=torch.float32, device=device)
    tgt = torch.empty((n,), dtype=torch.float32, device=device)
    extras: dict[str, torch.Tensor] = {}
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        logp = torch.log_softmax(head(hidden[s:e]).float(), dim=-1)   # (c, V)
        ids[s:e], vals[s:e], ent[s:e] = distribution_stats(logp, top_k)
        tgt[s:e] = logp.gather(-1, targets[s:e, None]).squeeze(-1)
        for key, value in distribution_extras(logp, ids[s:e], vals[s:e], encoding, generator).items():
            if key not in extras:
                extras[key] = torch.empty((n, *value.shape[1:]), dtype=value.dtype, device=device)
            extras[key][s:e] = value
    return ids, vals, ent, tgt, extras
