"""The vLLM paths that only a GPU runs: the V2 model runner's hook (``compute_topk_scores``: entropy and
exact tails), the V1 runner selected for keyed draws, and hidden states through vLLM's
``extract_hidden_states`` (the GPU default), each against a direct transformers computation on SmolLM2.

Skipped with a message where no CUDA device or no vLLM is present (this project's CI machine has no
GPU); run them on a GPU machine with `pytest tests/teacher/test_vllm_gpu.py` after `pip install vllm`.
"""

import os
import subprocess
import sys

import pytest

from logitcache.teacher.vllm_backend import vllm_available

torch = pytest.importorskip("torch")
if not (torch.cuda.is_available() and vllm_available()):
    pytest.skip("needs a CUDA GPU and a CUDA build of vLLM (pip install vllm); this machine has "
                f"{'no GPU' if not torch.cuda.is_available() else 'no vLLM'}", allow_module_level=True)

from logitcache import open_cache  # noqa: E402
from tests.teacher.backend_conformance import check_against_direct  # noqa: E402
from tests.teacher.estimators import sampled_z  # noqa: E402
from tests.teacher.test_vllm import TestVLLMBackend, cli_flags  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.gpu]


def gpu_capture(cache, env: dict | None = None, **job):
    cmd = [sys.executable, "-m", "logitcache.cli.main", "capture", str(cache), "--backend", "vllm", "--dtype",
           "float32", "--no-progress", "--json", *cli_flags(job)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return open_cache(str(cache), verify=True)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_v2_runner_hook_stores_what_a_direct_computation_gives(tmp_path, inputs, smollm2_dir, smollm2_model, mode):
    source = inputs / ("texts.jsonl" if mode == "score" else "prompts.jsonl")
    cache = gpu_capture(tmp_path / "c", env={"VLLM_USE_V2_MODEL_RUNNER": "1"}, teacher=str(smollm2_dir), mode=mode,
                        source=str(source), encoding="compact", top_k=16, max_new_tokens=16, with_prompt=True)
    check_against_direct(cache, smollm2_model, TestVLLMBackend, generate=mode == "generate")


def test_hidden_states_through_extract_hidden_states(tmp_path, inputs, smollm2_dir, smollm2_model):
    cache = gpu_capture(tmp_path / "c", teacher=str(smollm2_dir), mode="score", source=str(inputs / "texts.jsonl"),
                        encoding="topk", top_k=16, hidden_layers=[0, 15, -1])
    assert cache.manifest.capture.hidden_layers == [0, 15, 30]
    check_against_direct(cache, smollm2_model, TestVLLMBackend)


def test_keyed_draws_on_the_gpu_pass_the_estimator_test(tmp_path, inputs, smollm2_dir, smollm2_model):
    cache = gpu_capture(tmp_path / "c", teacher=str(smollm2_dir), mode="score", source=str(inputs / "texts.jsonl"),
                        encoding="sampled", draws=64)
    z, rows = sampled_z(cache, smollm2_model)
    assert rows > 50 and abs(z) < 4.5
