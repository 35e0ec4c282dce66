"""For people who live in the transformers ``Trainer``: a cache as its dataset and our loss as its loss.

    stream = CacheStream("./cache", seq_len=512, batch_size=1)           # one row per item
    trainer = DistillationTrainer(model=student, args=TrainingArguments(..., per_device_train_batch_size=8),
                                  train_dataset=stream, data_collator=distillation_collator,
                                  distillation=DistillationConfig(kind="forward_kl"))
    trainer.train()

Trainer batches ``per_device_train_batch_size`` items of the stream with ``distillation_collator``.
Under several processes give the stream its ``rank``/``world_size`` (it splits the data itself) and
keep Trainer from splitting it again (``accelerator_config={"dispatch_batches": False,
"split_batches": False}``). Our own loop (``student_train.train``) adds exact resume of the data
position, held-out evaluation against the teacher and feature distillation.
"""

from __future__ import annotations

from transformers import Trainer

from . import losses
from .data import concat_batches
from .train import forward, teacher_loss


def distillation_collator(items: list[dict]) -> dict:
    """Items of a ``CacheStream`` (each a [1, T, ...] batch) -> one [B, T, ...] batch."""
    return concat_batches(items)


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is ``ce_alpha * CE + (1 - ce_alpha) * KD`` from the cached teacher."""

    def __init__(self, *args, distillation: losses.DistillationConfig | None = None, **kwargs):
        kwargs.setdefault("data_collator", distillation_collator)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:      # the teacher tensors are not arguments of model.forward
            training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        self.distillation = distillation or losses.DistillationConfig()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        d = self.distillation
        outputs = forward(model, inputs, False)
        loss = teacher_loss(outputs.logits, inputs, inputs["loss_mask"], d)     # any encoding of the cache
        if d.ce_alpha > 0:
            ce = losses.hard_label_cross_entropy(outputs.logits, inputs["labels"], chunk_rows=d.chunk_rows)
            loss = losses.mix_ce_and_kd(ce, loss, d.ce_alpha)
        return (loss, outputs) if return_outputs else loss
