"""benchmarks/model_report.py: sizes counted right, the table shows them, the Pareto set is right."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_report  # noqa: E402  (a script directory, not a package; spawned children import it by name)


def test_measure_tiny_model_in_run_dir(tmp_path):
    """A training-run layout (run/model/), tied embeddings, no tokenizer: random prompt ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "run" / "model")
    expected_params = sum(p.numel() for p in model.parameters())
    assert expected_params < sum(p.numel() for p in model.state_dict().values())   # tied: counted once
    weights = list((tmp_path / "run" / "model").glob("*.safetensors"))
    expected_disk = sum(p.stat().st_size for p in weights)

    row = model_report.measure_model(str(tmp_path / "run"), name="tiny", new_tokens=4,
                                     batch_size=2, threads=1, repeats=1)

    assert row["model_dir"] == str(tmp_path / "run" / "model")
    assert row["parameters"] == expected_params
    assert row["non_embedding_parameters"] == expected_params - 512 * 32
    assert weights and row["disk_bytes"] == expected_disk
    assert row["prompt_source"] == "random" and row["threads"] == 1
    for key in ("latency_ms_per_token", "prefill_tokens_per_s", "throughput_tokens_per_s", "peak_rss_mb"):
        assert row[key] > 0, key

    row["kl_exact"] = 0.123456
    table = model_report.markdown_table([row])
    assert "| model | parameters (M) | disk (MB) |" in table and "kl_exact" in table
    for text in (f"{expected_params / 1e6:.2f}", f"{expected_disk / 1e6:.1f}",
                 f"{row['latency_ms_per_token']:.2f}", f"{row['throughput_tokens_per_s']:.1f}",
                 f"{row['peak_rss_mb']:.0f}", "0.1235"):
        assert text in table, text


ROWS = [  # quality: KL, lower is better; speed: throughput, higher is better
    {"name": "teacher", "throughput_tokens_per_s": 100.0, "kl_exact": 0.0, "top1_agreement": 1.0},
    {"name": "s-slow-bad", "throughput_tokens_per_s": 150.0, "kl_exact": 0.9, "top1_agreement": 0.5},
    {"name": "s-mid", "throughput_tokens_per_s": 200.0, "kl_exact": 0.3, "top1_agreement": 0.8},
    {"name": "s-fast", "throughput_tokens_per_s": 400.0, "kl_exact": 0.6, "top1_agreement": 0.7},
    {"name": "s-fast-worse", "throughput_tokens_per_s": 400.0, "kl_exact": 0.7, "top1_agreement": 0.6},
    {"name": "no-quality", "throughput_tokens_per_s": 900.0},
]


def test_pareto_front_on_hand_made_rows():
    front = model_report.pareto_front(ROWS, "kl_exact", "throughput_tokens_per_s", True)
    assert front == ["teacher", "s-mid", "s-fast"]               # slowest first
    assert model_report.pareto_front(ROWS, "top1_agreement", "throughput_tokens_per_s", False) == \
        ["teacher", "s-mid", "s-fast"]
    # Latency: lower is faster. s-b is both faster and better than s-a.
    rows = [{"name": "s-a", "latency_ms_per_token": 20.0, "kl_exact": 0.5},
            {"name": "s-b", "latency_ms_per_token": 10.0, "kl_exact": 0.4},
            {"name": "t", "latency_ms_per_token": 30.0, "kl_exact": 0.0}]
    assert model_report.pareto_front(rows, "kl_exact", "latency_ms_per_token", True) == ["t", "s-b"]


def test_pareto_plot_writes_png(tmp_path):
    out = tmp_path / "pareto.png"
    front = model_report.pareto_plot(ROWS, str(out), quality_key="kl_exact",
                                     quality_label="KL(teacher || student), nats/token")
    assert front == ["teacher", "s-mid", "s-fast"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        model_report.pareto_plot(ROWS, str(out), quality_key="perplexity", quality_label="ppl")
