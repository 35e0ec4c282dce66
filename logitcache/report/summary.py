"""What a cache holds, in numbers and pictures: ``logitcache inspect``.

Token-level figures stream the entropy and top-k arrays chunk by chunk, so memory stays flat on any
cache size. Unscored rows hold NaN entropy by contract, which is how they are told apart. With a
selection file, the same pass also gathers the selected samples' entropy, to compare with the cache.
"""

from __future__ import annotations

import collections
import json
import math

import numpy as np

from ..format.arrays import ENTROPY, SELECTED
from ..format.encodings import encoding_from
from ..store.reader import Cache

HIST_BINS = 2000  # quantiles below are read from this histogram: resolution log(V)/2000 nats
POSITION_BINS = 128  # entropy by position: at most this many bins of equal width
SELECTION_COLUMNS = ["mean_entropy", "max_entropy", "p90_entropy", "teacher_logprob_mean", "perplexity",
                     "response_tokens", "num_tokens"]


def summarize(cache: Cache, token_stats: bool = True, selection: str | None = None) -> dict:
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
        "capture": {"mode": m.capture.mode, "top_k": m.capture.top_k, "encoding": m.capture.encoding, "hidden_layers": m.capture.hidden_layers,
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
    if m.rollout is not None:                  # 1.4: an on-policy round's record, as written
        out["rollout"] = m.rollout
    selected = None
    if selection is not None:
        out["selection"], selected = selection_summary(cache, selection)
    if token_stats and scored:
        out["token_stats"] = token_statistics(cache, selected)
        if selected is not None:
            out["selection"]["token_stats"] = out["token_stats"].pop("selection")
    return out


def selection_summary(cache: Cache, path: str) -> tuple[dict, list[str]]:
    """A selection file against its cache (checked: same fingerprint, known ids): its record, and
    per-sample means over the selection and over the whole cache."""
    from ..query.engine import Engine
    from ..query.selection import check_selection, load_selection

    table, info = load_selection(path)
    check_selection(table, info, cache, str(path))
    avgs = ", ".join(f"avg({c}) AS {c}" for c in SELECTION_COLUMNS)
    rows = Engine(cache, persist=False).run(
        f"SELECT 'selection' AS part, {avgs} FROM samples WHERE sample_id IN (SELECT sample_id FROM _selection) "
        f"UNION ALL SELECT 'cache' AS part, {avgs} FROM samples",
        extra={"_selection": table.select(["sample_id"])}).table.to_pylist()
    by_part = {r.pop("part"): r for r in rows}
    n = cache.manifest.num_samples
    summary = {"file": str(path), "count": info.count, "of_samples": n, "share": info.count / max(n, 1),
               "query": info.query, "shortcut": info.shortcut, "entropy_threshold": info.entropy_threshold,
               "made_from": info.cache, "cache_fingerprint": info.cache_fingerprint, "fingerprint_matches": True,
               "per_sample": {c: {"selection": by_part["selection"][c], "cache": by_part["cache"][c]}
                              for c in SELECTION_COLUMNS}}
    return summary, table.column("sample_id").to_pylist()


def _quantile(c, e, q):
    idx = int(np.searchsorted(np.cumsum(c), q * c.sum()))
    return float((e[idx] + e[idx + 1]) / 2)


def _entropy_summary(counts: np.ndarray, edges: np.ndarray, ent_sum: float, n: int) -> dict:
    return {
        "scored_tokens": int(n),
        "entropy_mean": ent_sum / n if n else None,
        "entropy_quantiles": ({f"p{int(q * 100)}": _quantile(counts, edges, q) for q in (0.1, 0.5, 0.9, 0.99)}
                              if n else {}),
        "entropy_histogram": {"edges": [float(x) for x in edges[::20]],
                              "counts": [int(x) for x in counts.reshape(-1, 20).sum(1)]},
    }


def _by_position(sums: np.ndarray, counts: np.ndarray) -> dict:
    """Mean entropy per scored position (0 = first scored row), in at most POSITION_BINS equal bins."""
    width = max(1, math.ceil(len(counts) / POSITION_BINS))
    pad = (-len(counts)) % width
    s = np.pad(sums, (0, pad)).reshape(-1, width).sum(1)
    c = np.pad(counts, (0, pad)).reshape(-1, width).sum(1)
    return {"width": width, "start": [int(i * width) for i in range(len(c))],
            "mean": [float(a / b) if b else None for a, b in zip(s, c)], "tokens": [int(x) for x in c]}


def _add_at(acc: np.ndarray, pos: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    got = np.bincount(pos, weights=weights, minlength=len(acc))
    if len(got) > len(acc):
        acc = np.pad(acc, (0, len(got) - len(acc)))
    acc[:len(got)] += got
    return acc


def token_statistics(cache: Cache, selected: list[str] | None = None) -> dict:
    """Entropy histogram and quantiles, mean entropy by position, and the mean cumulative probability
    of the top-k ranks; with ``selected`` sample ids, the entropy figures of those samples too."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..query.token_stats import iter_sample_rows

    vocab = cache.manifest.teacher.vocab_size
    k = cache.manifest.capture.top_k
    hi = math.log(vocab)
    counts = np.zeros(HIST_BINS, dtype=np.int64)
    sel_counts = np.zeros(HIST_BINS, dtype=np.int64)
    mass_sum = np.zeros(k, dtype=np.float64)
    tail = np.zeros(HIST_BINS, dtype=np.int64)
    pos_sum, pos_n = np.zeros(0), np.zeros(0)
    sel_pos_sum, sel_pos_n = np.zeros(0), np.zeros(0)
    n = sel_n = 0
    ent_sum = sel_sum = 0.0
    wanted = pa.array(selected if selected is not None else [], pa.string())
    shard, is_selected = None, None
    with_mass = not cache.encoding.estimated          # sampled / hybrid store estimates, not the top-k mass
    has_selected = SELECTED in cache.manifest.arrays  # 1.6 --positions-from: rows that hold a distribution
    mass_n = scored_n = 0
    for chunk in iter_sample_rows(cache, [ENTROPY, *([SELECTED] if has_selected else [])]):
        ent = chunk.arrays[ENTROPY]
        has = chunk.scored & (chunk.arrays[SELECTED] != 0) if has_selected else chunk.scored
        if with_mass and has.any():                   # rows padded to k (-inf), and the exact tail if stored
            rows = cache.teacher_rows(chunk.shard, chunk.start, chunk.stop)
            lp = rows.padded(k)[1][has]
            cum = np.cumsum(np.exp(lp.astype(np.float64)), axis=1)                          # (rows, k)
            mass_sum += cum.sum(0)
            rest = 1 - cum[:, -1] if rows.tail is None else rows.tail[has].astype(np.float64)
            tail += np.histogram(np.clip(rest, 0, 1), bins=HIST_BINS, range=(0, 1))[0]
        mass_n += int(has.sum())
        scored_n += int(chunk.scored.sum())
        ok = chunk.scored & ~np.isnan(ent)            # an imported cache (format 1.6) may not know the entropy
        if not ok.any():
            continue
        e = ent[ok].astype(np.float64)
        binned = np.histogram(np.clip(e, 0, hi), bins=HIST_BINS, range=(0, hi))[0]
        counts += binned
        ent_sum += e.sum()
        n += e.size
        pos = chunk.scored_position[ok]
        pos_sum, pos_n = _add_at(pos_sum, pos, e), _add_at(pos_n, pos)
        if selected is not None:
            if chunk.shard != shard:
                shard = chunk.shard
                is_selected = pc.is_in(chunk.index.column("sample_id"), value_set=wanted).to_numpy(zero_copy_only=False)
            mine = is_selected[chunk.sample[ok]]                                   # (scored rows,)
            sel_counts += np.histogram(np.clip(e[mine], 0, hi), bins=HIST_BINS, range=(0, hi))[0]
            sel_sum += e[mine].sum()
            sel_n += int(mine.sum())
            sel_pos_sum, sel_pos_n = _add_at(sel_pos_sum, pos[mine], e[mine]), _add_at(sel_pos_n, pos[mine])
    edges = np.linspace(0, hi, HIST_BINS + 1)
    tail_edges = np.linspace(0, 1, HIST_BINS + 1)
    out = _entropy_summary(counts, edges, ent_sum, n)
    del out["scored_tokens"]
    if has_selected:      # 1.6 --positions-from: scored rows that hold the teacher's distribution
        out["rows_with_distribution"] = mass_n
        out["rows_with_distribution_share"] = mass_n / scored_n if scored_n else None
    out.update({
        "entropy_by_position": _by_position(pos_sum, pos_n),
        "topk_mass_mean": [float(x) for x in mass_sum / mass_n] if with_mass and mass_n else None,
        "tail_mass_quantiles": {f"p{int(q * 100)}": _quantile(tail, tail_edges, q) for q in (0.5, 0.9, 0.99)}
        if with_mass and mass_n else None,
    })
    if selected is not None:
        out["selection"] = _entropy_summary(sel_counts, edges, sel_sum, sel_n)
        out["selection"]["entropy_by_position"] = _by_position(sel_pos_sum, sel_pos_n)
    return out


def render_text(s: dict) -> str:
    t, c = s["teacher"], s["capture"]
    lines = [
        f"cache        {s['cache']}  (format {s['format_version']}{'' if s['complete'] else ', INCOMPLETE'})",
        f"teacher      {t['name']}  [{t['architecture']}, {t['layers']} layers, d={t['hidden_size']}, "
        f"{t['backend']} backend, {t['dtype']}]",
        f"tokenizer    vocab {s['tokenizer']['vocab_size']}, sha256 {s['tokenizer']['vocab_sha256'][:12]}",
        f"capture      {c['mode']} mode, {_encoding_text(c)} ({c['logprob_dtype']}), hidden layers "
        f"{c['hidden_layers'] or 'none'}{' (' + c['hidden_dtype'] + ')' if c['hidden_layers'] else ''}",
        *([f"rollout      {json.dumps(s['rollout'], sort_keys=True)}"] if "rollout" in s else []),
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
        if ts["entropy_mean"] is None:
            lines.append("entropy      not stored (every row NaN: an imported top-k cannot give it)")
        else:
            lines.append(f"entropy      mean {ts['entropy_mean']:.3f} nats; p10 {q['p10']:.3f}, p50 {q['p50']:.3f}, "
                         f"p90 {q['p90']:.3f}, p99 {q['p99']:.3f}")
        if ts["topk_mass_mean"] is not None:
            k = len(ts["topk_mass_mean"])
            marks = [r for r in (1, 4, 16, 64, 128, 256) if r <= k]
            lines.append("stored mass  " + ", ".join(f"top-{r}: {ts['topk_mass_mean'][r - 1]:.4f}" for r in marks)
                         + f"; tail p50 {ts['tail_mass_quantiles']['p50']:.4f}, "
                           f"p90 {ts['tail_mass_quantiles']['p90']:.4f}")
        if "rows_with_distribution" in ts:
            lines.append(f"positions    distribution stored on {ts['rows_with_distribution']} of the scored rows "
                         f"({100 * (ts['rows_with_distribution_share'] or 0):.1f}%; capture --positions-from)")
    if "selection" in s:
        lines += render_selection(s["selection"])
    return "\n".join(lines)


def _encoding_text(c: dict) -> str:
    return encoding_from(c.get("encoding")).describe(c["top_k"])


def render_selection(sel: dict) -> list[str]:
    lines = [f"selection    {sel['count']} of {sel['of_samples']} samples ({100 * sel['share']:.1f}%) from "
             f"{sel['file']}; fingerprint matches this cache",
             f"  query      {sel['shortcut'] or sel['query']}",
             f"  {'per sample':<20} {'selection':>10} | {'cache':>10}"]
    for name, v in sel["per_sample"].items():
        a, b = v["selection"], v["cache"]
        lines.append(f"  {name:<20} {a if a is None else format(a, '10.4g'):>10} | "
                     f"{b if b is None else format(b, '10.4g'):>10}")
    t = sel.get("token_stats")
    if t and t["scored_tokens"]:
        q = t["entropy_quantiles"]
        lines.append(f"  token entropy      mean {t['entropy_mean']:.3f} nats over {t['scored_tokens']} scored tokens; "
                     f"p50 {q['p50']:.3f}, p90 {q['p90']:.3f}")
    return lines


def plot(s: dict, path: str) -> None:
    """Three panels: entropy histogram (with the selection's, if any), top-k mass, entropy by position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = s["token_stats"]
    sel = s.get("selection", {}).get("token_stats")
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    edges = np.array(ts["entropy_histogram"]["edges"])
    counts = np.array(ts["entropy_histogram"]["counts"])
    a.bar(edges[:-1], counts / max(counts.sum(), 1), width=np.diff(edges), align="edge", color="tab:blue",
          alpha=0.6 if sel else 1.0, label="whole cache")
    if ts["entropy_mean"] is not None:               # None: a cache that does not know its entropy (imported)
        a.axvline(ts["entropy_mean"], color="k", ls="--", lw=1, label=f"mean {ts['entropy_mean']:.2f}")
    top = edges[1:][counts > 0].max() if (counts > 0).any() else edges[-1]
    if sel and sel["scored_tokens"]:
        sc = np.array(sel["entropy_histogram"]["counts"])
        a.step(edges, np.append(sc / sc.sum(), 0), where="post", color="tab:red", lw=1.5,
               label=f"selection ({s['selection']['count']} samples)")
        a.axvline(sel["entropy_mean"], color="tab:red", ls=":", lw=1, label=f"selection mean {sel['entropy_mean']:.2f}")
        top = max(top, edges[1:][sc > 0].max() if (sc > 0).any() else 0)
    a.set(xlabel="teacher entropy (nats, full vocabulary)", ylabel="share of scored tokens",
          title=f"Entropy of {s['scored_tokens']} scored tokens")
    a.set_xlim(0, top * 1.05)
    a.legend(fontsize=8)
    if ts["topk_mass_mean"] is not None:
        mass = np.array(ts["topk_mass_mean"])
        ranks = np.arange(1, len(mass) + 1)
        b.plot(ranks, mass, marker=".", color="tab:orange")
        b.set(xscale="log", xlabel="top-k rank", ylabel="mean probability mass captured", ylim=(0, 1.01),
              title=f"Top-k mass (tail at k={len(mass)}: {1 - mass[-1]:.3f})")
        b.grid(alpha=0.3)
    else:
        b.text(0.5, 0.5, f"{s['capture']['encoding']['name']} encoding:\nstores draws, not a top-k",
               ha="center", va="center", transform=b.transAxes)
        b.set_axis_off()
    for part, color, label in ((ts, "tab:blue", "whole cache"), (sel, "tab:red", "selection")):
        if not part or "entropy_by_position" not in part:
            continue
        p = part["entropy_by_position"]
        x = np.array(p["start"], dtype=float) + (p["width"] - 1) / 2
        y = np.array([np.nan if v is None else v for v in p["mean"]], dtype=float)
        c.plot(x, y, color=color, marker="." if len(x) < 40 else None, label=label)
    c.set(xlabel="position among scored tokens (0 = first)", ylabel="mean entropy (nats)",
          title="Entropy by token position")
    c.grid(alpha=0.3)
    if sel:
        c.legend(fontsize=8)
    fig.suptitle(f"{s['teacher']['name']} - {s['cache']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
