"""Any task of EleutherAI's lm-evaluation-harness (PyPI ``lm-eval``, the optional extra
``logitcache[eval]``), by name or from a local YAML file.

A name is looked up among lm-eval's own tasks and the YAML files under ``include`` (a directory);
a YAML file brings its directory as ``include``. The model runs through lm-eval's Hugging Face model
(``model="hf"``) on the device and dtype of the settings. The reported metric is the task's first
one (``acc``, ``exact_match``, ...; a filter other than ``none`` is named in brackets), with lm-eval's
standard error. Nothing here downloads: a task whose data lives on the hub needs the network, a task
whose YAML names local files (``dataset_path: json`` + ``dataset_kwargs.data_files``) does not.
"""

from __future__ import annotations

import re
from pathlib import Path

from logitcache.format.errors import LogitcacheError

from .base import Task, TaskResult, TaskSettings

INSTALL = "pip install 'logitcache[eval]' (or pip install lm-eval)"


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def yaml_task_name(path: Path) -> str:
    """The ``task:`` name of an lm-eval YAML file (read as text: such files may hold ``!function`` tags)."""
    match = re.search(r"^task:\s*['\"]?([^'\"\s#]+)", path.read_text(), re.MULTILINE)
    if not match:
        raise LogitcacheError(f"--task {path}: no 'task: NAME' line; not an lm-eval task file")
    return match.group(1)


def primary_metric(results: dict) -> tuple[str, str, float, float | None]:
    """(metric name as reported, lm-eval key, value, stderr) of a task's first metric."""
    for key, value in results.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        stderr = results.get(f"{metric}_stderr,{filt}")
        name = metric if filt == "none" else f"{metric}[{filt}]"
        return name, key, float(value), float(stderr) if isinstance(stderr, (int, float)) else None
    raise LogitcacheError(f"lm-eval returned no metric ({sorted(results)})")


def item_record(sample: dict, metric: str) -> dict:
    """One answered item as lm-eval logged it: the target, the model's filtered responses (log-likelihoods
    for choice tasks, text for generation tasks) and its score."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (str, int, float, bool)) or v is None else float(v)

    return {"doc_id": sample.get("doc_id"), "target": plain(sample.get("target")),
            "responses": plain(sample.get("filtered_resps")), metric: plain(sample.get(metric))}


class LmEvalTask(Task):
    kind = "lm-eval"
    higher_is_better = True

    def __init__(self, name: str, include: str | Path | None = None):
        self.name = name
        self.include = str(include) if include else None
        self.metric = "score"             # known once the harness has run: set by run()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "LmEvalTask":
        path = Path(path).expanduser().resolve()
        return cls(yaml_task_name(path), include=path.parent)

    def run(self, model_dir: str, settings: TaskSettings) -> TaskResult:
        if not lm_eval_available():
            raise LogitcacheError(f"--task lm-eval:{self.name}: lm-eval is not installed; {INSTALL}")
        import lm_eval
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=self.include) if self.include else TaskManager()
        if self.name not in manager.all_tasks:
            raise LogitcacheError(f"--task lm-eval:{self.name}: lm-eval knows no such task"
                                  + (f" (nor do the YAML files in {self.include})" if self.include else ""))
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype={settings.dtype}",
                                      tasks=[self.name], task_manager=manager, device=settings.device,
                                      batch_size=settings.batch_size, limit=settings.limit,
                                      gen_kwargs=f"max_gen_toks={settings.max_new_tokens}", log_samples=True)
        results = out["results"].get(self.name) or next(iter(out["results"].values()))
        metric, _, value, stderr = primary_metric(results)
        self.metric = metric
        n = out.get("n-samples", {}).get(self.name, {}).get("effective") or results.get("sample_len") or 0
        higher = out.get("higher_is_better", {}).get(self.name, {}).get(metric.split("[")[0], True)
        return TaskResult(self.name, metric, value, int(n), stderr, bool(higher),
                          [item_record(s, metric.split("[")[0]) for s in out.get("samples", {}).get(self.name, [])])

