"""The training objective of one micro-batch: the student's forward pass, the distillation loss its
teacher targets support, hard-label CE, other teachers, hidden-state losses.

Importable without the training loop (the transformers Trainer adapter uses ``forward`` and
``teacher_loss``). The loss is chosen by the type of the batch's teacher targets (``targets``):

    loss = ce_alpha * CE + (1 - ce_alpha) * KD + hidden_weight * feature loss

each a token-weighted mean over the micro-batch's loss tokens (``student_train.losses``).
"""

from __future__ import annotations

import torch

from logitcache.format.encodings import Encoding
from logitcache.format.errors import LogitcacheError

from . import losses, sampled_kd
from .config import TrainConfig
from .data import block_causal_mask
from .targets import EstimatedTargets, SparseTargets


def forward(model, batch: dict, need_hidden: bool):
    """The student on a packed batch: document-bounded causal attention, positions restarting per document."""
    mask = block_causal_mask(batch["document_ids"])[:, None]              # (B, 1, T, T)
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                 output_hidden_states=need_hidden, use_cache=False)


def teacher_loss(logits: torch.Tensor, targets: SparseTargets | EstimatedTargets, weights: torch.Tensor,
                 kd: losses.DistillationConfig | None = None) -> torch.Tensor:
    """The distillation loss the targets support: for ``SparseTargets`` the chosen divergence over the
    stored ids + tail bucket (with the exact tail where stored); for ``EstimatedTargets`` the unbiased
    forward-KL estimate. logits (B, T, V); weights (B, T). ``kd`` None: forward KL, T = 1 (evaluation)."""
    targets = targets.to(logits.device)
    kw = kd.kd_kwargs() if kd is not None else {}
    if isinstance(targets, EstimatedTargets):
        if kd is not None and (kd.kind != "forward_kl" or kd.temperature != 1.0):
            raise LogitcacheError(f"sampled / hybrid targets train forward_kl at temperature 1 only, not {kd.kind} "
                                  f"at {kd.temperature}")
        return sampled_kd.estimated_forward_kl(logits, targets.ids, targets.targets, targets.entropy, weights,
                                               chunk_rows=kw.get("chunk_rows") or losses.DEFAULT_CHUNK_ROWS)
    if isinstance(targets, SparseTargets):
        return losses.distillation_loss(logits, targets.ids, targets.logprobs, weights, teacher_tail=targets.tail,
                                        **kw)
    raise TypeError(f"teacher targets must be SparseTargets or EstimatedTargets, got {type(targets).__name__}")


def check_loss_supported(cfg: TrainConfig, encoding: Encoding, where: str) -> None:
    """Estimated encodings (sampled, hybrid) hold estimates of p, not p: only forward KL at T = 1 is unbiased."""
    if encoding.estimated:
        if cfg.loss != "forward_kl" or cfg.temperature != 1.0:
            raise LogitcacheError(f"{where} is a {encoding.name} cache: it supports --loss forward_kl at --temperature "
                                  f"1 (an unbiased estimate), not --loss {cfg.loss} at temperature {cfg.temperature}; "
                                  "capture with --encoding compact or topk for other divergences")
        if cfg.teachers:
            raise LogitcacheError(f"{where} is a {encoding.name} cache: multi-teacher training needs topk caches")


def token_weights(cfg: TrainConfig, batch: dict) -> torch.Tensor:
    """(B, T) weights of the loss positions: the mask, or the entropy-selected tokens."""
    mask = batch["loss_mask"]
    if all(v is None for v in (cfg.entropy_above, cfg.entropy_below, cfg.entropy_top_frac, cfg.entropy_bottom_frac)):
        return mask.float()
    return losses.entropy_token_weights(batch["teacher_entropy"], mask, above=cfg.entropy_above,
                                        below=cfg.entropy_below, top_frac=cfg.entropy_top_frac,
                                        bottom_frac=cfg.entropy_bottom_frac)


def compute_loss(cfg: TrainConfig, kd: losses.DistillationConfig, model, batch: dict, projector,
                 hidden_names: list[str]) -> tuple[torch.Tensor, dict]:
    """The micro-batch loss and its parts (detached, for the log)."""
    out = forward(model, batch, bool(hidden_names))
    logits = out.logits                                                    # (B, T, V)
    weights = token_weights(cfg, batch)
    kd_loss = teacher_loss(logits, batch["teacher"], weights, kd)
    parts = {"kd": kd_loss.detach()}
    if cfg.teachers:          # other teachers' rows, joined by sample id (multi_teacher.TeacherJoin)
        each = [kd_loss] + [teacher_loss(logits, batch[f"teacher{j}"], weights * batch[f"teacher{j}_mask"], kd)
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
