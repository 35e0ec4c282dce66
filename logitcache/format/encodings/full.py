"""``full``: every log-prob of the vocabulary, for small evaluation sets (exact KL in training reports).

Arrays: ``topk_ids`` / ``topk_logprobs`` as ``topk`` (so a loss can train on it like a topk cache),
plus ``dist/full_logprobs`` (token, row shape (V,), float16/32, dimension ``vocab``): the whole
next-token distribution. A shard holds its rows in memory (V values per token): at most 64 samples per
shard, 8 by default; the hf backend captures it 1024 tokens per forward pass at most.
"""

from __future__ import annotations

from ..specs import FULL_LOGPROBS, ArraySpec
from .base import ExtraSpec, register
from .topk import TopK, topk_specs


@register
class Full(TopK):
    name = "full"
    needs_full_distribution = True
    default_samples_per_shard = 8
    max_samples_per_shard = 64
    max_device_batch_tokens = 1024
    max_generate_batch = 8
    summary = "every value (small evaluation sets: exact KL in training reports)"

    def specs(self, vocab_size: int, logprob_dtype: str, top_k: int) -> list[ArraySpec]:
        return topk_specs(vocab_size, logprob_dtype, top_k) + [
            ArraySpec(FULL_LOGPROBS, logprob_dtype, logprob_dtype, (vocab_size,), float("nan"),
                      logprob_dtype == "float32",
                      "log-softmax (T=1) of every id of the vocabulary: the whole next-token distribution")]

    def extras(self, top_k: int, vocab_size: int) -> list[ExtraSpec]:
        return [ExtraSpec("all_logprobs", (vocab_size,), "float32", float("nan"), "every_value")]

    def encode_rows(self, top_k, vocab_size, cand_ids, cand_logprobs, extras, scored, value_dtype="float16"):
        out = super().encode_rows(top_k, vocab_size, cand_ids, cand_logprobs, extras, scored, value_dtype)
        out[FULL_LOGPROBS] = extras["all_logprobs"].astype(value_dtype)
        return out
