"""manifest.json: the one file that says what a cache holds.

The manifest is the commit record. A shard exists for readers only when a manifest lists it with its
checksum; files under ``shards/`` that no manifest names are leftovers of a crash and are ignored
(and removed by the next capture or ``finalize``).

Each capture worker keeps its own *part* manifest (``parts/worker-IIIII.json``, same schema plus a
``part`` record); ``manifest.json`` is the merge of all parts.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .arrays import ArraySpec
from .errors import ConfigMismatchError, FormatError
from .version import FORMAT_NAME, FORMAT_VERSION, check_readable


def _from_dict(cls, d: dict, where: str):
    """Build dataclass ``cls`` from ``d``: missing fields are an error, unknown ones are ignored
    (a newer minor version may add fields)."""
    if not isinstance(d, dict):
        raise FormatError(f"{where}: expected an object, got {type(d).__name__}")
    kwargs = {}
    for f in fields(cls):
        if f.name in d:
            kwargs[f.name] = d[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise FormatError(f"{where}: missing field {f.name!r}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise FormatError(f"{where}: {e}") from None


@dataclass
class TeacherInfo:
    """Who produced the distributions. ``fingerprint`` changes whenever the weights change."""

    name: str                 # what the user asked for ("smollm2-135m", a hub id, a path)
    source: str               # resolved location (directory or hub id)
    revision: str             # hub commit, or "" for local directories
    fingerprint: str          # hash of the weight files (see docs/format.md)
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int           # width of the logits = V in the entropy and log-softmax
    max_length: int           # context length the teacher was run with
    dtype: str                # compute dtype of the teacher forward pass
    backend: str              # "hf" or "vllm"


@dataclass
class TokenizerInfo:
    vocab_size: int           # entries in the tokenizer's vocabulary (added tokens included)
    vocab_sha256: str         # hash of the sorted (token, id) pairs
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    chat_template_sha256: str  # "" when the tokenizer has no chat template


@dataclass
class CaptureConfig:
    """Everything that decides the stored numbers. Two runs into one cache must agree on all of it."""

    mode: str                 # "generate" or "score"
    top_k: int
    logprob_dtype: str
    with_prompt: bool         # generate mode: prompt rows scored too
    hidden_layers: list[int]  # resolved, non-negative; 0 = embeddings, num_layers = final (normed)
    hidden_dtype: str
    max_length: int
    truncate: bool
    samples_per_shard: int
    system_prompt: str | None = None
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    num_samples: int = 1
    # 1.2: how the distribution is stored (docs/format.md, "Encodings"); absent in 1.0/1.1 = topk
    encoding: dict = field(default_factory=lambda: {"name": "topk"})


@dataclass
class InputSpec:
    """One input source captured into the cache; ``key`` prefixes the names of its shards."""

    key: str
    source: str
    source_name: str
    split: str
    columns: dict[str, str]
    limit: int | None
    num_rows: int
    num_shards: int


@dataclass
class ShardRecord:
    name: str
    input_key: str
    index: int
    samples: int
    tokens: int
    scored_tokens: int
    bytes: int
    checksum: str             # "sha256:<hex>" over the shard's files, see docs/format.md
    worker: int


@dataclass
class SkipRecord:
    input_key: str
    row: int
    sample_id: str
    reason: str


@dataclass
class PartInfo:
    worker_index: int
    num_workers: int
    finished: bool


@dataclass
class DerivedFile:
    path: str                 # relative to the cache root, under derived/
    rows: int
    bytes: int
    checksum: str             # "sha256:<hex>" of the file's bytes


@dataclass
class DerivedTable:
    """A table computed from the committed shards and stored beside them (format 1.1, optional).

    Valid only while ``cache_fingerprint`` equals the cache's current fingerprint; a reader that
    finds another fingerprint must ignore it (it was computed before shards were added).
    """

    name: str                 # "token_stats", "tokens" or "samples_index" (docs/format.md, "Derived tables")
    params: dict[str, Any]    # what decides its values, e.g. {"entropy_threshold": 1.0}
    columns: list[str]
    cache_fingerprint: str
    files: list[DerivedFile]
    created_by: str = ""

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "DerivedTable":
        t = _from_dict(cls, d, where)
        t.files = [_from_dict(DerivedFile, f, f"{where}: files") for f in t.files]
        return t


@dataclass
class Provenance:
    """Where an exported cache came from (format 1.1, optional)."""

    source_cache: str         # URL of the cache the samples were copied from
    source_fingerprint: str   # its cache fingerprint at the time
    selection_query: str      # the query (or select shortcut) that made the selection
    selection_count: int      # samples selected (= samples of this cache)
    selection_file: str = ""
    source_shards: dict[str, str] = field(default_factory=dict)  # this cache's shard -> the source's shard


@dataclass
class Manifest:
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    capture: CaptureConfig
    arrays: dict[str, ArraySpec]
    codecs: dict[str, Any]                      # array name -> zarr codec chain (as zarr writes it)
    inputs: list[InputSpec] = field(default_factory=list)
    shards: list[ShardRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    complete: bool = False
    created_by: str = ""
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION
    part: PartInfo | None = None
    derived: list[DerivedTable] = field(default_factory=list)   # 1.1
    provenance: Provenance | None = None                        # 1.1

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def header(self) -> dict:
        """The part that must be identical for everything written into one cache."""
        return {
            "teacher": asdict(self.teacher),
            "tokenizer": asdict(self.tokenizer),
            "capture": asdict(self.capture),
            "arrays": {k: v.to_dict() for k, v in self.arrays.items()},
        }

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": self.format, "format_version": self.format_version, "created_by": self.created_by}
        d.update(self.header())
        d["codecs"] = self.codecs
        d["inputs"] = [asdict(i) for i in self.inputs]
        d["shards"] = [asdict(s) for s in self.shards]
        d["skipped"] = [asdict(s) for s in self.skipped]
        d["totals"] = {"samples": self.num_samples, "tokens": self.num_tokens,
                       "bytes": sum(s.bytes for s in self.shards), "skipped": len(self.skipped)}
        d["complete"] = self.complete
        if self.part is not None:
            d["part"] = asdict(self.part)
        if self.derived:  # written only when present: a manifest without them is a valid 1.0 one
            d["derived"] = [asdict(t) for t in self.derived]
        if self.provenance is not None:
            d["provenance"] = asdict(self.provenance)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest.json") -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: not a logitcache manifest (field 'format' is not {FORMAT_NAME!r})")
        check_readable(d.get("format_version", ""), where)
        for key in ("teacher", "tokenizer", "capture", "arrays", "codecs", "shards"):
            if key not in d:
                raise FormatError(f"{where}: missing field {key!r}")
        return cls(
            teacher=_from_dict(TeacherInfo, d["teacher"], f"{where}: teacher"),
            tokenizer=_from_dict(TokenizerInfo, d["tokenizer"], f"{where}: tokenizer"),
            capture=_from_dict(CaptureConfig, d["capture"], f"{where}: capture"),
            arrays={k: ArraySpec.from_dict(k, v) for k, v in d["arrays"].items()},
            codecs=d["codecs"],
            inputs=[_from_dict(InputSpec, x, f"{where}: inputs") for x in d.get("inputs", [])],
            shards=[_from_dict(ShardRecord, x, f"{where}: shards") for x in d["shards"]],
            skipped=[_from_dict(SkipRecord, x, f"{where}: skipped") for x in d.get("skipped", [])],
            complete=bool(d.get("complete", False)),
            created_by=d.get("created_by", ""),
            format=d["format"],
            format_version=d["format_version"],
            part=_from_dict(PartInfo, d["part"], f"{where}: part") if d.get("part") else None,
            derived=[DerivedTable.from_dict(x, f"{where}: derived") for x in d.get("derived") or []],
            provenance=_from_dict(Provenance, d["provenance"], f"{where}: provenance") if d.get("provenance") else None,
        )

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest.json") -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(d, where)


# Where the teacher was loaded from differs between machines (and its name between spellings of
# the same model); the fingerprint is what identifies it.
NOT_IDENTITY = {"teacher.name", "teacher.source"}


def check_same_header(existing: Manifest, new: Manifest, where: str) -> None:
    """Refuse to mix teachers, tokenizers or capture settings in one cache; name the first field
    that differs so the user knows what to change."""
    a, b = existing.header(), new.header()
    for path, va, vb in _diff(a, b):
        if path in NOT_IDENTITY:
            continue
        raise ConfigMismatchError(
            f"{where} was written with {path} = {va!r}, but this run has {vb!r}; "
            "write to a new cache, or run with the same teacher, tokenizer and settings"
        )


def _diff(a: Any, b: Any, path: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            yield from _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    elif a != b and not (a is None and b is None):
        yield path, a, b
