"""The teacher's next-token distribution on the capture device: top-k log-probabilities, exact
entropy, the target's log-probability and whatever the encoding needs beyond them (its declared
``extras``), from logits in row chunks so that at most ``chunk_rows x V`` float32 logits are alive at
once.

Random draws (``sampled``, ``hybrid``) are keyed, not streamed: the j-th draw of a row is the inverse
CDF of the row's distribution at a uniform that is a hash of (the sample's ``draw_key``, the row's
position, j). A row's draws therefore depend on nothing but its sample, its position and its
distribution: not on the batch it was computed in, the order of requests, the engine (the hf backend
and the vLLM worker hook call the same functions) or how a scheduler split the work. Same ids on CPU
and GPU up to the float rounding of the distribution itself (an id changes only where a uniform falls
within that rounding of a CDF step).
"""

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


# splitmix64's finaliser (Steele, Lea & Flood 2014) on int64 tensors: wrapping multiplies, logical
# shifts as arithmetic shifts with the sign bits masked off. numpy's uint64 gives the same bits.
_M1, _M2, _GOLDEN = -4658895280553007687, -7723592293110705685, -7046029254386353131


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """A bijective 64-bit hash of each int64 element (splitmix64's finaliser)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def row_keys(draw_keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(rows,) int64 keys of rows: one per (sample ``draw_key``, position in the sequence)."""
    return mix64(draw_keys.long() ^ mix64(positions.long() + _GOLDEN))


def keyed_uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) float64 uniforms in [0, 1): the j-th is 53 bits of mix64(key + (j + 1) * golden)."""
    j = torch.arange(1, n + 1, device=keys.device, dtype=torch.int64)
    return _shr(mix64(keys[:, None] + j * _GOLDEN), 11).double() * 2.0 ** -53


def keyed_draws(weights: torch.Tensor, keys: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) int64 ids drawn with replacement from each row of ``weights`` (rows, V), >= 0 and
    not necessarily normalised (an all-zero row draws id 0), by the inverse CDF at ``keyed_uniforms``;
    an id of weight 0 is never drawn."""
    cdf = weights.double().cumsum(-1)                                        # (rows, V)
    total = cdf[:, -1:]
    ids = torch.searchsorted(cdf, keyed_uniforms(keys, n) * total, right=True)
    last = torch.searchsorted(cdf, total)          # the last id of weight > 0 (u * total may round up to total)
    return torch.minimum(ids, last)


def _tail(logp, top_ids, top_vals, enc, keys) -> dict[str, torch.Tensor]:
    """The exact mass outside the top-k ids: the sum of p over the rest, never 1 - sum p (which
    cancels to noise when the tail is small)."""
    return {"tail": logp.exp().scatter(-1, top_ids, 0.0).sum(-1)}


def _draws(logp, top_ids, top_vals, enc, keys) -> dict[str, torch.Tensor]:
    """``draws`` (rows, n) ids drawn with replacement from softmax(logp / T) [+ their ``draw_logprobs``
    and ``log_z`` = logsumexp(logp / T) when T != 1]."""
    t = float(enc["temperature"])
    x = logp if t == 1.0 else logp / t
    draws = keyed_draws(torch.softmax(x, -1), keys, int(enc["draws"]))
    out = {"draws": draws}
    if t != 1.0:
        out["draw_logprobs"] = logp.gather(-1, draws)
        out["log_z"] = x.logsumexp(-1)
    return out


def _hybrid_tail(logp, top_ids, top_vals, enc, keys) -> dict[str, torch.Tensor]:
    """``head_counts`` (the top-k entries with log-prob >= lo), ``tail_draws`` (rows, n) from p
    restricted to the ids outside that head, of which the first ``tail_n`` = ceil(n * m) count (m = the
    mass outside the head, 0 draws where m = 0)."""
    n = int(enc["draws"])
    head = top_vals >= float(enc["lo"])                                  # a prefix: values are sorted
    p = logp.exp().scatter(-1, top_ids, torch.where(head, 0.0, top_vals.exp()))
    m = p.sum(-1)
    has_tail = m > 0
    return {"head_counts": head.sum(-1), "tail_draws": keyed_draws(p, keys, n),               # no tail: unused
            "tail_n": torch.where(has_tail, torch.ceil(n * m.double() - 1e-12).clamp(0, n).long(), 0)}


def _every_value(logp, top_ids, top_vals, enc, keys) -> dict[str, torch.Tensor]:
    return {"all_logprobs": logp}


# the device computations an encoding's extras name (``ExtraSpec.producer``): one per kind of quantity
PRODUCERS = {"tail": _tail, "draws": _draws, "hybrid_tail": _hybrid_tail, "every_value": _every_value}
RANDOM_PRODUCERS = ("draws", "hybrid_tail")


def extras_fill(encoding: Encoding | None, top_k: int, vocab_size: int
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype, float]]:
    """Per-row shape, torch dtype and fill of each extra the encoding declares (empty for topk)."""
    if encoding is None:
        return {}
    return {e.name: (e.row_shape, getattr(torch, e.dtype), e.fill) for e in encoding.extras(top_k, vocab_size)}


def needs_keys(encoding: Encoding | None) -> bool:
    """Whether the encoding's extras are random draws (they need ``row_keys``)."""
    return encoding is not None and any(e.producer in RANDOM_PRODUCERS for e in encoding.extras(1, 2))


def distribution_extras(logp: torch.Tensor, top_ids: torch.Tensor, top_vals: torch.Tensor,
                        encoding: Encoding | None, keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What the encoding needs beyond the top-k, from full log-probs (rows, V) while they are on the
    device: every extra it declares (``Encoding.extras``), made by its producer (``PRODUCERS``).
    ``keys``: (rows,) ``row_keys``, needed by the random producers."""
    if encoding is None:
        return {}
    specs = encoding.extras(top_ids.shape[-1], logp.shape[-1])
    out: dict[str, torch.Tensor] = {}
    for producer in dict.fromkeys(e.producer for e in specs):
        if producer in RANDOM_PRODUCERS and keys is None:
            raise ValueError(f"--encoding {encoding.name}: its draws need row keys")
        out.update(PRODUCERS[producer](logp, top_ids, top_vals, encoding, keys))
    return {e.name: out[e.name] for e in specs}


@torch.no_grad()
def next_token_stats(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                     targets: torch.Tensor, top_k: int, chunk_rows: int = 64, encoding: Encoding | None = None,
                     keys: torch.Tensor | None = None):
    """For each row of ``hidden`` (N, d): the k most probable ids and their log-probs, the entropy
    (nats) and log p(target), all from log_softmax over the full vocabulary at T=1, plus the
    encoding's ``distribution_extras`` (``keys``: the rows' ``row_keys`` (N,), for draws).

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
        chunk_keys = keys[s:e] if keys is not None else None
        for key, value in distribution_extras(logp, ids[s:e], vals[s:e], encoding, chunk_keys).items():
            if key not in extras:
                extras[key] = torch.empty((n, *value.shape[1:]), dtype=value.dtype, device=device)
            extras[key][s:e] = value
    return ids, vals, ent, tgt, extras
