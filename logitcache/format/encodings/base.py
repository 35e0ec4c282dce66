"""One encoding, one object: the base class every encoding of the teacher's distribution derives from,
and the registry that finds it by the name the manifest records (``capture.encoding.name``).

An encoding declares in one place (its module under ``format/encodings/``):

- ``params``: its parameters, their defaults, checks and the capture flag that sets each;
- ``specs``: the arrays it stores (docs/format.md, "Encodings") and ``stored_names``, those its decoder
  reads;
- ``extras``: what a capture backend must compute on the device beside the top-k candidates
  (``ExtraSpec``: name, row shape, dtype, fill, and the device computation that makes it);
- ``encode``: candidates + extras -> the stored arrays (numpy, host side), and ``decode``: stored
  arrays -> typed rows (``rows``);
- its capabilities: ``needs_full_distribution`` (draws or every value from the whole row),
  ``reads_top_k`` (False: a backend need not return top-k candidates),
  ``estimated`` (its targets estimate p without bias: forward KL / cross-entropy at T = 1 only),
  ``ragged`` (entries per token vary: padding is -1 / -inf), ``stores_tail`` (the exact mass outside
  the ids is stored, not derived as 1 - sum p),
  ``default_top_k``, ``default_samples_per_shard``, limits on device batches.

Nothing else in the project branches on an encoding's name: it looks the encoding up
(``encoding_from``) and asks it. Adding an encoding is one module that subclasses ``Encoding`` and
registers it, plus its entry in docs/format.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from ..errors import EncodingError
from ..specs import DIST_GROUP, ArraySpec
from .rows import SampledRows, SparseRows, TargetRows


@dataclass(frozen=True)
class Param:
    """One parameter of an encoding, as ``capture.encoding`` records it under ``name``."""

    name: str
    default: Any
    flag: str | None                            # the capture flag that sets it (None: fixed at its default)
    check: Callable[[Any], str | None] = field(default=lambda v: None, compare=False)  # a problem, or None
    meaning: str = ""


@dataclass(frozen=True)
class ExtraSpec:
    """A per-token quantity a capture backend computes on the device for an encoding: ``row_shape``
    and ``dtype`` (numpy) of one row, the ``fill`` of rows that are not scored, and the ``producer``,
    the device computation that makes it (``teacher/distribution.py`` keeps one per producer)."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str
    fill: float | int
    producer: str


class Encoding:
    """The base of every encoding. An instance holds one resolved configuration (``config``: the
    name and every parameter, as the manifest records it). Subclasses set the class attributes and
    implement ``specs``, ``encode`` and ``decode`` (and ``extras`` when they need the device)."""

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    default_top_k: ClassVar[int] = 64
    default_samples_per_shard: ClassVar[int] = 256
    needs_full_distribution: ClassVar[bool] = False
    reads_top_k: ClassVar[bool] = True                        # encode reads the top-k candidates
    estimated: ClassVar[bool] = False
    ragged: ClassVar[bool] = True                             # entries per token vary (entry arrays)
    stores_tail: ClassVar[bool] = False                       # decode gives the exact tail (SparseRows.tail)
    max_device_batch_tokens: ClassVar[int | None] = None     # cap on a backend's tokens per forward pass
    max_generate_batch: ClassVar[int | None] = None          # cap on sequences generated at once
    max_samples_per_shard: ClassVar[int | None] = None
    summary: ClassVar[str] = ""                               # one line for help texts

    def __init__(self, config: Mapping[str, Any] | None = None):
        config = dict(config or {})
        self.config = {"name": self.name, **{p.name: p.default for p in self.params}, **config}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Encoding) and self.config == other.config

    def __getitem__(self, key: str):
        return self.config[key]

    # ---- configuration -------------------------------------------------------------------------
    @classmethod
    def resolve(cls, **given) -> "Encoding":
        """The encoding with ``given`` parameters (None means "not given") over its defaults; a
        parameter it does not take, or a bad value, is an error naming the flag."""
        given = {k: v for k, v in given.items() if v is not None}
        mine = {p.name: p for p in cls.params if p.flag}
        for key in given:
            if key not in mine:
                flag = FLAGS.get(key)
                if flag is None:
                    raise EncodingError(f"unknown encoding parameter {key!r}")
                takes = [e.name for e in REGISTRY.values() if any(p.name == key for p in e.params)]
                raise EncodingError(f"{flag} applies to --encoding {'/'.join(takes)}, not {cls.name}")
        enc = cls(given)
        for p in cls.params:
            problem = p.check(enc.config[p.name])
            if problem:
                raise EncodingError(f"{p.flag} {problem}, got {enc.config[p.name]!r}")
        return enc

    def to_dict(self) -> dict:
        """What ``capture.encoding`` records."""
        return dict(self.config)

    def describe(self, top_k: int) -> str:
        """One line for people (``logitcache inspect``)."""
        params = ", ".join(f"{k} {v}" for k, v in self.config.items() if k != "name")
        return f"encoding {self.name} (k {top_k}{', ' + params if params else ''})"

    # ---- what is stored --------------------------------------------------------------------------
    def specs(self, vocab_size: int, logprob_dtype: str, top_k: int) -> list[ArraySpec]:
        """The distribution arrays of a shard, in storage order."""
        raise NotImplementedError

    def stored_names(self) -> list[str]:
        """The stored arrays ``decode`` reads (all distribution arrays, by default)."""
        return [s.name for s in self.specs(2, "float16", 1)]

    def value_tolerance(self, value_dtype: str) -> tuple[float, float]:
        """The stated bound on a stored log-prob's error, ``|stored - exact| <= atol + rtol * |exact|``,
        as (atol, rtol): the rounding of ``value_dtype`` by default."""
        return 0.0, 2.0 ** -11 if value_dtype == "float16" else 2.0 ** -24

    def width(self, top_k: int) -> int:
        """Columns per token of the padded rows a loader makes (the most entries a token can have)."""
        return top_k

    # ---- the device side ---------------------------------------------------------------------------
    def extras(self, top_k: int, vocab_size: int) -> list[ExtraSpec]:
        """What a backend computes on the device beside the top-k candidates (nothing by default)."""
        return []

    # ---- encode / decode ---------------------------------------------------------------------------
    def encode(self, top_k: int, vocab_size: int, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray,
               extras: dict[str, np.ndarray], value_dtype: str) -> dict[str, np.ndarray]:
        """Scored rows only: candidates ``ids`` (N, K) and float32 ``logprobs`` in rank order, their
        exact ``tail`` (N,), the device ``extras`` -> {stored name: array}, token-major arrays with one
        row per given token, entry arrays with the entries of those tokens."""
        raise NotImplementedError

    def encode_rows(self, top_k: int, vocab_size: int, cand_ids: np.ndarray, cand_logprobs: np.ndarray,
                    extras: dict[str, np.ndarray], scored: np.ndarray, value_dtype: str = "float16"
                    ) -> dict[str, np.ndarray]:
        """A shard's rows -> its distribution arrays. ``cand_*`` (N, K): top-K ids and float32 log-probs
        in rank order (fill values on rows not ``scored``); ``extras``: the device extras, one row per
        token. Token-major arrays get their fill on rows that are not scored."""
        n = len(scored)
        specs = {sp.name: sp for sp in self.specs(vocab_size, value_dtype, top_k)}
        s = np.asarray(scored, dtype=bool)
        if not s.any():                             # no scored row: no entries, fills everywhere
            return {name: (np.zeros(0, sp.storage_dtype) if sp.per_entry else
                           np.full((n, *sp.row_shape), sp.fill, dtype=sp.storage_dtype))
                    for name, sp in specs.items()}
        lp = cand_logprobs[s].astype(np.float32)
        if "tail" in extras:
            tail = extras["tail"][s].astype(np.float64)
        else:   # an engine that returns only the top-k (vLLM): exact up to float32 rounding of the values
            tail = 1.0 - np.exp(lp.astype(np.float64)).sum(1)
        tail = np.clip(tail, 0.0, 1.0).astype(np.float32)
        arrays = self.encode(top_k, vocab_size, cand_ids[s], lp, tail, {k: v[s] for k, v in extras.items()},
                             value_dtype)
        out = {}
        for name, spec in specs.items():
            values = arrays[name]
            if spec.per_entry:
                out[name] = values.astype(spec.storage_dtype)
            else:                                   # back to one row per token, fill where not scored
                full = np.full((n, *spec.row_shape), spec.fill, dtype=spec.storage_dtype)
                full[s] = values
                out[name] = full
        return out

    def decode(self, arrays: dict[str, np.ndarray], vocab_size: int) -> SparseRows | SampledRows | TargetRows:
        """A token range's stored arrays ({stored name: array}: its token rows and their entries) ->
        typed rows."""
        raise NotImplementedError


def dist(name: str) -> str:
    """The stored name of an encoding's array in the ``dist/`` group."""
    return f"{DIST_GROUP}/{name}"


def inner(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{stored name: array} -> {name inside ``dist/``: array} (what the encoders take and return)."""
    prefix = DIST_GROUP + "/"
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def stored(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of ``inner``."""
    return {dist(k): v for k, v in arrays.items()}


# ---- the registry ------------------------------------------------------------------------------------
DEFAULT_ENCODING = "compact"      # what a capture writes unless told otherwise
LEGACY_ENCODING = "topk"          # caches of format 1.0 and 1.1 record no encoding: they are this one
REGISTRY: dict[str, type[Encoding]] = {}
# the capture flag of every parameter name any encoding takes (filled by ``register``)
FLAGS: dict[str, str] = {}


def register(cls: type[Encoding]) -> type[Encoding]:
    """Class decorator: make ``cls`` findable by its ``name`` (the name the manifest records)."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise EncodingError(f"encoding {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    for p in cls.params:
        if p.flag:
            FLAGS.setdefault(p.name, p.flag)
    return cls


def names() -> list[str]:
    """The registered encodings, in registration order."""
    return list(REGISTRY)


def encoding_class(name: str) -> type[Encoding]:
    cls = REGISTRY.get(name)
    if cls is None:
        raise EncodingError(f"--encoding: {name!r} is not one of {', '.join(REGISTRY)}")
    return cls


def encoding_from(config: Mapping[str, Any] | Encoding | str | None) -> Encoding:
    """The encoding a manifest records (``capture.encoding``; None or no name: ``topk``, as in caches of
    format 1.0 and 1.1), or one given by name with its defaults."""
    if isinstance(config, Encoding):
        return config
    if config is None or isinstance(config, str):
        return encoding_class(config or LEGACY_ENCODING)()
    return encoding_class(config.get("name", LEGACY_ENCODING))(config)


def resolve_encoding(name: str, **given) -> dict:
    """``{"name": ..., <params>}`` with defaults filled in (what ``capture.encoding`` records); a parameter
    the encoding does not take, or a bad value, is an error naming its capture flag."""
    return encoding_class(name).resolve(**given).to_dict()
