"""Generation + exact match on numeric answers, from a JSON-lines file (the shipped ``arithmetic`` task
is one such file).

Each row: ``prompt`` (or ``messages``, a chat) and ``answer`` (a number, as a string or a number); other
fields (``id``, ``expression``) are kept in the per-item records. The model answers greedily under its
own chat template; the answer is right when the **last number** in its response equals ``answer``
(commas between digit groups and a leading ``$`` ignored; equal within 1e-9 relative). The last number,
because a model that works the problem out writes its result last.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from logitcache.format.errors import LogitcacheError

from .base import Task, TaskResult, TaskSettings

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (``-3``, ``4,800``, ``$1.50``, ``12.5``), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def is_correct(response: str, answer: float) -> bool:
    got = last_number(response)
    return got is not None and math.isclose(got, answer, rel_tol=1e-9, abs_tol=1e-9)


def read_items(path: str | Path) -> list[dict]:
    """The rows of a task file, each checked: a prompt or messages, and a numeric answer."""
    items = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LogitcacheError(f"task file {path}, line {line_no}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not (row.get("prompt") or row.get("messages")) or "answer" not in row:
                raise LogitcacheError(f"task file {path}, line {line_no}: needs 'prompt' (or 'messages') and 'answer'")
            try:
                answer = float(str(row["answer"]).replace(",", ""))
            except ValueError:
                raise LogitcacheError(f"task file {path}, line {line_no}: answer {row['answer']!r} is not a number "
                                      "(exact-match tasks compare numbers)") from None
            messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            items.append({**row, "row": len(items), "messages": messages, "prompt": row.get("prompt") or
                          messages[-1]["content"], "answer_value": answer})
    if not items:
        raise LogitcacheError(f"task file {path}: no rows")
    return items


class ExactMatchTask(Task):
    kind = "exact-match"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.items = read_items(self.path)

    def run(self, model_dir: str, settings: TaskSettings) -> TaskResult:
        from ..rollout import SamplingSettings, generate, load_student

        items = self.items[:settings.limit]
        model, tokenizer = load_student(model_dir, settings.device, settings.dtype)
        rows = generate(model, tokenizer, items, SamplingSettings(settings.max_new_tokens, 0.0, 1.0, 0,
                                                                  settings.batch_size), device=settings.device)
        responses = {r["prompt_row"]: tokenizer.decode(r["response_ids"], skip_special_tokens=True) for r in rows}
        records = []
        for item in items:
            response = responses.get(item["row"], "")          # an empty answer is a wrong one
            records.append({"id": item.get("id", item["row"]), "prompt": item["prompt"], "answer": item["answer"],
                            "response": response, "extracted": last_number(response),
                            "correct": is_correct(response, item["answer_value"])})
        n = len(records)
        acc = sum(r["correct"] for r in records) / n
        return TaskResult(self.name, self.metric, acc, n, math.sqrt(acc * (1 - acc) / max(n - 1, 1)),
                          self.higher_is_better, records)
