"""The conformance class every capture backend runs: subclass ``BackendTests`` with the backend's name,
the teacher it runs (a fixture name) and its stated tolerances, and its captures are held to a direct
transformers computation on the same model (float64 log-softmax over the whole vocabulary):

- score mode: tokens, the stored distribution (the most probable ids up to ties, their values within
  the encoding's bound plus the backend's, the exact tail), entropy, target log-prob, hidden states,
  the per-sample statistics, the fill values outside the scored rows;
- generate mode (greedy, a system prompt, prompt rows scored too): the responses of an unbatched
  ``model.generate``, then the same checks on every scored row;
- every registered encoding passes its checks (both backends capture them all).

The score capture stores ``topk``; the generate capture stores the default encoding, so both the
plain and the ragged path of each backend are checked. tests/teacher/test_hf_backend.py and
tests/teacher/test_vllm.py are the subclasses.
"""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import torch

from logitcache import open_cache
from logitcache.format.encodings import DEFAULT_ENCODING, REGISTRY

TEXTS = [
    "The capital of France is Paris",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in the leaves of plants.",
    "A train leaves at 3 pm and travels 120 km at 60 km/h, so it arrives at 5 pm.",
]
PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Name three primary colors.", "What is 12 times 12?"]
SYSTEM = "Be brief."


def direct(model, tokens) -> tuple[torch.Tensor, tuple]:
    """Float64 log-softmax over the vocabulary at every position of one sequence, and the hidden states."""
    with torch.no_grad():
        out = model(torch.tensor([np.asarray(tokens, dtype=np.int64).tolist()]), output_hidden_states=True)
    return torch.log_softmax(out.logits[0].double(), -1), out.hidden_states


class BackendTests:
    """Set ``backend``, ``teacher`` (the name of a fixture giving the model directory) and the
    tolerances; implement nothing else unless the backend captures out of process (``capture``)."""

    backend: ClassVar[str]
    teacher: ClassVar[str]
    top_k: ClassVar[int] = 8
    hidden_layers: ClassVar[list[int]] = [0, 1, -1]
    # stored float16 log-probs against the direct float64 values: |a - b| <= atol + rtol * |b|
    logprob_atol: ClassVar[float] = 2e-3
    logprob_rtol: ClassVar[float] = 1e-3
    entropy_tol: ClassVar[float] = 1e-4          # entropy and target log-prob (float32)
    tail_atol: ClassVar[float] = 1e-5            # a stored tail (float32, computed on the device)
    hidden_rtol: ClassVar[float] = 1 / 128       # bfloat16 storage
    hidden_atol: ClassVar[float] = 1e-2          # times the row's largest |value| where hidden_atol_scaled
    hidden_atol_scaled: ClassVar[bool] = False
    hidden_of_last_generated_token: ClassVar[bool] = True   # vLLM never feeds the last token back
    max_new_tokens: ClassVar[int] = 12

    def capture(self, cache, **job) -> None:
        """Run a capture of ``CaptureJob`` fields ``job`` with this backend into ``cache``."""
        from logitcache.teacher.capture import CaptureJob, run_capture

        run_capture(CaptureJob(cache=str(cache), backend=self.backend, progress=False, **job))

    # ---- fixtures --------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    def teacher_dir(self, request):
        return request.getfixturevalue(self.teacher)

    @pytest.fixture(scope="class")
    def model(self, teacher_dir):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()

    @pytest.fixture(scope="class")
    def scored(self, tmp_path_factory, teacher_dir):
        d = tmp_path_factory.mktemp(f"{self.backend}-score")
        (d / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
        self.capture(d / "cache", teacher=str(teacher_dir), mode="score", source=str(d / "texts.jsonl"),
                     encoding="topk", top_k=self.top_k, hidden_layers=self.hidden_layers, samples_per_shard=3,
                     batch_tokens=64)
        return open_cache(str(d / "cache"), verify=True)

    @pytest.fixture(scope="class")
    def generated(self, tmp_path_factory, teacher_dir):
        d = tmp_path_factory.mktemp(f"{self.backend}-generate")
        (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
        self.capture(d / "cache", teacher=str(teacher_dir), source=str(d / "prompts.jsonl"), encoding=DEFAULT_ENCODING,
                     top_k=self.top_k, max_new_tokens=self.max_new_tokens, with_prompt=True, system_prompt=SYSTEM,
                     hidden_layers=[-1])
        return open_cache(str(d / "cache"), verify=True)

    # ---- what every backend stores -----------------------------------------------------------------
    def check_against_direct(self, cache, model, generate: bool = False) -> None:
        check_against_direct(cache, model, self, generate)

    def test_score_mode_stores_what_a_direct_computation_gives(self, scored, model, teacher_dir):
        from transformers import AutoTokenizer

        m = scored.manifest
        assert m.teacher.backend == self.backend and m.complete and m.num_samples == len(TEXTS)
        assert m.capture.hidden_layers == sorted({x if x >= 0 else x + m.teacher.num_layers + 1
                                                  for x in self.hidden_layers})
        tok = AutoTokenizer.from_pretrained(teacher_dir)
        for rec, text in zip(scored.samples.to_pylist(), TEXTS):
            tokens = scored.sample(rec["sample_id"])["tokens"]
            assert tokens.tolist() == tok(text, add_special_tokens=True)["input_ids"]
            assert (rec["scored_start"], rec["scored_end"]) == (0, rec["num_tokens"] - 1)
        self.check_against_direct(scored, model)

    def test_generate_greedy_matches_unbatched_generate(self, generated, model, teacher_dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(teacher_dir)
        eos = generated.manifest.tokenizer.eos_token_ids
        assert generated.manifest.capture.encoding["name"] == DEFAULT_ENCODING
        assert [r["prompt"] for r in generated.samples.to_pylist()] == PROMPTS
        for rec, prompt in zip(generated.samples.to_pylist(), PROMPTS):
            text = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                           add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                ref = model.generate(torch.tensor([ids]), max_new_tokens=self.max_new_tokens, do_sample=False,
                                     eos_token_id=eos, pad_token_id=eos[0])[0, len(ids):].tolist()
            stop = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
            tokens = generated.sample(rec["sample_id"])["tokens"].tolist()
            assert tokens[:len(ids)] == ids and tokens[len(ids):] == ref[:stop], f"prompt {rec['row']}"
            assert rec["prompt_tokens"] == len(ids)
            assert rec["finish_reason"] == ("stop" if ref[stop - 1] in eos else "length")
            # --with-prompt: every row but the last is scored, prompt rows and response rows
            assert (rec["scored_start"], rec["scored_end"]) == (0, rec["num_tokens"] - 1)
        self.check_against_direct(generated, model, generate=True)

    def test_every_encoding_is_accepted(self, tmp_path):
        """Both backends capture every registered encoding (draws, exact tails, whole rows)."""
        from logitcache.teacher.capture import CaptureJob, validate

        for name in REGISTRY:
            validate(CaptureJob(cache=str(tmp_path / name), backend=self.backend, encoding=name))


def check_against_direct(cache, model, tol, generate: bool = False) -> None:
    """Every sample of ``cache`` against ``direct``: distribution, entropy, target log-prob, hidden
    states, per-sample statistics, fill values outside the scored rows, within the tolerances of
    ``tol`` (a ``BackendTests`` class or instance)."""
    enc = cache.encoding
    m = cache.manifest
    atol, rtol = enc.value_tolerance(m.capture.logprob_dtype)
    dist = {s.name: s for s in enc.specs(m.teacher.vocab_size, m.capture.logprob_dtype, m.capture.top_k)}
    for rec in cache.samples.to_pylist():
        a, view = cache.sample(rec["sample_id"]), cache.sample_view(rec["sample_id"])
        logp, hidden = direct(model, a["tokens"])
        s, e = rec["scored_start"], rec["scored_end"]
        where = f"{m.teacher.backend} sample {rec['row']}"
        ids, probs = view["ids"][s:e], view["probs"][s:e].astype(np.float64)
        have = ids >= 0
        assert have[:, 0].all(), f"{where}: a scored row without a distribution"
        want = logp[s:e].gather(-1, torch.from_numpy(np.where(have, ids, 0))).numpy()
        got = np.log(np.where(have, probs, 1.0))
        bound = atol + tol.logprob_atol + (rtol + tol.logprob_rtol) * np.abs(want)
        bad = have & (np.abs(got - want) > bound)
        assert not bad.any(), f"{where}: {bad.sum()} stored log-probs off the direct values"
        # the most probable ids: each stored id is at least the c-th largest direct value (ties allowed)
        count = have.sum(1)
        kth = torch.sort(logp[s:e], -1, descending=True).values.numpy()[np.arange(e - s), count - 1]
        lowest = np.where(have, want, np.inf).min(1)
        assert (lowest >= kth - 2 * tol.logprob_atol - atol).all(), f"{where}: not the most probable ids"
        # the tail: the direct mass outside the stored ids
        outside = np.clip(1 - np.where(have, np.exp(want), 0.0).sum(1), 0, None)
        # stored exactly, or derived from the stored values (1 - sum p: their rounding adds up)
        derived = 0.0 if enc.stores_tail else np.where(have, np.exp(want) * np.expm1(bound), 0.0).sum(1)
        assert (np.abs(view["tail"][s:e] - outside) <= tol.tail_atol + derived).all(), f"{where}: tail"
        p = logp[s:e].exp()
        ent = -(p * logp[s:e]).nan_to_num().sum(-1).numpy()
        np.testing.assert_allclose(a["entropy"][s:e], ent, rtol=tol.entropy_tol, atol=tol.entropy_tol,
                                   err_msg=f"{where}: entropy")
        nxt = torch.tensor(a["tokens"][s + 1:e + 1].astype(np.int64))
        np.testing.assert_allclose(a["target_logprob"][s:e], logp[s:e].gather(-1, nxt[:, None])[:, 0].numpy(),
                                   atol=max(tol.entropy_tol, 1e-4), err_msg=f"{where}: target log-prob")
        # outside the scored rows: fill values (token-major arrays) and no entries
        out = np.ones(rec["num_tokens"], dtype=bool)
        out[s:e] = False
        assert np.isnan(a["entropy"][out]).all() and np.isnan(a["target_logprob"][out]).all()
        for name, spec in dist.items():
            if not spec.per_entry:
                fill = np.full(a[name][out].shape, spec.fill, dtype=np.float64)
                np.testing.assert_array_equal(a[name][out].astype(np.float64), fill, err_msg=f"{where}: {name}")
        assert rec["mean_entropy"] == pytest.approx(float(ent.mean()), rel=max(tol.entropy_tol, 1e-4))
        assert rec["teacher_logprob_sum"] == pytest.approx(float(a["target_logprob"][s:e].sum()), rel=1e-5)
        rows = rec["num_tokens"] - (0 if not generate or tol.hidden_of_last_generated_token else 1)
        for layer in m.capture.hidden_layers:
            got_h, want_h = a[f"hidden/{layer}"][:rows], hidden[layer][0].float().numpy()[:rows]
            scale = np.abs(want_h).max(1, keepdims=True) if tol.hidden_atol_scaled else 1.0
            assert np.all(np.abs(got_h - want_h) <= tol.hidden_rtol * np.abs(want_h) + tol.hidden_atol * scale), \
                f"{where}: hidden/{layer}"
            if rows < rec["num_tokens"]:
                assert not a[f"hidden/{layer}"][rows:].any(), f"{where}: hidden/{layer} of the last token"
