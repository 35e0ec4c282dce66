"""For people who live in the transformers ``Trainer``: a cache as its dataset and our loss as its loss.

    stream = CacheStream("./cache", seq_len=512, batch_size=1)           # one row per item
    trainer = DistillationTrainer(model=student, args=TrainingArguments(..., per_device_train_batch_size=8),
                                  train_dataset=stream, distillation=DistillationConfig(kind="forward_kl"))
    trainer.train()

Trainer batches ``per_device_train_batch_size`` items of the stream with ``distillation_collator``.
Under several processes (torchrun, accelerate launch) the stream splits the data itself: each rank
gets its own rows, the same number on every rank, every sample exactly once (the stream takes its
rank and world size from the process group, or from ``RANK``/``WORLD_SIZE``). ``DistillationTrainer``
therefore hands the stream to a plain DataLoader instead of letting accelerate shard it a second
time (which kept each rank's half of its half: half the data, silently), and refuses a stream whose
rank or world size is not the Trainer's. Our own loop (``student_train.train``) adds exact resume
of the data position, held-out evaluation against the teacher and feature distillation; this adapter
imports the objective only (``student_train.objective``), not the loop.

Packed documents are kept apart as ``attention`` says (``student_train.attention``; ``auto``: probed
on the model when the Trainer is made, before accelerate wraps it). The loss works on the logits
(the fused LM head + loss of our loop is not used here).

FSDP and DeepSpeed come from the Trainer's own settings, through accelerate; nothing else is needed:

    TrainingArguments(..., fsdp="full_shard", fsdp_config={"version": 2,
                      "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})    # FSDP2
    TrainingArguments(..., deepspeed="ds_zero3.json")                             # DeepSpeed ZeRO

with ``remove_unused_columns=False`` (set by ``DistillationTrainer``: the teacher tensors are not
arguments of ``model.forward``) and ``dataloader_drop_last`` irrelevant (the stream gives every rank
the same number of rows). accelerate (1.15) applies FSDP on accelerators only: on the CPU the
``fsdp`` setting is ignored (it warns here) and the processes run as DDP, which is what the
2-process CPU test checks; DeepSpeed is not installed here, so it is not tested.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from logitcache.format.errors import LogitcacheError

from . import losses
from .attention import choose_attention
from .data import CacheStream, concat_batches
from .objective import forward, teacher_loss

log = logging.getLogger(__name__)


def distillation_collator(items: list[dict]) -> dict:
    """Items of a ``CacheStream`` (each a [1, T, ...] batch) -> one [B, T, ...] batch."""
    return concat_batches(items)


class _StreamLoader(DataLoader):
    """A DataLoader over a CacheStream that forwards ``set_epoch`` (Trainer calls it every epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is ``ce_alpha * CE + (1 - ce_alpha) * KD`` from the cached teacher."""

    def __init__(self, *args, distillation: losses.DistillationConfig | None = None, attention: str = "auto",
                 **kwargs):
        kwargs.setdefault("data_collator", distillation_collator)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:      # the teacher tensors are not arguments of model.forward
            training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        self.distillation = distillation or losses.DistillationConfig()
        if self.args.fsdp and not getattr(self, "is_fsdp_enabled", False):
            log.warning("TrainingArguments(fsdp=%r) is ignored by accelerate on this device (%s): it shards with FSDP "
                        "on accelerators only; the student is replicated on every process instead",
                        self.args.fsdp, self.accelerator.state.distributed_type)
        device = next(self.model.parameters()).device          # not wrapped yet: accelerate does it in train()
        amp = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        self.attention = choose_attention(self.model, attention, device, amp)

    def get_train_dataloader(self) -> DataLoader:
        stream = self.train_dataset
        if not isinstance(stream, CacheStream):
            return super().get_train_dataloader()
        if (stream.rank, stream.world_size) != (self.args.process_index, self.args.world_size):
            raise LogitcacheError(
                f"the CacheStream is rank {stream.rank} of {stream.world_size}, the Trainer's process is rank "
                f"{self.args.process_index} of {self.args.world_size}: create the stream after TrainingArguments "
                "(or give it rank= and world_size=), so that each rank reads its own samples once")
        return _StreamLoader(stream, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                             num_workers=self.args.dataloader_num_workers,
                             pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        d = self.distillation
        outputs = forward(model, inputs, False, self.attention)
        loss = teacher_loss(outputs.logits, inputs["teacher"], inputs["loss_mask"], d)   # any encoding of the cache
        if d.ce_alpha > 0:
            ce = losses.hard_label_cross_entropy(outputs.logits, inputs["labels"], chunk_rows=d.chunk_rows)
            loss = losses.mix_ce_and_kd(ce, loss, d.ce_alpha)
        return (loss, outputs) if return_outputs else loss
