"""Fixtures of the student tests: a full-encoding cache of the tiny teacher and other tiny models with
its tokenizer (the fidelity and evaluation-report tests share them)."""

from __future__ import annotations

import json

import pytest
import torch

from logitcache.teacher.capture import CaptureJob, run_capture
from tests.conftest import copy_tokenizer

WORDS = "river stone light garden number seven quiet engine paper window market summer".split()


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, tiny_teacher) -> str:
    d = tmp_path_factory.mktemp("fidelity")
    src = d / "texts.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(4 + i % 9))})
                           + "\n" for i in range(7)))
    run_capture(CaptureJob(encoding="full", cache=str(d / "c"), teacher=str(tiny_teacher), backend="hf", mode="score",
                           source=str(src), samples_per_shard=3, logprob_dtype="float32", progress=False))
    return str(d / "c")


def other_model(path, tokenizer_dir, seed: int = 1, vocab: int = 49152):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(20)
    m.save_pretrained(path)
    copy_tokenizer(tokenizer_dir, path)
    return path
