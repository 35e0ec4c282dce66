"""What a batch carries of the teacher: typed targets, one class per kind of distribution, so a loss
dispatches on the type (``objective.teacher_loss``) and never on which keys a batch happens to have.

- ``SparseTargets``: exact distributions over a few ids (topk, adaptive, compact, full): the loss is
  any divergence over the stored ids plus one tail bucket (``losses.distillation_loss``);
- ``EstimatedTargets``: unbiased estimates of p (sampled, hybrid): forward KL at T = 1 as CE_hat - H
  (``sampled_kd.estimated_forward_kl``);
- ``DenseTargets``: every value of the teacher's distribution (an ``--encoding full`` cache read with
  ``--full-targets``): any divergence exactly over the whole vocabulary (``losses.dense_distillation_loss``),
  the dense reference the other encodings are measured against.

Shapes follow the batch: (B, T, W) per id, (B, T) per position. They move like tensors (``to``,
``pin_memory``) and concatenate along the batch (``cat``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


class _Tensors:
    """``to`` / ``pin_memory`` / ``cat`` over a dataclass of tensors (None fields stay None)."""

    def _map(self, fn):
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                                for f in fields(self)})

    def to(self, *args, **kwargs):
        return self._map(lambda t: t.to(*args, **kwargs))

    def pin_memory(self):
        return self._map(lambda t: t.pin_memory())

    @classmethod
    def cat(cls, items: list) -> "_Tensors":
        first = items[0]
        return replace(first, **{f.name: (None if getattr(first, f.name) is None
                                          else torch.cat([getattr(x, f.name) for x in items]))
                                 for f in fields(first)})


@dataclass
class SparseTargets(_Tensors):
    """``ids`` (B, T, W) int64 in rank order, ``logprobs`` (B, T, W) float32 log-softmax at T=1 over the
    full vocabulary; after a row's entries -1 / -inf (ragged encodings) or, outside the loss positions
    of topk and full, 0 / 0. ``tail`` (B, T) float32: the exact mass outside the ids, or None (topk and
    full: 1 - sum exp(logprobs), derived by the loss)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor | None = None


@dataclass
class EstimatedTargets(_Tensors):
    """``ids`` (B, T, W) int64, -1 padding; ``targets`` (B, T, W) float32, unbiased estimates of the
    teacher's p on them, 0 in padding; ``entropy`` (B, T) float32, the exact teacher entropy (forward KL
    = CE_hat - H)."""

    ids: torch.Tensor
    targets: torch.Tensor
    entropy: torch.Tensor


@dataclass
class DenseTargets(_Tensors):
    """``logprobs`` (B, T, V) float32: the teacher's log-softmax at T=1 over the whole vocabulary (0
    outside the loss positions; renormalised by the loss, since stored values are rounded)."""

    logprobs: torch.Tensor




@dataclass
class CrossTokenizerTargets(_Tensors):
    """The teacher at the student positions aligned to it when the tokenizers differ
    (``cross_tokenizer.CrossTokenizer``). Over the student's vocabulary: ``ids`` (B, T, W) int64, the
    teacher's entries that have a student token, in rank order, then -1; ``logprobs`` (B, T, W) float32,
    theirs, then -inf; ``tail`` (B, T) float32 or None: the teacher mass outside them (None: 1 - sum, as
    for topk). Tokenizer-free: ``ranked_logprobs`` (B, T, W) float32, every stored teacher entry in rank
    order (-inf padding), ``ranked_tail`` (B, T) or None, for ULD. ``uld`` (B, T) bool: the positions
    trained by ULD; the others by the divergence over the mapped entries."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor | None
    ranked_logprobs: torch.Tensor
    ranked_tail: torch.Tensor | None
    uld: torch.Tensor


TeacherTargets = SparseTargets | EstimatedTargets | DenseTargets | CrossTokenizerTargets
