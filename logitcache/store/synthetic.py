"""Synthetic caches for tests and benchmarks: the manifest around shards whose arrays and samples the
caller made and wrote with the real shard writer (``shard_writer.write_shard``), so that a reader, a
loader or a query sees a cache like any captured one, of a teacher that does not exist."""

from __future__ import annotations

from ..format.manifest import CaptureConfig, InputSpec, Manifest, ShardRecord, TeacherInfo, TokenizerInfo
from ..format.specs import ArraySpec
from . import codecs


def synthetic_manifest(key: str, specs: list[ArraySpec], records: list[ShardRecord], *, vocab: int, hidden: int,
                       top_k: int, layers: list[int], created_by: str, encoding: dict | None = None,
                       num_layers: int = 30, max_length: int = 8192, samples_per_shard: int = 256,
                       with_prompt: bool = False) -> Manifest:
    """A complete manifest of a generate-mode capture by the teacher "synthetic" (``vocab`` ids, ``hidden``
    wide, ``num_layers`` layers) whose input ``key`` has the shards ``records`` in that order.
    ``encoding``: the capture's encoding dict (None: the legacy topk of caches before 1.2)."""
    extra = {} if encoding is None else {"encoding": encoding}
    return Manifest(
        teacher=TeacherInfo("synthetic", "synthetic", "", "sha256-edges:synthetic", "LlamaForCausalLM", num_layers,
                            hidden, vocab, max_length, "bfloat16", "hf"),
        tokenizer=TokenizerInfo(vocab, "0" * 64, 1, [2], 2, ""),
        capture=CaptureConfig(mode="generate", top_k=top_k, logprob_dtype="float16", with_prompt=with_prompt,
                              hidden_layers=layers, hidden_dtype="bfloat16", max_length=max_length, truncate=False,
                              samples_per_shard=samples_per_shard, max_new_tokens=2048, **extra),
        arrays=specs, codecs=codecs.describe(specs),
        inputs=[InputSpec(key, "synthetic.jsonl", "synthetic.jsonl", "", {"prompt": "prompt"}, None,
                          samples_per_shard * len(records), len(records))],
        shards=records, complete=True, created_by=created_by)
