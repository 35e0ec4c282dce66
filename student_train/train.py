"""The training recipe: setup -> (evaluate) -> train -> evaluate -> save, in one readable function.

The library parts it uses are modules of their own, importable without it: the objective
(``objective``: forward pass and losses), evaluation (``evaluation``), checkpoints (``checkpoint``),
the data (``data``), the student (``model``).

One process per device; under torchrun/accelerate the ranks form a DDP or FSDP2 group
(``parallel``; NCCL on GPUs, gloo on the CPU) and the stream gives each rank its own rows, the same
number on every rank. Packed documents are kept apart by the attention ``attention.choose_attention``
picks (varlen / block-sparse kernels where the student allows, a dense mask only as the fallback).
Gradients are synchronised once per optimizer step, not per micro-batch, and the logged loss is
read back from the device once per step. A
checkpoint (model, projector, optimizer, scheduler, loader position, RNG states; ``checkpoint.py``)
is written atomically every ``save_every`` optimizer steps with checksums and the fingerprints of
the caches it was trained on; re-running the same command continues from it and reaches the same
weights as a run that was never interrupted, and refuses a damaged checkpoint or changed caches.

Everything that can be checked without the student's weights is checked before they are loaded,
and nothing is written into ``out`` before the loop starts.

"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time

import numpy as np
import torch

from logitcache.format.arrays import absolute_layer
from logitcache.format.errors import LogitcacheError
from logitcache.format.fingerprint import cache_fingerprint
from logitcache.store.reader import open_cache

from . import losses, parallel
from .attention import choose_attention
from .checkpoint import CHECKPOINT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import POLICY_GRADIENT, TrainConfig
from .cross_tokenizer import check_cross_tokenizer_supported, cross_tokenizer_rows
from .data import CacheStream, make_dataloader, stores_full_distribution, tokenizer_matches
from .evaluation import evaluate
from .model import build_student, count_parameters, student_num_layers, student_tokenizer_dir
from .mix import OffPolicyRows, split_batch
from .multi_teacher import TeacherJoin
from .objective import check_loss_supported, choose_loss_head, compute_loss

log = logging.getLogger(__name__)



# ---- setup ----------------------------------------------------------------------------------------
def split_ids(sample_ids: list[str], eval_frac: float) -> tuple[list[str], list[str]]:
    """(train, held-out) by a hash of each sample id: the same split for any selection or run order."""
    def u(sid: str) -> float:
        return int(hashlib.blake2b(sid.encode(), digest_size=8).hexdigest(), 16) / 2.0 ** 64

    held = [s for s in sample_ids if u(s) < eval_frac]
    held_set = set(held)
    return [s for s in sample_ids if s not in held_set], held


def setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def selected_ids(cfg: TrainConfig, cache) -> list[str] | None:
    if not cfg.selection:
        return None
    from logitcache.query.selection import read_selection

    return read_selection(cfg.selection, cache)


def attention_pairs(cfg: TrainConfig, manifest, n_student_layers: int) -> list[list[int]]:
    """--attention-transfer pairs with non-negative block indices, each checked against the student's
    blocks (the cache's are checked by the stream)."""
    out = []
    for s, t in cfg.attention_transfer:
        block = s + n_student_layers if s < 0 else s
        if not 0 <= block < n_student_layers:
            raise LogitcacheError(f"--attention-transfer {s}:{t}: the student has decoder blocks 0..{n_student_layers - 1}")
        out.append([block, t + manifest.teacher.num_layers if t < 0 else t])
    return out


def attention_transfer(cfg: TrainConfig, model, manifest, pairs: list[list[int]]):
    """The student's ``AttentionTransfer`` for ``pairs`` (None without), its relation heads checked to
    divide both sides' queries (heads x head_dim numbers per token)."""
    if not pairs:
        return None
    from logitcache.format.arrays import attention_name
    from logitcache.teacher.attention_capture import attention_shape

    from .attention_loss import AttentionTransfer

    heads, _, head_dim = attention_shape(model.config)
    t_heads, t_dim = manifest.arrays[attention_name(pairs[0][1], "q")].row_shape
    relations = cfg.attention_relations or t_heads
    for who, width in (("the teacher's", t_heads * t_dim), ("the student's", heads * head_dim)):
        if width % relations:
            raise LogitcacheError(f"--attention-relations {relations}: {who} {width} query numbers per token do not "
                                  "split into that many relation heads; choose a divisor of both "
                                  f"({t_heads * t_dim} and {heads * head_dim})")
    return AttentionTransfer(model, pairs, relations)


def open_same_teacher(url: str, flag: str, manifest, why: str, storage_options: dict | None = None):
    """Another cache (``--eval-cache``, ``--offpolicy-cache``) of the training cache's teacher and tokenizer."""
    other = open_cache(url, storage_options=storage_options or None)
    m = other.manifest
    if m.teacher.fingerprint != manifest.teacher.fingerprint:
        raise LogitcacheError(f"{flag} {url} holds teacher {m.teacher.name} ({m.teacher.fingerprint[:19]}), the "
                              f"training cache {manifest.teacher.name} ({manifest.teacher.fingerprint[:19]}): {why}")
    if m.tokenizer.vocab_sha256 != manifest.tokenizer.vocab_sha256:
        raise LogitcacheError(f"{flag} {url} was captured with another tokenizer")
    return other


def open_eval_stream(cfg: TrainConfig, manifest, packing: bool = True) -> CacheStream:
    """The ``--eval-cache`` stream: every sample of it, against the same teacher and tokenizer."""
    other = open_same_teacher(cfg.eval_cache, "--eval-cache", manifest, "held-out metrics need the same teacher",
                              cfg.storage_options)
    return CacheStream(other, cfg.seq_len, cfg.batch_size, shuffle=False, rank=0, world_size=1,
                       with_full=stores_full_distribution(other) and packing, packing=packing)


def open_offpolicy_rows(cfg: TrainConfig, manifest, rows: int, rank: int, world: int) -> OffPolicyRows:
    """The GKD mix's off-policy part: ``rows`` rows per micro-batch of ``--offpolicy-cache``, forward KL."""
    other = open_same_teacher(cfg.offpolicy_cache, "--offpolicy-cache", manifest, "the mix needs one teacher",
                              cfg.storage_options)
    check_loss_supported(offpolicy_config(cfg), other.encoding, cfg.offpolicy_cache, other.manifest.arrays)
    stream = CacheStream(other, cfg.seq_len, rows, seed=cfg.seed, rank=rank, world_size=world)
    return OffPolicyRows(make_dataloader(stream, num_workers=cfg.num_workers))


def offpolicy_config(cfg: TrainConfig) -> TrainConfig:
    """The settings of the mix's off-policy part: forward KL at T = 1, no token selection."""
    return dataclasses.replace(cfg, loss="forward_kl", loss_args={}, temperature=1.0, entropy_above=None,
                               entropy_below=None, entropy_top_frac=None, entropy_bottom_frac=None,
                               token_select="all", top_frac=None)


# ---- test hooks -------------------------------------------------------------------------------------
def _fault_after(step: int) -> None:
    """Test hook: STUDENT_TRAIN_FAULT=kill-after-step:N kills this process after optimizer step N."""
    fault = os.environ.get("STUDENT_TRAIN_FAULT", "")
    if fault.startswith("kill-after-step:") and int(fault.split(":")[1]) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _record_samples(stream: CacheStream, batch: dict, rank: int) -> None:
    """Test hook: STUDENT_TRAIN_RECORD_SAMPLES=PATH appends the sample ids each rank trains on to PATH.<rank>."""
    path = os.environ.get("STUDENT_TRAIN_RECORD_SAMPLES")
    if path:
        idx = batch["sample_index"].unique().tolist()
        with open(f"{path}.{rank}", "a") as f:
            f.writelines(stream.sample_id(i) + "\n" for i in idx if i >= 0)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the run ----------------------------------------------------------------------------------------
def train(cfg: TrainConfig, progress: bool = True) -> dict:
    rank, world, device = setup_distributed()
    main_process = rank == 0
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # -- setup: data
    cache = open_cache(cfg.cache, storage_options=cfg.storage_options or None)
    manifest = cache.manifest
    chosen = selected_ids(cfg, cache)
    all_ids = cache.samples.column("sample_id").to_pylist()
    check_loss_supported(cfg, cache.encoding, cfg.cache, manifest.arrays)
    if cfg.offpolicy_cache and (cfg.teachers or cfg.layer_map):
        raise LogitcacheError("--offpolicy-cache: the GKD mix trains on one teacher's logits (no --teacher, --layer-map)")
    on_rows, off_rows = split_batch(cfg.batch_size, cfg.onpolicy_frac) if cfg.offpolicy_cache else (cfg.batch_size, 0)
    train_ids, eval_ids = split_ids(all_ids, 0.0 if cfg.eval_cache else cfg.eval_frac)
    if chosen is not None:
        keep = set(chosen)
        train_ids = [s for s in train_ids if s in keep]
        if not train_ids:
            raise LogitcacheError(f"--selection {cfg.selection}: every selected sample is in the held-out split")
    n_student_layers = student_num_layers(cfg.student, cfg.keep_layers, manifest)   # before any weights load
    for s, t in cfg.layer_map:
        if not -n_student_layers - 1 <= s <= n_student_layers:
            raise LogitcacheError(f"--layer-map {s}:{t}: the student has layers 0..{n_student_layers}")
    hidden_names = [f"hidden.{absolute_layer(t, manifest.teacher.num_layers)}" for _, t in cfg.layer_map]
    teacher_layers = [t for _, t in cfg.layer_map]
    if cfg.full_targets and not stores_full_distribution(cache):
        raise LogitcacheError(f"--full-targets: {cfg.cache} was captured with --encoding {cache.encoding.name}; "
                              "it needs a cache captured with --encoding full")
    transfer_pairs = attention_pairs(cfg, manifest, n_student_layers)
    from transformers import AutoTokenizer

    tokenizer_dir = student_tokenizer_dir(cfg.student, cfg.keep_layers, manifest)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cross = not tokenizer_matches(cache, tokenizer)     # a student with another tokenizer (cross_tokenizer.py)
    if cross:
        check_cross_tokenizer_supported(cfg)
    stream = CacheStream(cache, cfg.seq_len, on_rows, seed=cfg.seed, sample_ids=train_ids, packing=not cross,
                         where=cfg.where, hidden_layers=teacher_layers, rank=rank, world_size=world,
                         dense_targets=cfg.full_targets, token_logprobs=cfg.loss == POLICY_GRADIENT,
                         attention_layers=[t for _, t in transfer_pairs])
    loader = make_dataloader(stream, num_workers=cfg.num_workers)
    joins = [TeacherJoin(url, stream) for url in cfg.teachers]
    offpolicy = open_offpolicy_rows(cfg, manifest, off_rows, rank, world) if cfg.offpolicy_cache else None
    eval_stream = CacheStream(cache, cfg.seq_len, cfg.batch_size, shuffle=False, sample_ids=eval_ids,
                              rank=0, world_size=1, packing=not cross) if eval_ids else None
    if cfg.eval_cache:                      # a separate held-out cache, e.g. captured with --encoding full
        eval_stream = open_eval_stream(cfg, manifest, packing=not cross)
        eval_ids = eval_stream.sample_ids
    if cross:         # rows in the student's tokens, teacher targets carried over (vocabulary map, ULD)
        loader, eval_stream, converter = cross_tokenizer_rows(cfg, manifest, tokenizer, loader, stream, eval_stream,
                                                              main_process)
    data_fingerprints = {"cache": cache_fingerprint(manifest),   # what a checkpoint of this run was trained on
                         "eval_cache": cache_fingerprint(eval_stream.cache.manifest) if cfg.eval_cache else None,
                         "teachers": [cache_fingerprint(j.cache.manifest) for j in joins]}
    if offpolicy is not None:
        data_fingerprints["offpolicy_cache"] = cache_fingerprint(offpolicy.loader.stream.cache.manifest)

    # -- setup: model
    model, tokenizer_dir = build_student(cfg.student, cfg.keep_layers, manifest, cfg.seed)
    width = model.get_output_embeddings().weight.shape[0]
    if cross and width < len(tokenizer):
        raise LogitcacheError(f"--student {cfg.student}: its logits have {width} entries but its tokenizer has "
                              f"{len(tokenizer)} tokens")
    if not cross and width != manifest.teacher.vocab_size:
        raise LogitcacheError(f"the student's logits have {width} entries but the teacher's have "
                              f"{manifest.teacher.vocab_size}; distillation needs the same vocabulary")
    projector = losses.HiddenStateProjector([model.config.hidden_size] * len(cfg.layer_map),
                                            [manifest.teacher.hidden_size] * len(cfg.layer_map)) \
        if cfg.layer_map else None
    transfer = attention_transfer(cfg, model, manifest, transfer_pairs)
    model.to(device).train()
    if projector is not None:
        projector.to(device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    attention = choose_attention(model, cfg.attention, device, amp_dtype)     # probed before any wrapping
    if main_process:
        log.info("attention: %s (%s)%s", attention.mode, attention.implementation,
                 f"; skipped {attention.reason}" if attention.reason else "")
    unfusable = ("--full-targets" if cfg.full_targets else "--loss policy_gradient" if cfg.loss == POLICY_GRADIENT
                 else "a student with another tokenizer" if cross
                 else "--token-select student-entropy" if cfg.token_select == "student-entropy" else "")
    if unfusable and cfg.fused_loss == "on":
        raise LogitcacheError(f"--fused-loss on: {unfusable} computes its loss on the (B, T, V) logits; use auto or off")
    head, unfused_because = choose_loss_head(model, "off" if unfusable else cfg.fused_loss,
                                             cfg.batch_size * cfg.seq_len * width * 4, device)
    if cfg.activation_checkpointing:
        parallel.enable_activation_checkpointing(model)
    sharded = cfg.parallel == "fsdp"
    wrapped = parallel.wrap(model, cfg.parallel, world, device, amp_dtype if sharded else None)
    if projector is not None and sharded:
        parallel.wrap(projector, "fsdp", world, device, None)
    kd = dataclasses.replace(cfg.objective(), chunk_rows=losses.device_chunk_rows(width, device))
    off_cfg = offpolicy_config(cfg) if offpolicy is not None else None
    off_kd = dataclasses.replace(off_cfg.objective(), chunk_rows=kd.chunk_rows) if off_cfg is not None else None
    share = cfg.onpolicy_frac if offpolicy is not None else 1.0
    params = list(model.parameters()) + (list(projector.parameters()) if projector is not None else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(stream.batches_per_rank / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    evaluating = main_process or sharded           # an FSDP forward pass needs every rank

    step, epoch, history = 0, 0, {"train": [], "eval": []}
    if not cfg.resume and main_process:
        shutil.rmtree(os.path.join(cfg.out, CHECKPOINT), ignore_errors=True)
    state = load_checkpoint(cfg.out, cfg.to_dict(), data_fingerprints) if cfg.resume else None
    if state is not None:
        if sharded:
            parallel.load_sharded_state(model, projector, optimizer, state["sharded_at"])
        else:
            model.load_state_dict(state["model"])
            if projector is not None:
                projector.load_state_dict(state["projector"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        if offpolicy is not None:
            offpolicy.load_state_dict(state["offpolicy"])
        step, epoch, history = state["step"], state["epoch"], state["history"]
        set_rng_state(state["rng"])
        if main_process:
            log.warning("resuming %s at step %d of %d", cfg.out, step, total_steps)
    elif eval_stream is not None and evaluating:
        history["eval"].append({"step": 0, **evaluate(model, eval_stream, device, amp_dtype, cfg.eval_batches,
                                                       attention)})

    os.makedirs(cfg.out, exist_ok=True)
    writer = _tensorboard(cfg.out) if main_process else None
    bar = _bar(progress and main_process, total_steps, step)
    t0, tokens_seen, tokens_at_start = time.perf_counter(), 0, 0
    while step < total_steps:
        if state is None or epoch != state["epoch"]:
            loader.set_epoch(epoch)                     # a fresh epoch from its start
        state = {"epoch": epoch}                        # later epochs always start fresh
        group, parts_sum = 0, {}
        batches = iter(loader)       # closed below however the epoch ends: no prefetch thread outlives it
        try:
            for batch in batches:
                for j, join in enumerate(joins, start=1):
                    batch.update(join(batch, f"teacher{j}"))
                tokens_seen += int((batch["document_ids"] != 0).sum())      # on the host: no device sync
                _record_samples(stream, batch, rank)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                last_of_epoch = stream.rows_consumed >= stream.batches_per_rank * stream.batch_size
                step_ends = group + 1 >= cfg.grad_accum or last_of_epoch
                with parallel.gradient_sync(wrapped, step_ends and offpolicy is None):   # all-reduce once a step
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss, parts = compute_loss(cfg, kd, wrapped, batch, projector, hidden_names, attention,
                                                   head, transfer)
                    (share * loss / cfg.grad_accum).backward()
                if offpolicy is not None:             # the GKD mix: (1 - lambda) of forward KL on teacher text
                    off = {k: v.to(device, non_blocking=True) for k, v in offpolicy.next().items()}
                    with parallel.gradient_sync(wrapped, step_ends):
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            off_loss, off_parts = compute_loss(off_cfg, off_kd, wrapped, off, None, [], attention,
                                                               head)
                        ((1 - share) * off_loss / cfg.grad_accum).backward()
                    parts = {**parts, "kd_offpolicy": off_parts["kd"],
                             "loss": share * parts["loss"] + (1 - share) * off_parts["loss"]}
                group += 1
                for k, v in parts.items():                  # device tensors: read back once per step
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
                if not step_ends:
                    continue
                if group < cfg.grad_accum:                  # the epoch's last, partial group
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(cfg.grad_accum / group)
                if projector is not None and world > 1 and not sharded:
                    parallel.average_gradients(projector.parameters(), world)   # DDP wraps the student only
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(parallel.full_value(grad_norm)),
                          **{k: float(v) / group for k, v in parts_sum.items()}}
                group, parts_sum = 0, {}
                history["train"].append(record)
                if main_process:
                    _log(cfg, writer, record, step)
                    if bar is not None:
                        rate = (tokens_seen - tokens_at_start) / max(time.perf_counter() - t0, 1e-9)
                        bar.update(1)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate * world:.0f}")
                if cfg.eval_every and step % cfg.eval_every == 0 and eval_stream is not None and evaluating:
                    history["eval"].append({"step": step, **evaluate(model, eval_stream, device, amp_dtype,
                                                                     cfg.eval_batches, attention)})
                    if main_process:
                        _log(cfg, writer, {"eval": history["eval"][-1]}, step)
                if step % cfg.save_every == 0 or step == total_steps:
                    _save(cfg, rank, world, model, projector, optimizer, scheduler, loader, step, epoch,
                          history, data_fingerprints, sharded, offpolicy)
                _fault_after(step)
                if step >= total_steps:
                    break
            else:
                epoch += 1
        finally:
            batches.close()
    if offpolicy is not None:
        offpolicy.close()
    train_seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    report = {}
    if evaluating and eval_stream is not None and (not history["eval"] or history["eval"][-1]["step"] != step):
        history["eval"].append({"step": step, **evaluate(model, eval_stream, device, amp_dtype, cfg.eval_batches,
                                                         attention)})
    weights = parallel.full_state_dict(model)         # gathered from the shards under FSDP (every rank takes part)
    cross_stats = converter.stats(device) if cross else None     # summed over the ranks (every rank takes part)
    projector_weights = parallel.full_state_dict(projector) if projector is not None else None
    if main_process:
        report = _finish(cfg, model, weights, projector_weights, tokenizer_dir, history, dict(
            steps=step, total_steps=total_steps, world_size=world, parallel=cfg.parallel,
            attention=attention.to_dict(), fused_loss={"on": head is not None, "reason": unfused_because},
            train_samples=stream.num_samples,
            **({"cross_tokenizer": cross_stats} if cross else {}),
            eval_samples=len(eval_ids), tokens_this_run=tokens_seen * world, seconds_this_run=train_seconds,
            tokens_per_second=tokens_seen * world / max(train_seconds, 1e-9),
            parameters=count_parameters(model),         # DTensors count their global size
            peak_memory_mb=peak_memory_mb(device)))
        if writer is not None:
            writer.close()
    if world > 1:
        torch.distributed.barrier()
    return report


# ---- small helpers of the loop ----------------------------------------------------------------------
def _save(cfg, rank, world, model, projector, optimizer, scheduler, loader, step, epoch, history, data, sharded,
          offpolicy=None):
    state = {"scheduler": scheduler.state_dict(), "loader": loader.state_dict(), "step": step, "epoch": epoch,
             "history": history, "rng": rng_state()}
    if offpolicy is not None:
        state["offpolicy"] = offpolicy.state_dict()
    shards = None
    if sharded:       # model, projector and optimizer: every rank's shards, torch.distributed.checkpoint
        shards = parallel.sharded_state(model, projector, optimizer)
    elif rank == 0:
        state.update(model=model.state_dict(), projector=projector.state_dict() if projector is not None else None,
                     optimizer=optimizer.state_dict())
    save_checkpoint(cfg.out, state, cfg.to_dict(), data, shards, rank, world)
    if world > 1:
        torch.distributed.barrier()


def _log(cfg, writer, record: dict, step: int) -> None:
    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        flat = record.get("eval", record)
        prefix = "eval/" if "eval" in record else "train/"
        for k, v in flat.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                writer.add_scalar(prefix + k, v, step)


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:            # tensorboard not installed: JSONL only
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"))


def _bar(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step")


def _finish(cfg, model, weights, projector_weights, tokenizer_dir, history, stats) -> dict:
    """Save the student (Hugging Face layout + projector) from its full ``weights`` and write
    report.json and curves.png."""
    from transformers import AutoTokenizer

    student_dir = os.path.join(cfg.out, "student")
    model.save_pretrained(student_dir, state_dict=weights)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(student_dir)
    if projector_weights is not None:
        torch.save({"layer_map": cfg.layer_map, "state": projector_weights},
                   os.path.join(student_dir, "hidden_projector.pt"))
    size = sum(os.path.getsize(os.path.join(student_dir, f)) for f in os.listdir(student_dir))
    report = {"config": cfg.to_dict(), **stats, "student_dir": student_dir, "student_disk_bytes": size,
              "eval_start": history["eval"][0] if history["eval"] else None,
              "eval_end": history["eval"][-1] if history["eval"] else None,
              "final_train": history["train"][-1] if history["train"] else None}
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot_curves(history, os.path.join(cfg.out, "curves.png"))
    report["plot"] = os.path.join(cfg.out, "curves.png")
    return report


def curves_figure(history: dict):
    """The run's curves as a matplotlib figure: left, the training loss at every logged step (a line:
    those are a trajectory); right, the held-out measures at the steps evaluated (markers only: two
    evaluations joined by a line would invent the path between them): KL(teacher || student) as the
    cache's encoding gives it, the exact KL over the whole vocabulary where an evaluation cache holds
    it, and top-1 agreement on its own axis. Optimizer steps are integer ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.9))
    tr = history["train"]
    if tr:
        left.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="training loss")
        if "kd" in tr[0] and any("ce" in r or "hidden" in r for r in tr):
            left.plot([r["step"] for r in tr], [r["kd"] for r in tr], label="its distillation part", alpha=0.7)
        left.legend(loc="upper right")
    left.set_xlabel("optimizer step")
    left.set_ylabel("loss (nats/token)")
    left.set_title("training loss, per logged step")

    ev = [e for e in history["eval"] if "kl_forward" in e]
    handles = []
    if ev:
        steps = [e["step"] for e in ev]
        handles += right.plot(steps, [e["kl_forward"] for e in ev], "o", ms=7, linestyle="none",
                              label="KL(teacher || student), stored encoding")
        exact = [(e["step"], e["kl_forward_exact"]) for e in ev if e.get("kl_forward_exact") is not None]
        if exact:
            handles += right.plot(*zip(*exact), "D", ms=6, linestyle="none", color="tab:red",
                                  label="KL(teacher || student), exact over the vocabulary")
        twin = right.twinx()
        handles += twin.plot(steps, [e["top1_agreement"] for e in ev], "s", ms=6, linestyle="none",
                             color="tab:green", label="top-1 agreement (right axis)")
        twin.set_ylabel("top-1 agreement (share of tokens)")
        twin.set_ylim(0, 1)
        right.legend(handles=handles, loc="center right", fontsize=8)
    right.set_xlabel("optimizer step")
    right.set_ylabel("KL (nats/token)")
    right.set_title(f"held-out, against the teacher ({len(ev)} evaluation(s))")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(history: dict, path: str) -> None:
    """``curves_figure`` written to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(history)
    fig.savefig(path, dpi=110)
    plt.close(fig)
