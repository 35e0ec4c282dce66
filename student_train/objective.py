"""The training objective of one micro-batch: the student's forward pass, the distillation loss its
teacher targets support, hard-label CE, other teachers, hidden-state losses.

Importable without the training loop (the transformers Trainer adapter uses ``forward`` and
``teacher_loss``). The loss is chosen by the type of the batch's teacher targets (``targets``):

    loss = ce_alpha * CE + (1 - ce_alpha) * KD + hidden_weight * feature loss
           + attention_transfer_weight * attention KL (``attention_loss``)

each a token-weighted mean over the micro-batch's loss tokens (``student_train.losses``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from logitcache.format.encodings import Encoding
from logitcache.format.errors import LogitcacheError

from . import losses, sampled_kd
from .attention import DENSE, Attention
from .config import POLICY_GRADIENT, TrainConfig
from .policy import policy_gradient_loss
from .targets import CrossTokenizerTargets, DenseTargets, EstimatedTargets, SparseTargets


def forward(model, batch: dict, need_hidden: bool, attention: Attention = DENSE):
    """The student on a packed batch: document-bounded causal attention, positions restarting per
    document, the documents kept apart as ``attention`` says (``attention.choose_attention``; the
    default, our dense block-causal mask, works with any model)."""
    return model(input_ids=batch["input_ids"], output_hidden_states=need_hidden, **attention.model_kwargs(batch))


def teacher_loss(logits: torch.Tensor, targets: SparseTargets | EstimatedTargets | DenseTargets,
                 weights: torch.Tensor, kd: losses.DistillationConfig | None = None) -> torch.Tensor:
    """The distillation loss the targets support: for ``SparseTargets`` the chosen divergence over the
    stored ids + tail bucket (with the exact tail where stored); for ``EstimatedTargets`` the unbiased
    forward-KL estimate; for ``DenseTargets`` the divergence over the whole vocabulary. logits (B, T, V); weights (B, T). ``kd`` None: forward KL, T = 1 (evaluation)."""
    targets = targets.to(logits.device)
    kw = kd.kd_kwargs() if kd is not None else {}
    if isinstance(targets, EstimatedTargets):
        if kd is not None and (kd.kind != "forward_kl" or kd.temperature != 1.0):
            raise LogitcacheError(f"sampled / hybrid targets train forward_kl at temperature 1 only, not {kd.kind} "
                                  f"at {kd.temperature}")
        return sampled_kd.estimated_forward_kl(logits, targets.ids, targets.targets, targets.entropy, weights,
                                               chunk_rows=kw.get("chunk_rows") or losses.DEFAULT_CHUNK_ROWS)
    if isinstance(targets, DenseTargets):
        return losses.dense_distillation_loss(logits, targets.logprobs, weights,
                                              **{k: v for k, v in kw.items() if k != "tail"})
    if isinstance(targets, SparseTargets):
        return losses.distillation_loss(logits, targets.ids, targets.logprobs, weights, teacher_tail=targets.tail,
                                        **kw)
    if isinstance(targets, CrossTokenizerTargets):
        return cross_tokenizer_loss(logits, targets, weights, kd)
    raise TypeError(f"teacher targets must be SparseTargets, EstimatedTargets or DenseTargets, got {type(targets).__name__}")


def cross_tokenizer_loss(logits: torch.Tensor, targets: CrossTokenizerTargets, weights: torch.Tensor,
                         kd: losses.DistillationConfig | None = None) -> torch.Tensor:
    """The loss of a student with another tokenizer: the chosen divergence over the mapped entries at
    the positions not marked ``uld``, ULD (``losses.uld_loss``) at those marked; one token-weighted mean
    over both (a position none of whose entries maps counts only where it is trained by ULD)."""
    kw = kd.kd_kwargs() if kd is not None else {}
    on_map = weights * (~targets.uld & (targets.ids >= 0).any(-1))
    on_uld = weights * targets.uld
    n_map, n_uld = on_map.sum(), on_uld.sum()
    total = n_map + n_uld
    if float(total) == 0:
        return logits.sum() * 0.0
    out = logits.new_zeros((), dtype=torch.float32)
    if float(n_map) > 0:
        out = out + losses.distillation_loss(logits, targets.ids, targets.logprobs, on_map, teacher_tail=targets.tail,
                                             **kw) * (n_map / total)
    if float(n_uld) > 0:
        out = out + losses.uld_loss(logits, targets.ranked_logprobs, on_uld, teacher_tail=targets.ranked_tail,
                                    chunk_rows=kw.get("chunk_rows", losses.DEFAULT_CHUNK_ROWS)) * (n_uld / total)
    return out


def check_loss_supported(cfg: TrainConfig, encoding: Encoding, where: str, arrays=()) -> None:
    """Estimated encodings (sampled, hybrid) hold estimates of p, not p: only forward KL at T = 1 is unbiased.
    The policy gradient needs the behaviour log-probs of a round cache (``arrays``: the cache's array specs by
    name). Token selection by entropy needs the teacher's entropy, which an imported cache does not have (its
    spec says ``exact: false``, every row NaN; format 1.6): no token would be selected."""
    from logitcache.format.arrays import ENTROPY

    selecting = [flag for flag, v in (("--entropy-above", cfg.entropy_above), ("--entropy-below", cfg.entropy_below),
                                      ("--entropy-top-frac", cfg.entropy_top_frac),
                                      ("--entropy-bottom-frac", cfg.entropy_bottom_frac),
                                      ("--token-select teacher-entropy", cfg.token_select == "teacher-entropy" or None))
                 if v is not None]
    spec = arrays.get(ENTROPY) if isinstance(arrays, dict) else None
    if selecting and spec is not None and not spec.exact:
        raise LogitcacheError(f"{selecting[0]}: {where} does not store the teacher's entropy (imported from another "
                              "tool's top-k: NaN on every row); select tokens by entropy on a captured cache")
    if cfg.loss == POLICY_GRADIENT:
        from logitcache.format.arrays import BEHAVIOUR_LOGPROB

        if BEHAVIOUR_LOGPROB not in arrays:
            raise LogitcacheError(f"--loss policy_gradient: {where} is not an on-policy round cache (it has no "
                                  f"{BEHAVIOUR_LOGPROB} array); make one with student-onpolicy, or use a divergence")
        return
    if encoding.estimated:
        if cfg.loss != "forward_kl" or cfg.temperature != 1.0:
            raise LogitcacheError(f"{where} is a {encoding.name} cache: it supports --loss forward_kl at --temperature "
                                  f"1 (an unbiased estimate), not --loss {cfg.loss} at temperature {cfg.temperature}; "
                                  "capture with --encoding compact or topk for other divergences")
        if cfg.teachers:
            raise LogitcacheError(f"{where} is a {encoding.name} cache: multi-teacher training needs topk caches")


def token_weights(cfg: TrainConfig, batch: dict, logits: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) 0/1 weights of the distilled positions: the loss mask, or the ``--token-select`` choice among
    its positions (``--top-frac`` of them per batch or per row by the student's entropy, from ``logits``
    (B, T, V) of the same forward pass; by the teacher's stored entropy; or at random), or the legacy
    teacher-entropy thresholds and fractions (``--entropy-*``)."""
    mask = batch["loss_mask"]
    if cfg.token_select == "student-entropy":
        if logits is None:
            raise ValueError("--token-select student-entropy needs the student's logits")
        return losses.top_fraction(losses.student_entropy(logits, mask), mask, cfg.top_frac, cfg.select_per)
    if cfg.token_select == "teacher-entropy":
        return losses.top_fraction(batch["teacher_entropy"], mask, cfg.top_frac, cfg.select_per)
    if cfg.token_select == "random":
        return losses.top_fraction(torch.rand(mask.shape, device=mask.device), mask, cfg.top_frac, cfg.select_per)
    if all(v is None for v in (cfg.entropy_above, cfg.entropy_below, cfg.entropy_top_frac, cfg.entropy_bottom_frac)):
        return mask.float()
    return losses.entropy_token_weights(batch["teacher_entropy"], mask, above=cfg.entropy_above,
                                        below=cfg.entropy_below, top_frac=cfg.entropy_top_frac,
                                        bottom_frac=cfg.entropy_bottom_frac)


def selected_share(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The share of the loss positions that are distilled (0-dim, for the training log)."""
    n = mask.sum()
    return (weights != 0).sum() / n.clamp_min(1)


def logits_loss(cfg: TrainConfig, kd: losses.DistillationConfig, logits: torch.Tensor, batch: dict,
                weights: torch.Tensor, extra: list) -> tuple[torch.Tensor, dict]:
    """Teacher loss(es) and CE on the student's (B, T, V) logits: the unfused objective."""
    if cfg.loss == POLICY_GRADIENT:
        discount, clip, baseline = cfg.policy_args()
        kd_loss, stats = policy_gradient_loss(logits, batch["labels"], batch["teacher_token_logprob"],
                                              batch["behaviour_logprob"], weights, batch["document_ids"],
                                              discount=discount, clip=clip, baseline=baseline,
                                              chunk_rows=kd.chunk_rows)
        parts = {"kd": kd_loss.detach(), **stats}
    else:
        kd_loss = teacher_loss(logits, batch["teacher"], weights, kd)
        parts = {"kd": kd_loss.detach()}
    if extra:                 # other teachers' rows, joined by sample id (multi_teacher.TeacherJoin)
        each = [kd_loss] + [teacher_loss(logits, t, w, kd) for t, w in extra]
        kd_loss = losses.combine_teacher_losses(each, cfg.teacher_weights or [1.0] * len(each))
        parts.update({f"kd_teacher{j}": v.detach() for j, v in enumerate(each)})
        parts["kd"] = kd_loss.detach()
    loss = kd_loss
    if cfg.ce_alpha > 0:
        ce = losses.hard_label_cross_entropy(logits, batch["labels"], chunk_rows=kd.chunk_rows)
        loss = losses.mix_ce_and_kd(ce, kd_loss, cfg.ce_alpha)
        parts["ce"] = ce.detach()
    return loss, parts


class LossHead(nn.Linear):
    """The student's LM head while the fused loss is on (``install_loss_head``): the same ``nn.Linear``
    (same parameters, names and ties), whose forward, while ``computing`` holds an objective, hands the
    hidden states it receives (B, T, H) to it (``linear_loss.linear_teacher_loss``: the head and the loss
    chunk by chunk, never the (B, T, V) logits) and returns empty logits (B, T, 0). The loss is computed
    inside the model's own forward, where FSDP has the head's weight gathered; outside ``computing`` it
    is a plain linear layer (evaluation, generation, saving)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        objective = self.__dict__.get("_objective")
        if objective is None:
            return super().forward(hidden)
        self.__dict__["_result"] = objective(hidden, self.weight, self.bias)
        return hidden.new_zeros(*hidden.shape[:-1], 0)

    @contextlib.contextmanager
    def computing(self, objective):
        """Within: the head's forward computes ``objective(hidden, weight, bias)``; ``result`` holds it after."""
        self.__dict__["_objective"], self.__dict__["_result"] = objective, None
        try:
            yield self
        finally:
            self.__dict__["_objective"] = None

    @property
    def result(self):
        if self.__dict__.get("_result") is None:
            raise RuntimeError("the model's forward did not call its LM head on the hidden states (logits_to_keep?)")
        return self.__dict__["_result"]


def install_loss_head(model) -> tuple[LossHead | None, str]:
    """Turn the model's output embeddings into a ``LossHead`` in place when ``linear_loss.supports_fused_head``
    allows it: (head, "") or (None, why not). Call before wrapping the model (DDP, FSDP)."""
    from .linear_loss import supports_fused_head

    ok, why = supports_fused_head(model)
    if not ok:
        return None, why
    head = model.get_output_embeddings()
    head.__class__ = LossHead
    return head, ""


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_loss_head(model, mode: str, logits_bytes: int, device: torch.device) -> tuple[LossHead | None, str]:
    """``--fused-loss``: ``on`` installs the ``LossHead`` (refused, naming why, when the head does not allow
    it), ``off`` does not, ``auto`` does when a micro-batch's float32 logits (``logits_bytes`` = B*T*V*4)
    would take more than a quarter of the device's memory: there memory decides, below that the
    unfused path is the faster one on a GPU (docs/training.md). Returns (head or None, why not)."""
    if mode == "off":
        return None, "--fused-loss off"
    if mode == "auto":
        budget = device_memory_bytes(device) // 4
        if logits_bytes <= budget:
            return None, (f"auto: a micro-batch's logits take {logits_bytes / 2**30:.2f} GiB, under a quarter of the "
                          f"device's {4 * budget / 2**30:.0f} GiB (unfused is faster there)")
    head, why = install_loss_head(model)
    if head is None and mode == "on":
        raise LogitcacheError(f"--fused-loss on: {why}")
    return head, why


def compute_loss(cfg: TrainConfig, kd: losses.DistillationConfig, model, batch: dict, projector,
                 hidden_names: list[str], attention: Attention = DENSE,
                 head: LossHead | None = None, transfer=None) -> tuple[torch.Tensor, dict]:
    """The micro-batch loss and its parts (detached, for the log). With ``head`` (``install_loss_head``)
    the LM head and the teacher and CE losses run fused, chunk by chunk (same value and gradients);
    with ``transfer`` (``attention_loss.AttentionTransfer``) + attention_transfer_weight x its loss."""
    after_forward = cfg.token_select == "student-entropy"        # needs this pass's logits
    weights = None if after_forward else token_weights(cfg, batch)

    def extra_of(w):
        return [(batch[f"teacher{j}"], w * batch[f"teacher{j}_mask"]) for j in range(1, len(cfg.teachers) + 1)]

    extra = None if after_forward else extra_of(weights)
    if head is not None:
        if after_forward:
            raise LogitcacheError("--token-select student-entropy needs the student's logits: use --fused-loss off")
        from .linear_loss import linear_teacher_loss

        def objective(hidden, weight, bias):
            return linear_teacher_loss(hidden, weight, bias, batch["teacher"], weights, kd,
                                       labels=batch["labels"] if cfg.ce_alpha > 0 else None, ce_alpha=cfg.ce_alpha,
                                       extra_teachers=extra, teacher_weights=cfg.teacher_weights or None,
                                       chunk_rows=None)

        with head.computing(objective):
            out = forward(model, batch, bool(hidden_names), attention)
        loss, parts = head.result
        parts = dict(parts)
    else:
        out = forward(model, batch, bool(hidden_names), attention)
        if after_forward:
            weights = token_weights(cfg, batch, out.logits)
            extra = extra_of(weights)
        loss, parts = logits_loss(cfg, kd, out.logits, batch, weights, extra)
    if cfg.token_select != "all":
        parts["selected_share"] = selected_share(weights, batch["loss_mask"])
    if hidden_names:
        real = batch["document_ids"] != 0
        feat = sum(losses.hidden_state_loss(out.hidden_states[s], batch[name], real, kind=cfg.hidden_loss,
                                            projector=projector, pair=i)
                   for i, ((s, _), name) in enumerate(zip(cfg.layer_map, hidden_names)))
        loss = loss + cfg.hidden_weight * feat
        parts["hidden"] = feat.detach()
    if transfer is not None:
        att = transfer.loss(batch)
        loss = loss + cfg.attention_transfer_weight * att
        parts["attention"] = att.detach()
    parts["loss"] = loss.detach()
    return loss, parts
