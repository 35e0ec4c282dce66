"""A training run as data: one dataclass, saved beside every checkpoint so a run can be repeated and
resumed with exactly its settings (``student-train --config run.json``)."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field

from logitcache.format.errors import LogitcacheError


TOKEN_SELECT = ("all", "teacher-entropy", "student-entropy", "random")   # --token-select
POLICY_GRADIENT = "policy_gradient"      # --loss: the reverse-KL policy gradient on a round cache (policy.py)


@dataclass
class TrainConfig:
    cache: str                                  # logitcache directory or fsspec URL
    out: str                                    # run directory: checkpoints, logs, report
    student: str | None = None                  # HF id / local dir / config.json (random init)
    keep_layers: str | None = None              # or derive from the teacher: "0,2,4,..." or "every:2"
    selection: str | None = None                # selection file (logitcache select / query --out)
    where: str | None = None                    # SQL condition on the samples view (logitcache query), e.g. "mean_entropy > 1.5"
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
    loss: str = "forward_kl"                    # a divergence of student_train.losses.DIVERGENCES, or policy_gradient
    tail: str = "bucket"                        # bucket | renormalize
    full_targets: bool = False                  # an --encoding full cache: train on every value (DenseTargets)
    temperature: float = 1.0
    ce_alpha: float = 0.0                       # loss = ce_alpha * CE + (1 - ce_alpha) * KD
    loss_args: dict = field(default_factory=dict)   # alpha (skew KL), beta (JSD), ...
    entropy_above: float | None = None          # distil only tokens with teacher entropy above ...
    entropy_below: float | None = None
    entropy_top_frac: float | None = None       # ... or the top / bottom fraction of a batch's tokens
    entropy_bottom_frac: float | None = None
    token_select: str = "all"                   # distil only chosen positions: all | teacher-entropy | student-entropy | random
    top_frac: float | None = None               # ... the top fraction of them by that score (required unless all)
    select_per: str = "batch"                   # ... counted per micro-batch or per sequence (row)
    offpolicy_cache: str | None = None          # GKD mix: the rest of each batch from this teacher-response cache
    onpolicy_frac: float = 1.0                  # ... and this fraction (lambda) from CACHE (the round's samples)
    teachers: list = field(default_factory=list)    # more caches over the same samples (multi-teacher)
    teacher_weights: list = field(default_factory=list)  # one per teacher, main cache first (default equal)
    layer_map: list = field(default_factory=list)   # [[student_layer, teacher_layer], ...]
    hidden_loss: str = "cosine"                 # cosine | mse
    hidden_weight: float = 1.0
    attention_transfer: list = field(default_factory=list)  # [[student_block, teacher_block], ...] (cache attn/)
    attention_transfer_weight: float = 1.0      # loss += this * the mean attention KL over the pairs
    attention_relations: int = 0                # relation heads per block (0: the teacher's query heads)
    eval_frac: float = 0.05                     # held-out share of the cache (by sample id hash)
    eval_cache: str | None = None               # evaluate on this cache instead (no split; --encoding full: exact KL)
    eval_every: int = 0                         # steps; 0 = at the start and the end only
    eval_batches: int | None = None             # cap on eval batches (None: the whole held-out set)
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    num_workers: int = 0
    precision: str = "auto"                     # auto (bf16 autocast on CUDA), fp32, bf16
    attention: str = "auto"                     # auto | flash | flex | sdpa | dense (student_train.attention)
    parallel: str = "ddp"                       # ddp | fsdp (student_train.parallel)
    activation_checkpointing: bool = False      # recompute each decoder block in backward
    fused_loss: str = "auto"                    # auto | on | off: LM head + loss chunk by chunk (linear_loss)
    resume: bool = True                         # continue from out/checkpoint when it exists
    storage_options: dict = field(default_factory=dict)  # fsspec options of every cache (S3 endpoint, ...)
    cross_tokenizer_loss: str = "map+uld"       # a student with another tokenizer: map+uld | map | uld (cross_tokenizer.py)
    teacher_tokenizer: str | None = None        # ... and where the teacher's tokenizer is (default: the teacher's directory)

    def __post_init__(self):
        def bad(flag: str, msg: str):
            raise LogitcacheError(f"--{flag.replace('_', '-')}: {msg}")

        check_types(self)
        for name in ("seq_len", "batch_size", "grad_accum", "epochs", "save_every", "log_every"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_batches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "seed", "num_workers"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "hidden_weight"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.clip > 0:
            bad("clip", f"must be > 0, got {self.clip}")
        if not 0 <= self.eval_frac < 1:
            bad("eval_frac", f"must be in [0, 1), got {self.eval_frac}")
        for name in ("entropy_top_frac", "entropy_bottom_frac"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) <= 1:
                bad(name, f"must be in (0, 1], got {getattr(self, name)}")
        if self.token_select not in TOKEN_SELECT:
            bad("token_select", f"{self.token_select!r}: choose {', '.join(TOKEN_SELECT)}")
        if self.select_per not in ("batch", "sequence"):
            bad("select_per", f"{self.select_per!r}: choose batch or sequence")
        if self.top_frac is not None and not 0 < self.top_frac <= 1:
            bad("top_frac", f"must be in (0, 1], got {self.top_frac}")
        legacy = [n for n in ("entropy_above", "entropy_below", "entropy_top_frac", "entropy_bottom_frac")
                  if getattr(self, n) is not None]
        if self.token_select == "all" and self.top_frac is not None:
            bad("top_frac", "selects among the positions scored by --token-select: give --token-select "
                            "student-entropy, teacher-entropy or random")
        if self.token_select != "all":
            if self.top_frac is None:
                bad("token_select", f"{self.token_select} needs --top-frac (the share of positions to distil)")
            if legacy:
                bad(legacy[0], f"is a teacher-entropy rule of its own; it cannot be combined with --token-select "
                               f"{self.token_select}")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", f"{self.precision!r}: choose auto, fp32 or bf16")
        for name, choices in (("attention", ("auto", "flash", "flex", "sdpa", "dense")), ("parallel", ("ddp", "fsdp")),
                              ("fused_loss", ("auto", "on", "off")),
                              ("cross_tokenizer_loss", ("map+uld", "map", "uld"))):
            if getattr(self, name) not in choices:
                bad(name, f"{getattr(self, name)!r}: choose {', '.join(choices[:-1])} or {choices[-1]}")
        if self.hidden_loss not in ("cosine", "mse"):
            bad("hidden_loss", f"{self.hidden_loss!r}: choose cosine or mse")
        if "://" in self.out or self.out.startswith(("s3:", "gs:", "gcs:", "az:", "hf:")):
            bad("out", f"{self.out!r}: a run directory must be local (checkpoints, logs and the student are written "
                       "with local file operations); copy it to object storage afterwards")
        try:
            self.layer_map = [[int(s), int(t)] for s, t in self.layer_map]
        except (TypeError, ValueError):
            bad("layer_map", f"{self.layer_map!r}: expected [[student_layer, teacher_layer], ...]")
        try:
            self.attention_transfer = [[int(s), int(t)] for s, t in self.attention_transfer]
        except (TypeError, ValueError):
            bad("attention_transfer", f"{self.attention_transfer!r}: expected [[student_block, teacher_block], ...]")
        if not (self.attention_transfer_weight >= 0 and math.isfinite(self.attention_transfer_weight)):
            bad("attention_transfer_weight", f"{self.attention_transfer_weight!r}: must be a finite number >= 0")
        if self.attention_relations < 0:
            bad("attention_relations", f"{self.attention_relations}: must be >= 0 (0: the teacher's query heads)")
        if self.teacher_weights and len(self.teacher_weights) != 1 + len(self.teachers):
            bad("teacher_weights", f"{len(self.teacher_weights)} weight(s) for {1 + len(self.teachers)} teacher caches "
                                   "(the main cache and each --teacher)")
        if not 0 < self.onpolicy_frac <= 1:
            bad("onpolicy_frac", f"must be in (0, 1], got {self.onpolicy_frac}")
        if self.onpolicy_frac < 1 and not self.offpolicy_cache:
            bad("onpolicy_frac", "the rest of each batch comes from --offpolicy-cache: give it")
        if self.offpolicy_cache and self.onpolicy_frac == 1:
            bad("offpolicy_cache", "with --onpolicy-frac 1 no row would come from it: set --onpolicy-frac below 1")
        if self.loss == POLICY_GRADIENT:
            if self.teachers:
                bad("teacher", "--loss policy_gradient learns from the sampled tokens of one round cache; "
                               "multi-teacher training needs a divergence")
            if self.temperature != 1.0:
                bad("temperature", "--loss policy_gradient is defined at temperature 1")
            self.policy_args()
        self.objective()

    def objective(self):
        """The distillation loss these settings describe (``losses.DistillationConfig``), checked:
        divergence, tail policy, temperature, CE share and the divergence's arguments. For
        ``--loss policy_gradient`` it is forward KL without arguments: what the off-policy part of a
        GKD mix (``--offpolicy-cache``) trains with."""
        from .losses import DistillationConfig

        pg = self.loss == POLICY_GRADIENT
        try:
            return DistillationConfig(kind="forward_kl" if pg else self.loss, tail=self.tail,
                                      temperature=self.temperature, ce_alpha=self.ce_alpha,
                                      kind_kwargs={} if pg else dict(self.loss_args))
        except ValueError as e:
            raise LogitcacheError(f"--loss {self.loss} / --tail / --temperature / --ce-alpha / --loss-arg: {e}") from None

    def policy_args(self) -> tuple[float, float, bool]:
        """(discount, clip, baseline) of ``--loss policy_gradient`` (``--loss-arg discount=0 clip=0.2 baseline=1``)."""
        from .policy import check_pg_args

        try:
            return check_pg_args(dict(self.loss_args))
        except ValueError as e:
            raise LogitcacheError(f"--loss policy_gradient / --loss-arg: {e}") from None

    def to_dict(self) -> dict:
        """The settings as written to report.json and the checkpoint: storage options with their
        secrets (keys, secrets, tokens, passwords) replaced by "***"."""
        d = dataclasses.asdict(self)
        d["storage_options"] = redact(d["storage_options"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LogitcacheError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        """The settings of a JSON file (complete or partial: flags may add the rest), not yet validated."""
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LogitcacheError(f"--config {path}: {e}") from None
        if not isinstance(d, dict):
            raise LogitcacheError(f"--config {path}: expected a JSON object of settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LogitcacheError(f"--config {path}: unknown training setting(s) {', '.join(unknown)}")
        return d


def check_types(cfg) -> None:
    """Every setting has the type its field declares (a JSON ``"max_steps": "2"`` is refused naming the
    setting, not a TypeError later). int fields take ints (not bools), float fields ints or finite
    floats, ``X | None`` also None."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, kinds = getattr(cfg, f.name), _kinds(hints[f.name])
        if value is None and type(None) in kinds:
            continue
        ok = any(_is(value, k) for k in kinds if k is not type(None))
        if not ok:
            want = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            raise LogitcacheError(f"--{f.name.replace('_', '-')} ({f.name} in --config): must be {want}, "
                                  f"got {value!r}")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "an object", type(None): "null"}


def _kinds(hint) -> tuple:
    args = typing.get_args(hint)
    if args and (typing.get_origin(hint) in (typing.Union, types.UnionType)):
        return tuple(typing.get_origin(a) or a for a in args)
    return (typing.get_origin(hint) or hint,)


def _is(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def parse_layer_map(text: str | None, flag: str = "--layer-map") -> list[list[int]]:
    """'2:12,5:-1' -> [[2, 12], [5, -1]] (student layer : teacher layer, Hugging Face numbering; for
    --attention-transfer, decoder block indices)."""
    if not text:
        return []
    out = []
    for item in text.split(","):
        s, sep, t = item.partition(":")
        try:
            out.append([int(s), int(t)])
        except ValueError:
            raise LogitcacheError(f"{flag} {text!r}: expected student:teacher pairs such as 2:12,5:-1") from None
        if not sep:
            raise LogitcacheError(f"{flag} {text!r}: {item!r} has no ':'")
    return out


SECRET_HINTS = ("key", "secret", "token", "password", "credential")


def redact(options):
    """``options`` with the value of every key that names a secret replaced by "***" (nested dicts too)."""
    if isinstance(options, dict):
        return {k: "***" if any(h in str(k).lower() for h in SECRET_HINTS) and not isinstance(v, dict) else redact(v)
                for k, v in options.items()}
    return options
