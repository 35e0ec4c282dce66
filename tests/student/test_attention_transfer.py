"""Attention transfer in training (student-train --attention-transfer): the loader's attn_q / attn_k
batches equal the cache's rows, a student identical to the teacher has zero attention loss, the loss
trains a student's attention toward the teacher's, and bad pairs are refused naming the flag."""

import json

import numpy as np
import pytest
import torch

from logitcache import open_cache
from logitcache.format import LogitcacheError
from logitcache.teacher.capture import CaptureJob, run_capture
from student_train.config import TrainConfig
from student_train.data import CacheStream
from student_train.train import train

WORDS = "river stone light garden number seven quiet engine paper window market summer code list".split()


@pytest.fixture(scope="module")
def attn_cache(tmp_path_factory, tiny_teacher):
    d = tmp_path_factory.mktemp("attn-cache")
    rows = [" ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(6 + i % 9)) for i in range(24)]
    (d / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    run_capture(CaptureJob(cache=str(d / "c"), teacher=str(tiny_teacher), backend="hf", mode="score",
                           source=str(d / "t.jsonl"), encoding="topk", top_k=8, samples_per_shard=8,
                           attention_layers=[0, 1], hidden_dtype="float32", progress=False))
    return str(d / "c")


def config(cache, out, **kw) -> TrainConfig:
    base = dict(cache=cache, out=str(out), keep_layers="0,1", seq_len=32, batch_size=2, max_steps=1, lr=1e-9,
                warmup_steps=0, eval_frac=0.2, save_every=100, seed=0, attention_transfer=[[0, 0], [1, 1]])
    base.update(kw)
    return TrainConfig(**base)


def log_records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"eval"' not in x]


def test_the_loader_copies_the_caches_queries_and_keys(attn_cache):
    cache = open_cache(attn_cache)
    stream = CacheStream(cache, 32, 2, shuffle=False, attention_layers=[-1], rank=0, world_size=1)
    batch = next(iter(stream))
    q, k = batch["attn_q.1"], batch["attn_k.1"]
    assert q.shape == (2, 32, 4, 8) and k.shape == (2, 32, 2, 8)
    checked = 0
    for b in range(2):
        for doc in set(batch["document_ids"][b].tolist()) - {0}:
            cols = (batch["document_ids"][b] == doc).nonzero()[:, 0]
            pos = batch["position_ids"][b, cols]          # the sample's token positions (all samples, in order)
            a = cache.sample(cache.samples.column("sample_id")[int(batch["sample_index"][b, cols[0]])].as_py())
            np.testing.assert_array_equal(q[b, cols].numpy(), a["attn/1_q"][pos.numpy()])
            np.testing.assert_array_equal(k[b, cols].numpy(), a["attn/1_k"][pos.numpy()])
            checked += 1
    assert checked >= 2
    assert (q[batch["document_ids"] == 0] == 0).all()
    with pytest.raises(LogitcacheError, match="attention block 2 is not in the cache .* it holds blocks 0, 1"):
        CacheStream(cache, 32, 2, attention_layers=[2], rank=0, world_size=1)


def test_a_student_equal_to_the_teacher_has_no_attention_loss(attn_cache, tmp_path):
    train(config(attn_cache, tmp_path / "same"), progress=False)
    (rec,) = log_records(tmp_path / "same")
    assert rec["attention"] < 1e-5


def test_the_attention_loss_pulls_a_students_attention_toward_the_teachers(attn_cache, tmp_path, monkeypatch):
    # a student whose attention differs: the teacher with new, larger query projections
    from student_train import model as model_lib

    build = model_lib.build_student

    def scrambled(*a, **k):
        m, tok = build(*a, **k)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for block in m.model.layers:
                w = block.self_attn.q_proj.weight
                w.copy_(torch.randn(w.shape, generator=g) * 4 * w.std())
        return m, tok

    monkeypatch.setattr("student_train.train.build_student", scrambled)
    train(config(attn_cache, tmp_path / "r", max_steps=12, lr=3e-3, attention_transfer_weight=5.0, log_every=1),
          progress=False)
    recs = log_records(tmp_path / "r")
    assert recs[0]["attention"] > 1e-4 and recs[-1]["attention"] < 0.5 * recs[0]["attention"]


@pytest.mark.parametrize("kw, message", [
    (dict(attention_transfer=[[2, 0]]), "--attention-transfer 2:0: the student has decoder blocks 0..1"),
    (dict(attention_transfer=[[0, 5]]), "attention block 5 is not in the cache"),
    (dict(attention_relations=3), "--attention-relations 3: the teacher's 32 query numbers per token"),
])
def test_bad_attention_transfer_settings_are_refused(attn_cache, tmp_path, kw, message):
    with pytest.raises(LogitcacheError, match=message):
        train(config(attn_cache, tmp_path / "bad", **kw), progress=False)


def test_every_documented_student_train_and_capture_command_parses():
    """The examples in README, docs and the Makefile name real options with valid values (parsed, not run)."""
    from logitcache.cli.capture import capture
    from student_train.cli import cli
    from tests.student.test_rounds import documented_commands

    trains = documented_commands("student-train")
    captures = [c[1:] for c in documented_commands("logitcache capture")]
    assert any("--attention-transfer" in c for c in trains) and any("--attention-layers" in c for c in captures)
    for args in trains:
        cli.make_context("student-train", list(args))
    for args in captures:
        capture.make_context("capture", list(args))
