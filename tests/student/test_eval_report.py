"""student-eval (student_train/eval_report.py): the report's numbers equal direct computations on tiny
models (parameters, disk, KL, accuracy), a run folder's report is reused, the Pareto fronts are the
ones of its rows, and every bad argument is refused by name with exit code 1."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from student_train.eval_cli import cli
from student_train.pareto import pareto_front
from tests.student.conftest import other_model
from tests.student.test_fidelity import direct

FAST = ["--new-tokens", "2", "--batch-size", "2", "--repeats", "1", "--no-vllm", "--task-limit", "2",
        "--task-max-new-tokens", "3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_dir):
    d = tmp_path_factory.mktemp("eval-report")
    run = d / "run"
    other_model(run / "student", smollm2_dir, seed=1)
    (run / "report.json").write_text(json.dumps({
        "config": {"max_steps": 30, "loss": "forward_kl"},
        "eval_end": {"step": 30, "tokens": 123, "kl_forward": 1.25, "perplexity": 40.0, "top1_agreement": 0.3}}))
    plain = other_model(d / "plain", smollm2_dir, seed=2)
    return run, plain


def invoke(args):
    """(exit code, stdout, stdout and stderr)."""
    r = CliRunner().invoke(cli, args)
    return r.exit_code, r.stdout, r.output


def test_report_numbers_equal_direct_computations(tmp_path, models, tiny_teacher, full_cache):
    from transformers import AutoModelForCausalLM

    run, plain = models
    code, stdout, out = invoke([str(tiny_teacher), str(run), str(plain), "--out", str(tmp_path / "r"),
                                "--eval-cache", full_cache, "--json", *FAST])
    assert code == 0, out
    report = json.loads(stdout)
    rows = {r["name"]: r for r in report["models"]}
    assert list(rows) == ["teacher", "run", "plain"] and rows["teacher"]["role"] == "teacher"

    for name, model_dir in (("teacher", tiny_teacher), ("run", run / "student"), ("plain", plain)):
        row = rows[name]
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        assert row["parameters"] == sum(p.numel() for p in model.parameters()), name
        assert row["disk_bytes"] == sum(p.stat().st_size for p in model_dir.glob("*.safetensors")), name
        want = direct(str(model_dir), full_cache)
        for key in ("kl_forward_exact", "kl_reverse_exact", "perplexity", "top1_agreement"):
            assert row[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (name, key)
        items = [json.loads(x) for x in (tmp_path / "r" / "tasks" / name / "arithmetic.jsonl").read_text().splitlines()]
        assert len(items) == 2 and row["arithmetic_accuracy"] == sum(i["correct"] for i in items) / 2
        assert row["device"] == "cpu" and row["dtype"] == "float32" and row["latency_ms_per_token"] > 0
    assert rows["teacher"]["kl_forward_exact"] < 1e-5
    assert rows["run"]["training"]["steps"] == 30 and rows["run"]["fidelity"]["source"] == full_cache

    for key, by_cost in report["pareto"].items():          # the fronts are the rows' own
        lower = key.startswith("kl")
        for cost, f in by_cost.items():
            assert f["front"] == pareto_front(report["models"], key, cost, lower), (key, cost)
            assert (tmp_path / "r" / f["png"]).read_bytes()[:4] == b"\x89PNG"
    assert set(report["pareto"]) == {"arithmetic_accuracy", "kl_forward_exact"}
    md = (tmp_path / "r" / "report.md").read_text()
    for text in ("| teacher |", "| run |", "| plain |", "KL fwd", "arithmetic accuracy", "Pareto-optimal for",
                 f"{rows['plain']['kl_forward_exact']:.4g}", "pareto_kl_forward_exact_vs_parameters.png"):
        assert text in md, text


def test_a_runs_own_evaluation_stands_in_without_a_cache(tmp_path, models, tiny_teacher):
    run, _ = models
    code, stdout, out = invoke([str(tiny_teacher), str(run), "--out", str(tmp_path / "r"), "--task", "none", "--json",
                                *FAST])
    assert code == 0, out
    row = json.loads(stdout)["models"][1]
    assert (row["kl_forward"], row["perplexity"], row["top1_agreement"]) == (1.25, 40.0, 0.3)
    assert "the run's own held-out evaluation" in row["fidelity"]["source"] and "arithmetic_accuracy" not in row


@pytest.mark.parametrize("extra, message", [
    (["/no/such/student"], "error: /no/such/student: no such model directory or training run"),
    (["--names", "a,b,c"], "error: --names: need 2 distinct non-empty names (teacher first), got ['a', 'b', 'c']"),
    (["--task", "gsm9k"], "error: --task 'gsm9k': not a task"),
    (["--dtype", "int4"], "error: dtype 'int4': choose one of float32, bfloat16, float16"),
    (["--storage-options", "{oops"], "error: --storage-options: not JSON"),
    (["--eval-cache", "/no/such/cache"], "error: /no/such/cache: no manifest.json here: not a logitcache cache"),
])
def test_bad_arguments_are_refused_by_name(tmp_path, models, tiny_teacher, extra, message):
    run, _ = models
    args = [str(tiny_teacher), *(extra if extra[0].startswith("/no/such/s") else [str(run), *extra]),
            "--out", str(tmp_path / "r"), *FAST]
    code, _, out = invoke(args)
    assert code == 1 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "r" / "report.json").exists()


def test_the_arguments_are_checked_before_any_work(tmp_path, models, tiny_teacher):
    """A bad last student stops the report before the teacher is measured: nothing is written."""
    run, _ = models
    code, _, out = invoke([str(tiny_teacher), str(run), str(tmp_path / "missing"), "--out", str(tmp_path / "r"), *FAST])
    assert code == 1 and "missing: no such model directory or training run" in out
    assert not (tmp_path / "r").exists()


def test_a_model_of_another_tokenizer_is_refused_on_the_cache(tmp_path, models, tiny_teacher, full_cache):
    _, plain = models
    other = tmp_path / "other"
    shutil.copytree(plain, other)
    cfg = json.loads((other / "tokenizer.json").read_text())
    cfg["model"]["vocab"]["zzzz-new-token"] = len(cfg["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(cfg))
    code, _, out = invoke([str(tiny_teacher), str(other), "--out", str(tmp_path / "r"), "--eval-cache", full_cache,
                        "--task", "none", *FAST])
    assert code == 1 and "the student's tokenizer differs from the teacher tokenizer" in out, out
    assert not (tmp_path / "r").exists()                  # refused before the teacher was measured


def test_every_documented_student_eval_command_parses():
    """The examples in README, docs and the Makefile name real options with valid values (parsed, not run:
    the GPU and hub ones cannot run here; make demo runs its own)."""
    from tests.student.test_rounds import documented_commands

    commands = documented_commands("student-eval")
    assert len(commands) >= 4
    for args in commands:
        cli.make_context("student-eval", [a.replace("$(DEMO)", "demo_out") for a in args])


@pytest.mark.skipif(not __import__("student_train.tasks.lm_eval_task", fromlist=["x"]).lm_eval_available(),
                    reason="lm-eval is not installed (pip install 'logitcache[eval]'; make test installs it)")
def test_the_documented_lm_eval_task_file_runs_as_written(tmp_path, monkeypatch, tiny_teacher):
    """docs/training.md's YAML, with the data file its text describes, runs through --task FILE.yaml."""
    import re
    from pathlib import Path

    from student_train.tasks import TaskSettings, parse_task

    docs = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", docs[docs.index("### Tasks"):], re.S).group(1)
    row = re.search(r"rows such as `(\{.*?\})`", docs.replace("\n", " ")).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_task.yaml").write_text(block)
    (tmp_path / "my_arith_mc.jsonl").write_text(json.dumps(json.loads(row)) + "\n")
    task = parse_task("my_task.yaml")
    result = task.run(str(tiny_teacher), TaskSettings(limit=1))
    assert (task.name, task.metric, result.n) == ("my_arith_mc", "acc", 1) and result.value in (0.0, 1.0)
