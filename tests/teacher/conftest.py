"""Fixtures of the backend tests (tests/teacher/test_vllm.py, test_vllm_gpu.py)."""

import json

import pytest

from tests.teacher.backend_conformance import PROMPTS, TEXTS


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """texts.jsonl (the conformance texts) and prompts.jsonl (its prompts) in one directory."""
    d = tmp_path_factory.mktemp("vllm-inputs")
    (d / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return d


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir):
    """The embedded SmolLM2 teacher in transformers, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
