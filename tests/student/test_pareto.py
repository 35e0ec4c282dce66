"""student_train/pareto.py: the front is right on constructed examples, for speed and size axes alike."""

from __future__ import annotations

import pytest

from student_train.pareto import larger_is_better, pareto_front, pareto_plot

ROWS = [  # quality: KL, lower is better; speed: throughput, higher is better
    {"name": "teacher", "throughput_tokens_per_s": 100.0, "kl_exact": 0.0, "top1_agreement": 1.0},
    {"name": "s-slow-bad", "throughput_tokens_per_s": 150.0, "kl_exact": 0.9, "top1_agreement": 0.5},
    {"name": "s-mid", "throughput_tokens_per_s": 200.0, "kl_exact": 0.3, "top1_agreement": 0.8},
    {"name": "s-fast", "throughput_tokens_per_s": 400.0, "kl_exact": 0.6, "top1_agreement": 0.7},
    {"name": "s-fast-worse", "throughput_tokens_per_s": 400.0, "kl_exact": 0.7, "top1_agreement": 0.6},
    {"name": "no-quality", "throughput_tokens_per_s": 900.0},
]


def test_pareto_front_on_hand_made_rows():
    assert pareto_front(ROWS, "kl_exact", "throughput_tokens_per_s", True) == ["teacher", "s-mid", "s-fast"]
    assert pareto_front(ROWS, "top1_agreement", "throughput_tokens_per_s", False) == ["teacher", "s-mid", "s-fast"]
    # Latency: lower is faster. s-b is both faster and better than s-a.
    rows = [{"name": "s-a", "latency_ms_per_token": 20.0, "kl_exact": 0.5},
            {"name": "s-b", "latency_ms_per_token": 10.0, "kl_exact": 0.4},
            {"name": "t", "latency_ms_per_token": 30.0, "kl_exact": 0.0}]
    assert pareto_front(rows, "kl_exact", "latency_ms_per_token", True) == ["t", "s-b"]


def test_pareto_front_against_size_with_accuracy():
    """Size: fewer parameters is better; accuracy: higher is better; ties on both are all kept."""
    rows = [{"name": "t", "parameters": 135e6, "acc": 0.40},
            {"name": "a", "parameters": 67e6, "acc": 0.20},
            {"name": "a-twin", "parameters": 67e6, "acc": 0.20},
            {"name": "b", "parameters": 67e6, "acc": 0.10},       # same size as a, less accurate
            {"name": "c", "parameters": 85e6, "acc": 0.15},       # larger and worse than a
            {"name": "d", "parameters": 53e6, "acc": 0.05}]
    assert pareto_front(rows, "acc", "parameters", lower_is_better=False) == ["t", "a", "a-twin", "d"]


@pytest.mark.parametrize("key, larger", [("throughput_tokens_per_s", True), ("vllm_throughput_tokens_per_s", True),
                                         ("latency_ms_per_token", False), ("parameters", False),
                                         ("disk_bytes", False), ("peak_rss_mb", False), ("peak_memory_mb", False)])
def test_cost_directions(key, larger):
    assert larger_is_better(key) is larger


def test_pareto_plot_writes_png(tmp_path):
    out = tmp_path / "pareto.png"
    front = pareto_plot(ROWS, str(out), quality_key="kl_exact", quality_label="KL(teacher || student), nats/token")
    assert front == ["teacher", "s-mid", "s-fast"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no row has both 'perplexity' and 'throughput_tokens_per_s'"):
        pareto_plot(ROWS, str(out), quality_key="perplexity", quality_label="ppl")
