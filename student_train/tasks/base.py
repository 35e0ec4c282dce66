"""What every kind of task shares: the settings a task runs with, its result, and the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field

from logitcache.format.errors import LogitcacheError


@dataclass(frozen=True)
class TaskSettings:
    """How every task runs a model: on ``device`` in ``dtype``, ``limit`` items at most (None: all),
    ``batch_size`` at a time, generating at most ``max_new_tokens`` per answer (greedy)."""

    device: str = "cpu"
    dtype: str = "float32"
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 64

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise LogitcacheError(f"--task-limit must be >= 1, got {self.limit}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise LogitcacheError(f"task batch size {self.batch_size} and max new tokens {self.max_new_tokens}: "
                                  "both must be >= 1")


@dataclass
class TaskResult:
    """One model on one task: ``value`` of ``metric`` over ``n`` items, its standard error, and the
    per-item records (question, answer, response, correct) where the kind keeps them."""

    task: str
    metric: str
    value: float
    n: int
    stderr: float | None = None
    higher_is_better: bool = True
    items: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"task": self.task, "metric": self.metric, "value": self.value, "n": self.n,
                "stderr": self.stderr, "higher_is_better": self.higher_is_better}


class Task:
    """The protocol of a kind of task (subclasses fill ``kind`` and ``run``)."""

    kind: str = ""
    name: str = ""
    metric: str = ""
    higher_is_better: bool = True

    def run(self, model_dir: str, settings: TaskSettings) -> TaskResult:   # pragma: no cover - protocol
        raise NotImplementedError

    @property
    def column(self) -> str:
        """The report's column for this task: ``<name>_<metric>``."""
        return f"{self.name}_{self.metric}"
