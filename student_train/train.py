"""The training loop: setup -> (evaluate) -> train -> evaluate -> save, in one readable function.

One process per device; under torchrun/accelerate the ranks form a DDP group (NCCL on GPUs, gloo
on the CPU) and the stream gives each rank its own rows, the same number on every rank. A
checkpoint (model, projector, optimizer, scheduler, loader position, RNG states; ``checkpoint.py``)
is written atomically every ``save_every`` optimizer steps with checksums and the fingerprints of
the caches it was trained on; re-running the same command continues from it and reaches the same
weights as a run that was never interrupted, and refuses a damaged checkpoint or changed caches.

Everything that can be checked without the student's weights is checked before they are loaded,
and nothing is written into ``out`` before the loop starts.

Loss per micro-batch: ``ce_alpha * CE + (1 - ce_alpha) * KD + hidden_weight * feature loss``, each a
token-weighted mean over the micro-batch's loss tokens (``student_train.losses``).
"""

from __future__ import annotations

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

from . import losses, sampled_kd
from .checkpoint import CHECKPOINT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import CacheStream, block_causal_mask, check_student_vocab, make_dataloader
from .model import build_student, count_parameters, student_num_layers
from .multi_teacher import TeacherJoin

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


# ---- one step's loss --------------------------------------------------------------------------------
def forward(model, batch: dict, need_hidden: bool):
    mask = block_causal_mask(batch["document_ids"])[:, None]              # (B, 1, T, T)
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                 output_hidden_states=need_hidden, use_cache=False)


def token_weights(cfg: TrainConfig, batch: dict) -> torch.Tensor:
    mask = batch["loss_mask"]
    if all(v is None for v in (cfg.entropy_above, cfg.entropy_below, cfg.entropy_top_frac, cfg.entropy_bottom_frac)):
        return mask.float()
    return losses.entropy_token_weights(batch["teacher_entropy"], mask, above=cfg.entropy_above,
                                        below=cfg.entropy_below, top_frac=cfg.entropy_top_frac,
                                        bottom_frac=cfg.entropy_bottom_frac)


def compute_loss(cfg: TrainConfig, kd: losses.DistillationConfig, model, batch: dict, projector,
                 hidden_names: list[str]) -> tuple[torch.Tensor, dict]:
    out = forward(model, batch, bool(hidden_names))
    logits = out.logits                                                    # (B, T, V)
    weights = token_weights(cfg, batch)
    kd_loss = teacher_loss(logits, batch, weights, kd)
    parts = {"kd": kd_loss.detach()}
    if cfg.teachers:          # other teachers' rows, joined by sample id (multi_teacher.TeacherJoin)
        each = [kd_loss] + [losses.distillation_loss(logits, batch[f"teacher{j}_ids"], batch[f"teacher{j}_logprobs"],
                                                     weights * batch[f"teacher{j}_mask"],
                                                     teacher_tail=batch.get(f"teacher{j}_tail"), **kd.kd_kwargs())
                            for j in range(1, len(cfg.teachers) + 1)]
        kd_loss = losses.combine_teacher_losses(each, cfg.teacher_weights or [1.0] * len(each))
        parts.update({f"kd_teacher{j}": v.detach() for j, v in enumerate(each)})
        parts["kd"] = kd_loss.detach()
    loss = kd_loss
    if cfg.ce_alpha > 0:
        ce = losses.hard_label_cross_entropy(logits, batch["labels"], chunk_rows=kd.chunk_rows)
        loss = losses.mix_ce_and_kd(ce, kd_loss, cfg.ce_alpha)
        parts["ce"] = ce.detach()
    if hidden_names:
        real = batch["document_ids"] != 0
        feat = sum(losses.hidden_state_loss(out.hidden_states[s], batch[name], real, kind=cfg.hidden_loss,
                                            projector=projector, pair=i)
                   for i, ((s, _), name) in enumerate(zip(cfg.layer_map, hidden_names)))
        loss = loss + cfg.hidden_weight * feat
        parts["hidden"] = feat.detach()
    parts["loss"] = loss.detach()
    return loss, parts


def teacher_loss(logits: torch.Tensor, batch: dict, weights: torch.Tensor,
                 kd: losses.DistillationConfig | None = None) -> torch.Tensor:
    """The distillation loss the cache's encoding supports: the chosen divergence over the stored ids
    + tail bucket (topk, adaptive, compact; with the exact tail where stored), or the unbiased forward-KL
    estimate from target weights (sampled, hybrid). ``kd`` None: forward KL, T = 1 (evaluation)."""
    kw = kd.kd_kwargs() if kd is not None else {}
    if "teacher_targets" in batch:
        if kd is not None and (kd.kind != "forward_kl" or kd.temperature != 1.0):
            raise LogitcacheError(f"a sampled / hybrid cache trains forward_kl at temperature 1 only, not {kd.kind} "
                                  f"at {kd.temperature}")
        return sampled_kd.estimated_forward_kl(logits, batch["teacher_ids"], batch["teacher_targets"],
                                               batch["teacher_entropy"], weights,
                                               chunk_rows=kw.get("chunk_rows") or losses.DEFAULT_CHUNK_ROWS)
    return losses.distillation_loss(logits, batch["teacher_ids"], batch["teacher_logprobs"], weights,
                                    teacher_tail=batch.get("teacher_tail"), **kw)


def check_loss_supported(cfg: TrainConfig, encoding: dict, where: str) -> None:
    """Sampled and hybrid caches hold estimates of p, not p: only forward KL at T = 1 is unbiased."""
    name = encoding["name"]
    if name in ("sampled", "hybrid"):
        if cfg.loss != "forward_kl" or cfg.temperature != 1.0:
            raise LogitcacheError(f"{where} is a {name} cache: it supports --loss forward_kl at --temperature 1 "
                                  f"(an unbiased estimate), not --loss {cfg.loss} at temperature {cfg.temperature}; "
                                  "capture with --encoding compact or topk for other divergences")
        if cfg.teachers:
            raise LogitcacheError(f"{where} is a {name} cache: multi-teacher training needs topk caches")


def teacher_top1(batch: dict) -> torch.Tensor:
    """(B, T) the teacher's most probable id: from the full distribution when loaded, else from the
    stored entries (rank order for topk; the largest value or target otherwise)."""
    if "teacher_full_logprobs" in batch:
        return batch["teacher_full_logprobs"].argmax(-1)
    values = batch["teacher_targets"] if "teacher_targets" in batch else batch["teacher_logprobs"]
    return batch["teacher_ids"].gather(-1, values.argmax(-1, keepdim=True))[..., 0]


def exact_kl_sums(logits: torch.Tensor, full_logprobs: torch.Tensor, mask: torch.Tensor,
                  chunk_rows: int = 256) -> tuple[float, float]:
    """Sums over the masked tokens of forward KL(p || q) and reverse KL(q || p) over the whole vocabulary,
    p from the cache's full distribution (renormalised after its fp16 rounding), q the student's."""
    z, lp = logits[mask].float(), full_logprobs[mask].float()
    fwd = rev = 0.0
    for s in range(0, z.shape[0], chunk_rows):
        logq = torch.log_softmax(z[s:s + chunk_rows], -1)
        logp = torch.log_softmax(lp[s:s + chunk_rows], -1)
        fwd += float((logp.exp() * (logp - logq)).sum())
        rev += float((logq.exp() * (logq - logp)).sum())
    return fwd, rev


@torch.no_grad()
def evaluate(model, stream: CacheStream, device, amp_dtype, max_batches: int | None = None) -> dict:
    """Against the cached teacher on held-out samples: forward KL(p_teacher || q_student) as the cache's
    encoding gives it (stored ids + tail bucket, or the sampled estimate), the student's perplexity on
    the tokens, top-1 agreement; on a ``--encoding full`` cache also the exact forward and reverse KL
    over the whole vocabulary (``kl_forward_exact``, ``kl_reverse_exact``)."""
    was_training = model.training
    model.eval()
    kl_sum = nll_sum = agree = n = 0.0
    exact_fwd = exact_rev = 0.0
    for i, batch in enumerate(stream):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = forward(model, batch, False).logits
        mask = batch["loss_mask"]
        count = float(mask.sum())
        if count == 0:
            continue
        kl_sum += float(teacher_loss(logits, batch, mask)) * count
        nll_sum += float(losses.hard_label_cross_entropy(logits, batch["labels"])) * count
        agree += float(((logits.argmax(-1) == teacher_top1(batch)) & mask).sum())
        if "teacher_full_logprobs" in batch:
            f, r = exact_kl_sums(logits, batch["teacher_full_logprobs"], mask)
            exact_fwd, exact_rev = exact_fwd + f, exact_rev + r
        n += count
    model.train(was_training)
    if n == 0:
        return {"tokens": 0}
    out = {"tokens": int(n), "kl_forward": kl_sum / n, "perplexity": math.exp(nll_sum / n), "top1_agreement": agree / n}
    if stream.with_full:
        out.update(kl_forward_exact=exact_fwd / n, kl_reverse_exact=exact_rev / n)
    return out


def open_eval_stream(cfg: TrainConfig, manifest) -> CacheStream:
    """The ``--eval-cache`` stream: every sample of it, against the same teacher and tokenizer."""
    other = open_cache(cfg.eval_cache)
    m = other.manifest
    if m.teacher.fingerprint != manifest.teacher.fingerprint:
        raise LogitcacheError(f"--eval-cache {cfg.eval_cache} holds teacher {m.teacher.name} "
                              f"({m.teacher.fingerprint[:19]}), the training cache {manifest.teacher.name} "
                              f"({manifest.teacher.fingerprint[:19]}): held-out metrics need the same teacher")
    if m.tokenizer.vocab_sha256 != manifest.tokenizer.vocab_sha256:
        raise LogitcacheError(f"--eval-cache {cfg.eval_cache} was captured with another tokenizer")
    return CacheStream(other, cfg.seq_len, cfg.batch_size, shuffle=False, rank=0, world_size=1,
                       with_full=m.capture.encoding["name"] == "full")


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
    cache = open_cache(cfg.cache)
    manifest = cache.manifest
    chosen = selected_ids(cfg, cache)
    all_ids = cache.samples.column("sample_id").to_pylist()
    check_loss_supported(cfg, manifest.capture.encoding, cfg.cache)
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
    stream = CacheStream(cache, cfg.seq_len, cfg.batch_size, seed=cfg.seed, sample_ids=train_ids,
                         where=cfg.where, hidden_layers=teacher_layers, rank=rank, world_size=world)
    loader = make_dataloader(stream, num_workers=cfg.num_workers)
    joins = [TeacherJoin(url, stream) for url in cfg.teachers]
    eval_stream = CacheStream(cache, cfg.seq_len, cfg.batch_size, shuffle=False, sample_ids=eval_ids,
                              rank=0, world_size=1) if eval_ids else None
    if cfg.eval_cache:                      # a separate held-out cache, e.g. captured with --encoding full
        eval_stream = open_eval_stream(cfg, manifest)
        eval_ids = eval_stream.sample_ids
    data_fingerprints = {"cache": cache_fingerprint(manifest),   # what a checkpoint of this run was trained on
                         "eval_cache": cache_fingerprint(eval_stream.cache.manifest) if cfg.eval_cache else None,
                         "teachers": [cache_fingerprint(j.cache.manifest) for j in joins]}

    # -- setup: model
    model, tokenizer_dir = build_student(cfg.student, cfg.keep_layers, manifest, cfg.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_student_vocab(cache, tokenizer)
    width = model.get_output_embeddings().weight.shape[0]
    if width != manifest.teacher.vocab_size:
        raise LogitcacheError(f"the student's logits have {width} entries but the teacher's have "
                              f"{manifest.teacher.vocab_size}; distillation needs the same vocabulary")
    projector = losses.HiddenStateProjector([model.config.hidden_size] * len(cfg.layer_map),
                                            [manifest.teacher.hidden_size] * len(cfg.layer_map)) \
        if cfg.layer_map else None
    model.to(device).train()
    if projector is not None:
        projector.to(device)
    kd = cfg.objective()
    params = list(model.parameters()) + (list(projector.parameters()) if projector is not None else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(stream.batches_per_rank / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                               else None)
    amp_dtype = autocast_dtype(cfg.precision, device)

    step, epoch, history = 0, 0, {"train": [], "eval": []}
    if not cfg.resume and main_process:
        shutil.rmtree(os.path.join(cfg.out, CHECKPOINT), ignore_errors=True)
    state = load_checkpoint(cfg.out, cfg.to_dict(), data_fingerprints) if cfg.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        if projector is not None:
            projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        step, epoch, history = state["step"], state["epoch"], state["history"]
        set_rng_state(state["rng"])
        if main_process:
            log.warning("resuming %s at step %d of %d", cfg.out, step, total_steps)
    elif eval_stream is not None and main_process:
        history["eval"].append({"step": 0, **evaluate(model, eval_stream, device, amp_dtype, cfg.eval_batches)})

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
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                last_of_epoch = stream.rows_consumed >= stream.batches_per_rank * cfg.batch_size
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, parts = compute_loss(cfg, kd, ddp_model, batch, projector, hidden_names)
                (loss / cfg.grad_accum).backward()
                group += 1
                tokens_seen += int((batch["document_ids"] != 0).sum())
                _record_samples(stream, batch, rank)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
                if group < cfg.grad_accum and not last_of_epoch:
                    continue
                if group < cfg.grad_accum:                  # the epoch's last, partial group
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(cfg.grad_accum / group)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          **{k: v / group for k, v in parts_sum.items()}}
                group, parts_sum = 0, {}
                history["train"].append(record)
                if main_process:
                    _log(cfg, writer, record, step)
                    if bar is not None:
                        rate = (tokens_seen - tokens_at_start) / max(time.perf_counter() - t0, 1e-9)
                        bar.update(1)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate * world:.0f}")
                if cfg.eval_every and step % cfg.eval_every == 0 and eval_stream is not None and main_process:
                    history["eval"].append({"step": step, **evaluate(model, eval_stream, device, amp_dtype,
                                                                     cfg.eval_batches)})
                    _log(cfg, writer, {"eval": history["eval"][-1]}, step)
                if step % cfg.save_every == 0 or step == total_steps:
                    _save(cfg, main_process, world, model, projector, optimizer, scheduler, loader, step, epoch,
                          history, data_fingerprints)
                _fault_after(step)
                if step >= total_steps:
                    break
            else:
                epoch += 1
        finally:
            batches.close()
    train_seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    report = {}
    if main_process:
        if eval_stream is not None and (not history["eval"] or history["eval"][-1]["step"] != step):
            history["eval"].append({"step": step, **evaluate(model, eval_stream, device, amp_dtype, cfg.eval_batches)})
        report = _finish(cfg, model, projector, tokenizer_dir, history, dict(
            steps=step, total_steps=total_steps, world_size=world, train_samples=stream.num_samples,
            eval_samples=len(eval_ids), tokens_this_run=tokens_seen * world, seconds_this_run=train_seconds,
            tokens_per_second=tokens_seen * world / max(train_seconds, 1e-9),
            parameters=count_parameters(model), peak_memory_mb=peak_memory_mb(device)))
        if writer is not None:
            writer.close()
    if world > 1:
        torch.distributed.barrier()
    return report


# ---- small helpers of the loop ----------------------------------------------------------------------
def _save(cfg, main_process, world, model, projector, optimizer, scheduler, loader, step, epoch, history, data):
    if main_process:
        save_checkpoint(cfg.out, {"model": model.state_dict(),
                                  "projector": projector.state_dict() if projector is not None else None,
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "loader": loader.state_dict(), "step": step, "epoch": epoch, "history": history,
                                  "rng": rng_state()}, cfg.to_dict(), data)
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


def _finish(cfg, model, projector, tokenizer_dir, history, stats) -> dict:
    """Save the student (Hugging Face layout + projector) and write report.json and curves.png."""
    from transformers import AutoTokenizer

    student_dir = os.path.join(cfg.out, "student")
    model.save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(student_dir)
    if projector is not None:
        torch.save({"layer_map": cfg.layer_map, "state": projector.state_dict()},
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


def plot_curves(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    tr = history["train"]
    if tr:
        axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss")
        if "kd" in tr[0] and any("ce" in r or "hidden" in r for r in tr):
            axes[0].plot([r["step"] for r in tr], [r["kd"] for r in tr], label="KD part", alpha=0.7)
    axes[0].set_xlabel("optimizer step")
    axes[0].set_title("training loss")
    axes[0].legend()
    ev = [e for e in history["eval"] if "kl_forward" in e]
    if ev:
        axes[1].plot([e["step"] for e in ev], [e["kl_forward"] for e in ev], "o-", label="KL(teacher||student)")
        ax2 = axes[1].twinx()
        ax2.plot([e["step"] for e in ev], [e["top1_agreement"] for e in ev], "s--", color="tab:green",
                 label="top-1 agreement")
        ax2.set_ylabel("top-1 agreement")
        axes[1].legend(loc="upper right")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_title("held-out, against the cached teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
