"""Which models are worth keeping: the Pareto front of quality against a cost, and its plot.

A model is on the front when no other model is at least as good on both axes and strictly better on
one. Quality is a metric where lower or higher is better (KL: lower; accuracy: higher). The cost axis
is a speed or a size: throughput is better when larger; latency, parameters, disk and memory are
better when smaller (``COST_LABELS`` names each with its unit).
"""

from __future__ import annotations

# Cost axes: (label with unit, larger is better).
COST_LABELS = {
    "throughput_tokens_per_s": ("Throughput, batch generation (generated tokens/s, higher is faster)", True),
    "vllm_throughput_tokens_per_s": ("Throughput under vLLM (generated tokens/s, higher is faster)", True),
    "prefill_tokens_per_s": ("Prefill speed (prompt tokens/s, higher is faster)", True),
    "latency_ms_per_token": ("Latency at batch 1 (ms per generated token, lower is faster)", False),
    "parameters": ("Parameters (millions, lower is smaller)", False),
    "disk_bytes": ("Weights on disk (MB, lower is smaller)", False),
    "peak_rss_mb": ("Peak resident memory (MB, lower is smaller)", False),
    "peak_memory_mb": ("Peak device memory (MB, lower is smaller)", False),
}
# Values shown on the axis in other units than stored (parameters in millions, bytes in MB).
AXIS_SCALE = {"parameters": 1e-6, "disk_bytes": 1e-6}


def larger_is_better(cost_key: str) -> bool:
    """Whether a larger value of the cost axis is better (speeds); sizes, latency and memory: smaller."""
    if cost_key in COST_LABELS:
        return COST_LABELS[cost_key][1]
    return not cost_key.startswith(("latency", "peak", "disk", "param", "size"))


def pareto_front(rows: list[dict], quality_key: str, cost_key: str = "throughput_tokens_per_s",
                 lower_is_better: bool = True) -> list[str]:
    """Names of the models no other model beats on both ``quality_key`` and ``cost_key``, from the
    worst end of the cost axis to its best (slowest or largest first).

    ``lower_is_better`` is about the quality; the cost's direction is ``larger_is_better(cost_key)``.
    Rows without either key are left out; equal points are all kept."""
    cost_sign = 1 if larger_is_better(cost_key) else -1
    quality_sign = -1 if lower_is_better else 1
    points = [(r["name"], cost_sign * r[cost_key], quality_sign * r[quality_key])
              for r in rows if r.get(quality_key) is not None and r.get(cost_key) is not None]

    def beats(a, b):    # a at least as good on both, strictly better on one
        return a[1] >= b[1] and a[2] >= b[2] and (a[1] > b[1] or a[2] > b[2])

    front = [p for p in points if not any(beats(q, p) for q in points)]
    return [p[0] for p in sorted(front, key=lambda p: (p[1], p[2]))]


def pareto_plot(rows: list[dict], path: str, *, quality_key: str, quality_label: str,
                cost_key: str = "throughput_tokens_per_s", lower_is_better: bool = True) -> list[str]:
    """Scatter of quality against cost, one labelled point per model, the Pareto front joined by a
    step line; writes a PNG to ``path`` and returns the front's names (as ``pareto_front``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(quality_key) is not None and r.get(cost_key) is not None]
    if not rows:
        raise ValueError(f"no row has both {quality_key!r} and {cost_key!r}")
    front = pareto_front(rows, quality_key, cost_key, lower_is_better)
    scale = AXIS_SCALE.get(cost_key, 1.0)
    x = {r["name"]: r[cost_key] * scale for r in rows}
    y = {r["name"]: r[quality_key] for r in rows}

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    others = [r["name"] for r in rows if r["name"] not in front]
    if others:
        ax.scatter([x[n] for n in others], [y[n] for n in others], s=40, color="0.55",
                   label="beaten on both by another model", zorder=3)
    # The front runs from the worst end of the cost axis to the best; "pre" makes each step show the
    # best quality reachable at that cost or better.
    ax.step([x[n] for n in front], [y[n] for n in front], where="pre", color="tab:red", lw=1.5, zorder=2)
    ax.scatter([x[n] for n in front], [y[n] for n in front], s=70, marker="D", color="tab:red",
               label="Pareto-optimal", zorder=4)
    for r in rows:
        ax.annotate(r["name"], (x[r["name"]], y[r["name"]]), xytext=(6, 5), textcoords="offset points", fontsize=9)

    xs = list(x.values())
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    direction = "lower is better" if lower_is_better else "higher is better"
    ax.set_xlabel(COST_LABELS.get(cost_key, (cost_key, True))[0])
    ax.set_ylabel(f"{quality_label} ({direction})")
    ax.set_title(f"{quality_label}\nagainst {COST_LABELS.get(cost_key, (cost_key,))[0].split(' (')[0].lower()}; "
                 f"red: models no other model beats on both", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return front
