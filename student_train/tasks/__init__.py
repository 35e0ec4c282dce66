"""Task accuracy: one class per kind of task, looked up in a registry.

Every kind has the same shape (``Task``): a ``name``, the ``metric`` it reports, whether higher is
better, and ``run(model_dir, settings)`` returning a ``TaskResult``. The kinds:

* ``exact-match`` (``ExactMatchTask``, tasks/exact_match.py): a JSON-lines file of questions with numeric
  answers; the model answers greedily under its chat template and an answer is right when the last
  number it writes equals the expected one. The task we ship, ``arithmetic`` (64 problems we wrote,
  each with the expression that gives its answer), is one.
* ``lm-eval`` (``LmEvalTask``, tasks/lm_eval_task.py): any task of EleutherAI's lm-evaluation-harness,
  by name or by a local YAML file (the optional extra ``logitcache[eval]``).

``parse_task(spec)`` turns what a user types into a task: ``arithmetic``, ``FILE.jsonl``,
``lm-eval:NAME`` or ``FILE.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from logitcache.format.errors import LogitcacheError

from .base import Task, TaskResult, TaskSettings
from .exact_match import ExactMatchTask
from .lm_eval_task import LmEvalTask

__all__ = ["Task", "TaskResult", "TaskSettings", "ExactMatchTask", "LmEvalTask", "SHIPPED", "registry", "parse_task"]

SHIPPED = {"arithmetic": Path(__file__).with_name("arithmetic.jsonl")}


def registry() -> dict[str, type[Task]]:
    """Every kind of task, by its ``kind`` (the lm-eval kind imports lm-eval only when it runs)."""
    return {cls.kind: cls for cls in (ExactMatchTask, LmEvalTask)}


def parse_task(spec: str) -> Task:
    """A task from what the user typed: a shipped task (``arithmetic``), a JSON-lines file of
    ``prompt``/``answer`` rows (exact match), ``lm-eval:NAME`` (a task lm-eval knows), or an lm-eval
    YAML file."""
    kinds = registry()
    spec = spec.strip()
    if spec in SHIPPED:
        return kinds["exact-match"](SHIPPED[spec], name=spec)
    if spec.startswith("lm-eval:") and spec[len("lm-eval:"):]:
        return kinds["lm-eval"](spec[len("lm-eval:"):])
    path = Path(spec).expanduser()
    if spec.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise LogitcacheError(f"--task {spec}: no such lm-eval task file")
        return kinds["lm-eval"].from_yaml(path)
    if spec.endswith((".jsonl", ".json")):
        if not path.is_file():
            raise LogitcacheError(f"--task {spec}: no such file")
        return kinds["exact-match"](path)
    raise LogitcacheError(f"--task {spec!r}: not a task; give a shipped task ({', '.join(SHIPPED)}), a JSON-lines file "
                          "of prompt/answer rows, lm-eval:NAME, or an lm-eval task YAML file")
