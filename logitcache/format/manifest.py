"""manifest.json: the one file that says what a cache holds.

The manifest is the commit record. A shard exists for readers only when a manifest lists it with its
checksum; files under ``shards/`` that no manifest names are leftovers of a crash and are ignored
(and removed by the next capture or ``finalize``).

Each capture worker keeps its own *part* manifest (``parts/worker-IIIII.json``, same schema plus a
``part`` record); ``manifest.json`` is the merge of all parts.

A manifest is checked when it is read (format 1.3, docs/format.md "Integrity"): its ``checksum``
(sha256 over the rest of its canonical JSON) must match, every name that becomes a path must match
its pattern, and the records must agree with each other (unique shards, counts and totals that add
up, a complete cache that lists every planned shard). A manifest that fails is refused with the
first problem found, never read "as well as possible".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

from . import layout
from .encodings import LEGACY_ENCODING
from .specs import ArraySpec
from .errors import ConfigMismatchError, CorruptManifestError, FormatError
from .version import FORMAT_NAME, FORMAT_VERSION, check_readable, parse_version

CHECKSUM_SINCE = (1, 3)   # manifests of this version on must carry their checksum


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
    """Everything that decides the stored numbers. Two runs into one cache must agree on all of it.

    ``temperature`` and ``top_p`` are the *generation* sampling parameters (0.0 / 1.0 in score mode); the
    encoding's own parameters (the sampled proposal temperature, the adaptive/compact keep-mass, which the
    ``encoding`` dict records under the keys ``temperature`` and ``top_p``) are a different thing."""

    GENERATION_ONLY: ClassVar[tuple[str, ...]] = ("max_new_tokens", "temperature", "top_p", "num_samples")

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
    encoding: dict = field(default_factory=lambda: {"name": LEGACY_ENCODING})


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
    # 1.3: "sha256:<hex>" of the rows read (the role columns after --limit, see docs/format.md); a
    # capture refuses to add to an input whose rows changed. "" in caches of earlier versions.
    content: str = ""


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
    # 1.3: what a reader checks on every open of the shard (docs/format.md, "Integrity"); "" in shards
    # written before 1.3, which a reader verifies whole (``checksum``) on first access instead
    metadata_checksum: str = ""   # the recipe of ``checksum`` over the shard's zarr.json documents only
    samples_checksum: str = ""    # "sha256:<hex>" of samples.parquet

    @property
    def verified_per_read(self) -> bool:
        """Written with per-chunk crc32c and per-file checksums (format 1.3 on)."""
        return bool(self.metadata_checksum and self.samples_checksum)


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
    """Where an exported or imported cache came from (format 1.1, optional)."""

    source_cache: str         # URL of the cache the samples were copied from (imported: the foreign files)
    source_fingerprint: str   # its cache fingerprint at the time ("" when imported)
    selection_query: str      # the query (or select shortcut) that made the selection
    selection_count: int      # samples selected (= samples of this cache)
    selection_file: str = ""
    source_shards: dict[str, str] = field(default_factory=dict)  # this cache's shard -> the source's shard
    # 1.6: a cache imported from another tool's files: {"format": its name, "follows": the release the layout
    # was read from, "files", the tool's settings, ...}; written only when present
    imported_from: dict[str, Any] | None = None


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
    # 1.4, optional: where an on-policy round's responses came from (free-form JSON object, e.g. round,
    # student fingerprint, sampling settings); part of the header, so one cache holds one round
    rollout: dict[str, Any] | None = None
    # 1.6, optional: the rule that chose the rows holding the teacher's distribution (capture --positions-from:
    # rule, keep_frac, per, student {source, fingerprint}); part of the header and of the fingerprint
    positions: dict[str, Any] | None = None

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def header(self) -> dict:
        """The part that must be identical for everything written into one cache (``rollout`` only when
        present: a manifest without it is a valid 1.3 one)."""
        h = {
            "teacher": asdict(self.teacher),
            "tokenizer": asdict(self.tokenizer),
            "capture": asdict(self.capture),
            "arrays": {k: v.to_dict() for k, v in self.arrays.items()},
        }
        if self.rollout is not None:
            h["rollout"] = self.rollout
        if self.positions is not None:
            h["positions"] = self.positions
        return h

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
            d["provenance"] = {k: v for k, v in asdict(self.provenance).items()
                               if not (k == "imported_from" and v is None)}
        d["checksum"] = manifest_checksum(d)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest.json") -> "Manifest":
        """Parse and check a manifest: its checksum (format 1.3 on; earlier ones have none), the names
        that become paths, and the consistency of its records (``check_consistency``)."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatError(f"{where}: not a logitcache manifest (field 'format' is not {FORMAT_NAME!r})")
        check_readable(d.get("format_version", ""), where)
        check_manifest_checksum(d, where)
        for key in ("teacher", "tokenizer", "capture", "arrays", "codecs", "shards"):
            if key not in d:
                raise FormatError(f"{where}: missing field {key!r}")
        m = cls._parse(d, where)
        m.check_consistency(where, d.get("totals"))
        return m

    @classmethod
    def _parse(cls, d: dict, where: str) -> "Manifest":
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
            rollout=_rollout(d.get("rollout"), where),
            positions=_object(d.get("positions"), "positions", where),
        )

    def check_consistency(self, where: str, totals: dict | None = None) -> None:
        """Refuse a manifest whose records contradict each other or name paths outside the cache:
        names must match their patterns (``layout``), a shard's name is ``<input key>-<index:06d>``,
        shards are listed once, counts are non-negative, ``totals`` (when given) add up, every shard of
        a listed input is one it planned, and a complete cache lists every planned shard."""
        def bad(msg: str):
            raise CorruptManifestError(f"{where}: {msg}")

        def name(kind, value, pattern):
            problem = layout.check_name(kind, value, pattern)
            if problem:
                bad(problem)

        for a, spec in self.arrays.items():
            name("array name", a, layout.ARRAY_NAME)
            if spec.index is not None and spec.index not in self.arrays:
                bad(f"array {a!r} is indexed by {spec.index!r}, which is not an array of the cache")
        inputs = {}
        for i in self.inputs:
            name("input key", i.key, layout.INPUT_KEY)
            if i.key in inputs:
                bad(f"input {i.key!r} is listed twice")
            if not (isinstance(i.num_shards, int) and i.num_shards >= 0):
                bad(f"input {i.key!r}: num_shards {i.num_shards!r} is not a count")
            inputs[i.key] = i
        seen: dict[str, int] = {}
        for n, s in enumerate(self.shards):
            name("input key", s.input_key, layout.INPUT_KEY)
            for f in ("index", "samples", "tokens", "scored_tokens", "bytes"):
                v = getattr(s, f)
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    bad(f"shard {s.name!r}: {f} {v!r} is not a count")
            if s.name != layout.shard_name(s.input_key, s.index):
                bad(f"shard {s.name!r} does not match its input key and index "
                    f"({layout.shard_name(s.input_key, s.index)!r})")
            if s.name in seen:
                bad(f"shard {s.name!r} is listed twice (records {seen[s.name]} and {n})")
            seen[s.name] = n
            if s.scored_tokens > s.tokens:
                bad(f"shard {s.name!r}: {s.scored_tokens} scored tokens of {s.tokens}")
            if self.inputs and s.input_key not in inputs:
                bad(f"shard {s.name!r} belongs to input {s.input_key!r}, which the manifest does not list")
            if s.input_key in inputs and s.index >= inputs[s.input_key].num_shards:
                bad(f"shard {s.name!r}: index {s.index} is beyond the {inputs[s.input_key].num_shards} shard(s) "
                    f"planned for input {s.input_key!r}")
        if self.complete and self.part is None:
            missing = [layout.shard_name(i.key, j) for i in self.inputs for j in range(i.num_shards)
                       if layout.shard_name(i.key, j) not in seen]
            if missing:
                bad(f"marked complete but {len(missing)} planned shard(s) are not listed (first: {missing[0]}): "
                    "a shard record was removed")
        if totals is not None:
            for key, value in (("samples", self.num_samples), ("tokens", self.num_tokens),
                               ("bytes", sum(s.bytes for s in self.shards)), ("skipped", len(self.skipped))):
                if key in totals and totals[key] != value:
                    bad(f"totals.{key} is {totals[key]!r} but the shard records add up to {value}")
        for t in self.derived:
            for f in t.files:
                name("derived file", f.path, layout.DERIVED_PATH)
        if self.provenance is not None:
            for mine, theirs in self.provenance.source_shards.items():
                name("shard name", mine, layout.SHARD_NAME)
                name("shard name", theirs, layout.SHARD_NAME)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest.json") -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(d, where)


def _rollout(value: Any, where: str) -> dict | None:
    return _object(value, "rollout", where)


def _object(value: Any, name: str, where: str) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise FormatError(f"{where}: {name} must be a JSON object, got {type(value).__name__}")
    return value


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_checksum(d: dict) -> str:
    """``"sha256:<hex>"`` over the canonical JSON (sorted keys, no spaces, ASCII) of a manifest's
    fields other than ``checksum`` (docs/format.md, "Manifest checksum")."""
    return "sha256:" + hashlib.sha256(_canonical({k: v for k, v in d.items() if k != "checksum"})).hexdigest()


def check_manifest_checksum(d: dict, where: str) -> None:
    """A manifest of 1.3 on must carry a checksum that matches its content; earlier ones carry none
    (one that does is checked too)."""
    if "checksum" not in d:
        if parse_version(str(d.get("format_version", ""))) >= CHECKSUM_SINCE:
            raise CorruptManifestError(f"{where}: has no checksum (required from format 1.3 on): it was edited or "
                              "damaged after it was written")
        return
    try:
        want = manifest_checksum(d)
    except ValueError as e:   # NaN or other values that cannot be in a manifest
        raise FormatError(f"{where}: cannot be checked ({e})") from None
    if d["checksum"] != want:
        raise CorruptManifestError(f"{where}: checksum {d['checksum']!r} does not match its content ({want}): the manifest "
                          "was edited or damaged after it was written; restore it, or re-run the capture")


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
