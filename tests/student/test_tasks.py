"""student_train/tasks: the shipped task's answers and scorer against hand-computed values, every kind of
task through one conformance class, lm-eval's scores against a direct computation, refusals by name."""

from __future__ import annotations

import ast
import json
import operator
import re

import pytest
import torch

from logitcache.format.errors import LogitcacheError
from student_train.tasks import SHIPPED, ExactMatchTask, LmEvalTask, TaskSettings, parse_task, registry
from student_train.tasks.exact_match import is_correct, last_number, read_items
from student_train.tasks.lm_eval_task import lm_eval_available

needs_lm_eval = pytest.mark.skipif(not lm_eval_available(),
                                   reason="lm-eval is not installed (pip install 'logitcache[eval]'; make test installs it)")


@pytest.mark.parametrize("text, expected", [
    ("23 + 45 = 68", 68.0),
    ("The answer is 18.", 18.0),
    ("She pays $1.50 for each, so $4,800 in all.", 4800.0),
    ("It is -3 degrees, then 12.5", 12.5),
    ("7 apples.", 7.0),
    ("no number here", None),
    ("3.", 3.0),
])
def test_last_number_by_hand(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize("response, answer, right", [
    ("12 times 11 is 132.", 132.0, True),
    ("300 - 120 = 100", 180.0, False),
    ("The total is 4,800", 4800.0, True),
    ("so it costs $6.00", 6.0, True),
    ("2500 grams, that is 2.5 kg", 2.5, True),       # the last number decides
    ("", 5.0, False),
])
def test_scorer_by_hand(response, answer, right):
    assert is_correct(response, answer) is right


OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.Pow: operator.pow}


def evaluate(expr: str) -> float:
    """The arithmetic of an expression string, without eval: numbers and + - * / ** only."""
    def walk(n):
        if isinstance(n, ast.Expression):
            return walk(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in OPS:
            return OPS[type(n.op)](walk(n.left), walk(n.right))
        raise ValueError(f"not arithmetic: {ast.dump(n)}")
    return walk(ast.parse(expr, mode="eval"))


def test_shipped_arithmetic_answers_equal_their_expressions():
    rows = [json.loads(x) for x in SHIPPED["arithmetic"].read_text().splitlines()]
    assert len(rows) == 64 and len({r["id"] for r in rows}) == 64 and len({r["prompt"] for r in rows}) == 64
    for r in rows:
        assert float(r["answer"]) == evaluate(r["expression"]), r
    by_id = {r["id"]: r for r in rows}          # a few by hand
    assert by_id["arith-000"]["answer"] == "68" and by_id["arith-037"]["answer"] == "26"
    assert by_id["arith-063"]["answer"] == "2500" and by_id["arith-060"]["answer"] == "20"


def test_shipped_prompts_are_not_the_capture_prompts():
    """The task is held out: none of its questions is among the builtin prompts the demo captures."""
    from logitcache.teacher.inputs import builtin_prompts_path

    builtin = {json.loads(x)["prompt"] for x in builtin_prompts_path().read_text().splitlines()}
    ours = [json.loads(x)["prompt"] for x in SHIPPED["arithmetic"].read_text().splitlines()]
    assert not any(p.split(" Answer with")[0] in b for p in ours for b in builtin)


@pytest.mark.parametrize("content, message", [
    ("{not json\n", "line 1: not JSON"),
    ('{"prompt": "q"}\n', "line 1: needs 'prompt' (or 'messages') and 'answer'"),
    ('{"prompt": "q", "answer": 1}\n{"prompt": "r", "answer": "seven"}\n', "line 2: answer 'seven' is not a number"),
    ("\n", "no rows"),
])
def test_bad_task_files_are_refused_by_line(tmp_path, content, message):
    f = tmp_path / "t.jsonl"
    f.write_text(content)
    with pytest.raises(LogitcacheError, match=re.escape(f"task file {f}, {message}" if "line" in message else message)):
        read_items(f)


@pytest.mark.parametrize("spec, message", [
    ("gsm9k", "--task 'gsm9k': not a task; give a shipped task (arithmetic)"),
    ("missing.yaml", "--task missing.yaml: no such lm-eval task file"),
    ("missing.jsonl", "--task missing.jsonl: no such file"),
])
def test_unknown_tasks_are_refused(spec, message):
    with pytest.raises(LogitcacheError, match=re.escape(message)):
        parse_task(spec)


# --- every kind of task: one conformance class ---------------------------------------------------

MC_ROWS = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b - 1), str(a + b), str(a + b + 1)], "label": 1}
           for a, b in [(2, 3), (10, 4), (7, 7), (21, 9), (5, 12), (30, 30)]]


def local_lm_eval_task(d) -> str:
    """A multiple-choice lm-eval task over a local file: nothing from the hub."""
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return str(d / "tiny_mc.yaml")


class TaskTests:
    """What every kind of task promises: a result with n items, a value in [0, 1] that is the mean of
    its items' scores, the same value twice for the same model, and a column named after the task."""

    limit = 3

    @pytest.fixture
    def task(self, tmp_path):
        raise NotImplementedError

    def item_score(self, item: dict) -> float:
        raise NotImplementedError

    def test_result_shape_and_determinism(self, task, tiny_teacher):
        settings = TaskSettings(limit=self.limit, batch_size=2, max_new_tokens=4)
        first = task.run(str(tiny_teacher), settings)
        again = task.run(str(tiny_teacher), settings)
        assert first.n == self.limit and len(first.items) == self.limit
        assert 0.0 <= first.value <= 1.0
        assert first.value == pytest.approx(sum(self.item_score(i) for i in first.items) / self.limit)
        assert again.value == first.value and again.items == first.items
        assert task.column == f"{task.name}_{task.metric}" and first.metric == task.metric
        assert set(first.summary()) == {"task", "metric", "value", "n", "stderr", "higher_is_better"}

    def test_registered(self, task):
        assert registry()[task.kind] is type(task)


class TestExactMatchTask(TaskTests):
    @pytest.fixture
    def task(self, tmp_path):
        return parse_task("arithmetic")

    def item_score(self, item):
        assert item["correct"] is is_correct(item["response"], float(item["answer"]))
        return float(item["correct"])

    def test_responses_are_the_models_greedy_answers(self, task, tiny_teacher):
        """The first item's response equals greedy generation done here, under the chat template."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        result = task.run(str(tiny_teacher), TaskSettings(limit=1, max_new_tokens=5))
        tok = AutoTokenizer.from_pretrained(tiny_teacher)
        model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
        ids = tok.apply_chat_template([{"role": "user", "content": task.items[0]["prompt"]}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert result.items[0]["response"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@needs_lm_eval
class TestLmEvalTask(TaskTests):
    limit = 6

    @pytest.fixture
    def task(self, tmp_path):
        return parse_task(local_lm_eval_task(tmp_path))

    def item_score(self, item):
        return float(item["acc"])

    def test_accuracy_equals_a_direct_loglikelihood_computation(self, task, tiny_teacher):
        """Each choice's log-likelihood as lm-eval reports it equals one computed here from the model's
        logits (context, then ' ' + choice), and acc is the share of argmaxes at the label."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        result = task.run(str(tiny_teacher), TaskSettings(limit=6, batch_size=4))
        assert task.metric == "acc" and result.n == 6
        tok = AutoTokenizer.from_pretrained(tiny_teacher)
        model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
        right = 0
        for item in sorted(result.items, key=lambda i: i["doc_id"]):
            row = MC_ROWS[item["doc_id"]]
            context = f"Question: {row['question']}\nAnswer:"
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            lls = []
            for choice in row["choices"]:
                whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
                lls.append(sum(float(logp[j - 1, whole[j]]) for j in range(len(ctx), len(whole))))
            got = [r[0] for r in item["responses"]]
            assert got == pytest.approx(lls, abs=1e-3)
            right += int(max(range(3), key=lambda k: lls[k]) == row["label"])
            assert item["acc"] == float(max(range(3), key=lambda k: lls[k]) == row["label"])
        assert result.value == pytest.approx(right / 6)

    def test_unknown_lm_eval_task_is_named(self, tiny_teacher):
        with pytest.raises(LogitcacheError, match="--task lm-eval:no_such_task_here: lm-eval knows no such task"):
            LmEvalTask("no_such_task_here").run(str(tiny_teacher), TaskSettings(limit=1))


def test_lm_eval_missing_is_a_clear_error(monkeypatch, tiny_teacher):
    import student_train.tasks.lm_eval_task as m

    monkeypatch.setattr(m, "lm_eval_available", lambda: False)
    with pytest.raises(LogitcacheError, match=r"lm-eval is not installed; pip install 'logitcache\[eval\]'"):
        LmEvalTask("anything").run(str(tiny_teacher), TaskSettings(limit=1))


def test_exact_match_from_a_users_file(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "What is 1 plus 1?", "answer": 2}\n'
                 '{"messages": [{"role": "user", "content": "Two times 3?"}], "answer": "6"}\n')
    task = parse_task(str(f))
    assert isinstance(task, ExactMatchTask) and task.name == "mine"
    assert [i["answer_value"] for i in task.items] == [2.0, 6.0] and task.items[1]["prompt"] == "Two times 3?"
