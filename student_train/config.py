"""A training run as data: one dataclass, saved beside every checkpoint so a run can be repeated and
resumed with exactly its settings (``student-train --config run.json``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from logitcache.format.errors import LogitcacheError


@dataclass
class TrainConfig:
    cache: str                                  # logitcache directory or fsspec URL
    out: str                                    # run directory: checkpoints, logs, report
    student: str | None = None                  # HF id / local dir / config.json (random init)
    keep_layers: str | None = None              # or derive from the teacher: "0,2,4,..." or "every:2"
    selection: str | None = None                # selection file (logitcache select / query --out)
    where: str | None = None                    # filter on the samples table, e.g. "mean_entropy > 1.5"
    seq_len: int = 512
    batch_size: int = 8                         # rows per micro-batch per rank
    grad_accum: int = 1
    max_steps: int | None = None                # optimizer steps; default: epochs over the data
    epochs: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1                   # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    loss: str = "forward_kl"                    # see student_train.losses.DIVERGENCES
    tail: str = "bucket"                        # bucket | renormalize
    temperature: float = 1.0
    ce_alpha: float = 0.0                       # loss = ce_alpha * CE + (1 - ce_alpha) * KD
    loss_args: dict = field(default_factory=dict)   # alpha (skew KL), beta (JSD), ...
    entropy_above: float | None = None          # distil only tokens with teacher entropy above ...
    entropy_below: float | None = None
    entropy_top_frac: float | None = None       # ... or the top / bottom fraction of a batch's tokens
    entropy_bottom_frac: float | None = None
    teachers: list = field(default_factory=list)    # more caches over the same samples (multi-teacher)
    teacher_weights: list = field(default_factory=list)  # one per teacher, main cache first (default equal)
    layer_map: list = field(default_factory=list)   # [[student_layer, teacher_layer], ...]
    hidden_loss: str = "cosine"                 # cosine | mse
    hidden_weight: float = 1.0
    eval_frac: float = 0.05                     # held-out share of the cache (by sample id hash)
    eval_cache: str | None = None               # evaluate on this cache instead (no split; --encoding full: exact KL)
    eval_every: int = 0                         # steps; 0 = at the start and the end only
    eval_batches: int | None = None             # cap on eval batches (None: the whole held-out set)
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    num_workers: int = 0
    precision: str = "auto"                     # auto (bf16 autocast on CUDA), fp32, bf16
    resume: bool = True                         # continue from out/checkpoint when it exists

    def __post_init__(self):
        def bad(flag: str, msg: str):
            raise LogitcacheError(f"--{flag.replace('_', '-')}: {msg}")

        for name in ("seq_len", "batch_size", "grad_accum", "epochs", "save_every", "log_every"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be >= 1, got {self.max_steps}")
        if not 0 <= self.eval_frac < 1:
            bad("eval_frac", f"must be in [0, 1), got {self.eval_frac}")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", f"{self.precision!r}: choose auto, fp32 or bf16")
        if self.hidden_loss not in ("cosine", "mse"):
            bad("hidden_loss", f"{self.hidden_loss!r}: choose cosine or mse")
        self.layer_map = [[int(s), int(t)] for s, t in self.layer_map]
        if self.teacher_weights and len(self.teacher_weights) != 1 + len(self.teachers):
            bad("teacher_weights", f"{len(self.teacher_weights)} weight(s) for {1 + len(self.teachers)} teacher caches "
                                   "(the main cache and each --teacher)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LogitcacheError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise LogitcacheError(f"--config {path}: {e}") from None


def parse_layer_map(text: str | None) -> list[list[int]]:
    """'2:12,5:-1' -> [[2, 12], [5, -1]] (student layer : teacher layer, Hugging Face numbering)."""
    if not text:
        return []
    out = []
    for item in text.split(","):
        s, sep, t = item.partition(":")
        try:
            out.append([int(s), int(t)])
        except ValueError:
            raise LogitcacheError(f"--layer-map {text!r}: expected student:teacher pairs such as 2:12,5:-1") from None
        if not sep:
            raise LogitcacheError(f"--layer-map {text!r}: {item!r} has no ':'")
    return out
