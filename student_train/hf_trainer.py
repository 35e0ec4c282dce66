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
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from logitcache.format.errors import LogitcacheError

from . import losses
from .data import CacheStream, concat_batches
from .objective import forward, teacher_loss


def distillation_collator(items: list[dict]) -> dict:
    """Items of a ``CacheStream`` (each a [1, T, ...] batch) -> one [B, T, ...] batch."""
    return concat_batches(items)


class _StreamLoader(DataLoader):
    """A DataLoader over a CacheStream that forwards ``set_epoch`` (Trainer calls it every epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is ``ce_alpha * CE + (1 - ce_alpha) * KD`` from the cached teacher."""

    def __init__(self, *args, distillation: losses.DistillationConfig | None = None, **kwargs):
        kwargs.setdefault("data_collator", distillation_collator)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:      # the teacher tensors are not arguments of model.forward
            training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        self.distillation = distillation or losses.DistillationConfig()

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
        outputs = forward(model, inputs, False)
        loss = teacher_loss(outputs.logits, inputs["teacher"], inputs["loss_mask"], d)   # any encoding of the cache
        if d.ce_alpha > 0:
            ce = losses.hard_label_cross_entropy(outputs.logits, inputs["labels"], chunk_rows=d.chunk_rows)
            loss = losses.mix_ce_and_kd(ce, loss, d.ce_alpha)
        return (loss, outputs) if return_outputs else loss
