"""What a cache holds, in numbers and pictures: ``logitcache inspect``.

Token-level figures stream the entropy and top-k arrays chunk by chunk, so memory stays flat on any
cache size. Unscored rows hold NaN entropy by contract, which is how they are told apart.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from ..format.arrays import ENTROPY, TOPK_LOGPROBS
from ..store.reader import Cache

HIST_BINS = 2000  # quantiles below are read from this histogram: resolution log(V)/2000 nats


def summarize(cache: Cache, token_stats: bool = True) -> dict:
    m = cache.manifest
    stored = cache.stored_bytes()
    tokens = max(m.num_tokens, 1)
    scored = sum(s.scored_tokens for s in m.shards)
    reasons = collections.Counter(s.reason.split(" (")[0] for s in m.skipped)
    out = {
        "cache": cache.url,
        "format_version": m.format_version,
        "complete": m.complete,
        "teacher": {"name": m.teacher.name, "backend": m.teacher.backend, "dtype": m.teacher.dtype,
                    "architecture": m.teacher.architecture, "layers": m.teacher.num_layers,
                    "hidden_size": m.teacher.hidden_size, "fingerprint": m.teacher.fingerprint},
        "tokenizer": {"vocab_size": m.tokenizer.vocab_size, "vocab_sha256": m.tokenizer.vocab_sha256},
        "capture": {"mode": m.capture.mode, "top_k": m.capture.top_k, "hidden_layers": m.capture.hidden_layers,
                    "hidden_dtype": m.capture.hidden_dtype, "logprob_dtype": m.capture.logprob_dtype,
                    "with_prompt": m.capture.with_prompt, "max_new_tokens": m.capture.max_new_tokens,
                    "temperature": m.capture.temperature},
        "shards": len(m.shards),
        "samples": m.num_samples,
        "tokens": m.num_tokens,
        "scored_tokens": scored,
        "skipped": {"total": len(m.skipped), "by_reason": dict(reasons)},
        "bytes": {"total": sum(stored.values()),
                  "per_token": {k: v / tokens for k, v in stored.items()},
                  "per_scored_token": {k: v / max(scored, 1) for k, v in stored.items()}},
    }
    if token_stats and scored:
        out["token_stats"] = token_statistics(cache)
    return out


def token_statistics(cache: Cache) -> dict:
    """Entropy histogram and quantiles, and the mean cumulative probability of the top-k ranks."""
    vocab = cache.manifest.teacher.vocab_size
    k = cache.manifest.capture.top_k
    hi = math.log(vocab)
    counts = np.zeros(HIST_BINS, dtype=np.int64)
    mass_sum = np.zeros(k, dtype=np.float64)
    tail = np.zeros(HIST_BINS, dtype=np.int64)
    n = 0
    ent_sum = 0.0
    for chunk in cache.iter_token_chunks([ENTROPY, TOPK_LOGPROBS]):
        ent = chunk.arrays[ENTROPY]
        ok = ~np.isnan(ent)
        if not ok.any():
            continue
        e = ent[ok].astype(np.float64)
        counts += np.histogram(np.clip(e, 0, hi), bins=HIST_BINS, range=(0, hi))[0]
        cum = np.cumsum(np.exp(chunk.arrays[TOPK_LOGPROBS][ok].astype(np.float64)), axis=1)   # (rows, k)
        mass_sum += cum.sum(0)
        tail += np.histogram(np.clip(1 - cum[:, -1], 0, 1), bins=HIST_BINS, range=(0, 1))[0]
        ent_sum += e.sum()
        n += e.size
    edges = np.linspace(0, hi, HIST_BINS + 1)
    tail_edges = np.linspace(0, 1, HIST_BINS + 1)

    def quantile(c, e, q):
        idx = int(np.searchsorted(np.cumsum(c), q * c.sum()))
        return float((e[idx] + e[idx + 1]) / 2)

    return {
        "entropy_mean": ent_sum / n,
        "entropy_quantiles": {f"p{int(q * 100)}": quantile(counts, edges, q) for q in (0.1, 0.5, 0.9, 0.99)},
        "entropy_histogram": {"edges": [float(x) for x in edges[::20]],
                              "counts": [int(x) for x in counts.reshape(-1, 20).sum(1)]},
        "topk_mass_mean": [float(x) for x in mass_sum / n],
        "tail_mass_quantiles": {f"p{int(q * 100)}": quantile(tail, tail_edges, q) for q in (0.5, 0.9, 0.99)},
    }


def render_text(s: dict) -> str:
    t, c = s["teacher"], s["capture"]
    lines = [
        f"cache        {s['cache']}  (format {s['format_version']}{'' if s['complete'] else ', INCOMPLETE'})",
        f"teacher      {t['name']}  [{t['architecture']}, {t['layers']} layers, d={t['hidden_size']}, "
        f"{t['backend']} backend, {t['dtype']}]",
        f"tokenizer    vocab {s['tokenizer']['vocab_size']}, sha256 {s['tokenizer']['vocab_sha256'][:12]}",
        f"capture      {c['mode']} mode, top-k {c['top_k']} ({c['logprob_dtype']}), hidden layers "
        f"{c['hidden_layers'] or 'none'}{' (' + c['hidden_dtype'] + ')' if c['hidden_layers'] else ''}",
        f"contents     {s['samples']} samples in {s['shards']} shard(s), {s['tokens']} tokens, "
        f"{s['scored_tokens']} scored; {s['skipped']['total']} skipped"
        + (f" {s['skipped']['by_reason']}" if s['skipped']['total'] else ""),
        f"size         {s['bytes']['total'] / 1e6:.2f} MB",
        "bytes/token  (per token | per scored token)",
    ]
    for name, v in s["bytes"]["per_token"].items():
        lines.append(f"  {name:<18} {v:9.2f} | {s['bytes']['per_scored_token'][name]:9.2f}")
    if "token_stats" in s:
        ts = s["token_stats"]
        q = ts["entropy_quantiles"]
        k = len(ts["topk_mass_mean"])
        marks = [r for r in (1, 4, 16, 64, 128, 256) if r <= k]
        lines.append(f"entropy      mean {ts['entropy_mean']:.3f} nats; p10 {q['p10']:.3f}, p50 {q['p50']:.3f}, "
                     f"p90 {q['p90']:.3f}, p99 {q['p99']:.3f}")
        lines.append("top-k mass   " + ", ".join(f"top-{r}: {ts['topk_mass_mean'][r - 1]:.4f}" for r in marks)
                     + f"; tail p50 {ts['tail_mass_quantiles']['p50']:.4f}, p90 {ts['tail_mass_quantiles']['p90']:.4f}")
    return "\n".join(lines)


def plot(s: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = s["token_stats"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    edges = np.array(ts["entropy_histogram"]["edges"])
    counts = np.array(ts["entropy_histogram"]["counts"])
    a.bar(edges[:-1], counts / max(counts.sum(), 1), width=np.diff(edges), align="edge", color="tab:blue")
    a.axvline(ts["entropy_mean"], color="k", ls="--", lw=1, label=f"mean {ts['entropy_mean']:.2f}")
    a.set(xlabel="teacher entropy (nats, full vocabulary)", ylabel="share of scored tokens",
          title=f"Entropy of {s['scored_tokens']} scored tokens")
    a.set_xlim(0, edges[1:][counts > 0].max() * 1.05 if (counts > 0).any() else edges[-1])
    a.legend()
    mass = np.array(ts["topk_mass_mean"])
    ranks = np.arange(1, len(mass) + 1)
    b.plot(ranks, mass, marker=".", color="tab:orange")
    b.set(xscale="log", xlabel="top-k rank", ylabel="mean probability mass captured", ylim=(0, 1.01),
          title=f"Top-k mass (tail at k={len(mass)}: {1 - mass[-1]:.3f})")
    b.grid(alpha=0.3)
    fig.suptitle(f"{s['teacher']['name']} - {s['cache']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
