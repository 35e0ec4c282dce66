"""student_train/cost.py: sizes counted right, every timing and memory figure present, bad settings refused."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from student_train import cost


def tiny_llama(path, tie: bool = True):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return model


def test_measure_tiny_model_in_run_dir(tmp_path):
    """A training-run layout (run/model/), tied embeddings, no tokenizer: random prompt ids."""
    model = tiny_llama(tmp_path / "run" / "model")
    expected_params = sum(p.numel() for p in model.parameters())
    assert expected_params < sum(p.numel() for p in model.state_dict().values())   # tied: counted once
    weights = list((tmp_path / "run" / "model").glob("*.safetensors"))
    expected_disk = sum(p.stat().st_size for p in weights)

    row = cost.measure_model(str(tmp_path / "run"), name="tiny", new_tokens=4, batch_size=2, threads=1, repeats=1)

    assert row["model_dir"] == str(tmp_path / "run" / "model")
    assert row["parameters"] == expected_params
    assert row["non_embedding_parameters"] == expected_params - 512 * 32
    assert weights and row["disk_bytes"] == expected_disk
    assert row["prompt_source"] == "random" and row["threads"] == 1
    assert (row["device"], row["dtype"]) == ("cpu", "float32")
    for key in ("latency_ms_per_token", "prefill_tokens_per_s", "throughput_tokens_per_s", "peak_rss_mb",
                "peak_rss_generate_mb"):
        assert row[key] > 0, key
    assert row["peak_rss_mb"] >= row["rss_before_load_mb"]


def test_peak_memory_is_the_childs_own_not_the_parents(tmp_path):
    """Linux carries getrusage's ru_maxrss over fork and exec: the child must not report its parent's peak."""
    tiny_llama(tmp_path / "m")
    ballast = torch.ones(1000 * 2**20 // 4)           # 1 GB resident in this (the parent) process
    ballast.add_(1)
    row = cost.measure_model(str(tmp_path / "m"), name="tiny", new_tokens=2, batch_size=1, threads=1, repeats=1)
    assert row["peak_rss_mb"] < row["rss_before_load_mb"] + 300       # a tiny model: tens of MB above the runtime
    del ballast


def test_untied_output_counts_in_parameters(tmp_path):
    model = tiny_llama(tmp_path / "m", tie=False)
    row = cost.measure_model(str(tmp_path / "m"), name="u", new_tokens=2, batch_size=1, threads=1, repeats=1,
                             dtype="bfloat16")
    assert row["parameters"] == sum(p.numel() for p in model.parameters())
    assert row["non_embedding_parameters"] == row["parameters"] - 2 * 512 * 32
    assert row["dtype"] == "bfloat16"


@pytest.mark.parametrize("kwargs, message", [
    ({"new_tokens": 1}, "new_tokens 1: must be >= 2"),
    ({"batch_size": 0}, "batch_size 0, repeats 2: both must be >= 1"),
    ({"dtype": "int8"}, "dtype 'int8': choose one of float32, bfloat16, float16"),
    ({"device": "tpu"}, "device 'tpu': choose cpu, cuda or cuda:N"),
])
def test_bad_settings_are_refused_by_name(tmp_path, kwargs, message):
    tiny_llama(tmp_path / "m")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        cost.measure_model(str(tmp_path / "m"), name="x", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_is_refused_without_a_gpu(tmp_path):
    tiny_llama(tmp_path / "m")
    with pytest.raises(ValueError, match="device 'cuda': this machine has no CUDA device"):
        cost.measure_model(str(tmp_path / "m"), name="x", device="cuda")


def test_not_a_model_directory_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no config.json here nor in one subdirectory"):
        cost.resolve_model_dir(tmp_path / "empty")


def test_vllm_throughput_says_why_it_has_no_number(tmp_path, monkeypatch):
    import logitcache.teacher.vllm_backend as vb

    tiny_llama(tmp_path / "m")
    monkeypatch.setattr(vb, "vllm_available", lambda: False)
    assert cost.vllm_throughput(str(tmp_path / "m")) == {"vllm_error": "vLLM is not installed"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the device memory figure and CUDA timing")
def test_measure_on_cuda_reports_device_memory(tmp_path):
    tiny_llama(tmp_path / "m")
    row = cost.measure_model(str(tmp_path / "m"), name="g", device="cuda", dtype="bfloat16", new_tokens=4,
                             batch_size=2, repeats=1)
    assert row["device"].startswith("cuda (") and row["peak_memory_mb"] > 0
