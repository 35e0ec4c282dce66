"""The capture job on a tiny random Llama (SmolLM2's tokenizer): seeded sampling, resume after a kill,
workers + finalize, inputs of every kind, and every bad input. The stored numbers against a direct
full-vocabulary computation are the backend conformance class (backend_conformance.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from logitcache import open_cache
from logitcache.format import ConfigMismatchError, InputError, LogitcacheError, sample_id
from logitcache.teacher.capture import CaptureJob, run_capture
from tests.conftest import assert_caches_equal


def job(cache, teacher, **kw) -> CaptureJob:
    base = dict(cache=str(cache), teacher=str(teacher), progress=False, encoding="topk", top_k=8, samples_per_shard=3, backend="hf")
    base.update(kw)
    return CaptureJob(**base)


def test_sampling_is_seeded_per_shard_and_follows_the_distribution(tmp_path, tiny_teacher):
    from logitcache.teacher.hf_backend import sample_next

    # the tiny model is very peaked: a high temperature makes the draws differ
    kw = dict(limit=4, max_new_tokens=6, temperature=8.0, top_p=0.99, num_samples=2, samples_per_shard=2)
    run_capture(job(tmp_path / "a", tiny_teacher, **kw))
    run_capture(job(tmp_path / "b", tiny_teacher, **kw))
    a, b = open_cache(str(tmp_path / "a")), open_cache(str(tmp_path / "b"))
    assert_caches_equal(a, b)                                  # same seed: same samples
    responses = a.samples.column("response").to_pylist()
    assert len(set(responses)) > len(responses) // 2           # but the draws differ from each other
    run_capture(job(tmp_path / "c", tiny_teacher, **{**kw, "seed": 1}))
    assert open_cache(str(tmp_path / "c")).samples.column("response").to_pylist() != responses

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample_next(logits, 1.0, 1.0, g), minlength=4) / 40000
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)
    nucleus = torch.bincount(sample_next(logits, 1.0, 0.75, g), minlength=4) / 40000   # keeps {0.5, 0.3}
    torch.testing.assert_close(nucleus, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01, rtol=0)
    hot = torch.bincount(sample_next(logits, 0.5, 1.0, g), minlength=4) / 40000       # p^2, renormalised
    torch.testing.assert_close(hot, probs[0] ** 2 / (probs[0] ** 2).sum(), atol=0.01, rtol=0)
    assert sample_next(logits[:3], 0.0, 1.0, g).tolist() == [0, 0, 0]


def test_killed_capture_resumes_to_the_same_cache(tmp_path, tiny_teacher, text_file):
    ref = tmp_path / "ref"
    run_capture(job(ref, tiny_teacher, mode="score", source=str(text_file)))
    names = [s.name for s in open_cache(str(ref)).shards]
    assert len(names) == 3
    code = ("from logitcache.teacher.capture import CaptureJob, run_capture\n"
            f"run_capture(CaptureJob(cache={str(tmp_path / 'c')!r}, teacher={str(tiny_teacher)!r}, progress=False, "
            f"encoding='topk', top_k=8, samples_per_shard=3, mode='score', backend='hf', source={str(text_file)!r}))\n")
    env = {**os.environ, "LOGITCACHE_FAULT": f"kill-before-publish:{names[1]}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "c" / "manifest.json").exists()
    partial = open_cache(str(tmp_path / "c"), allow_partial=True)
    assert [s.name for s in partial.shards] == [names[0]] and not partial.manifest.complete
    summary = run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(text_file)))
    assert (summary.shards_written, summary.shards_already_committed, summary.complete) == (2, 1, True)
    assert not list((tmp_path / "c" / "_tmp").iterdir())
    a, b = open_cache(str(ref), verify=True), open_cache(str(tmp_path / "c"), verify=True)
    assert_caches_equal(a, b)
    assert [s.checksum for s in a.shards] == [s.checksum for s in b.shards]
    again = run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(text_file)))
    assert again.shards_written == 0 and again.shards_already_committed == 3


def test_two_workers_then_finalize_equal_one_worker(tmp_path, tiny_teacher, text_file):
    run_capture(job(tmp_path / "one", tiny_teacher, mode="score", source=str(text_file)))
    first = run_capture(job(tmp_path / "two", tiny_teacher, mode="score", source=str(text_file),
                            num_workers=2, worker_index=1))
    assert not first.complete and not (tmp_path / "two" / "manifest.json").exists()
    last = run_capture(job(tmp_path / "two", tiny_teacher, mode="score", source=str(text_file),
                           num_workers=2, worker_index=0))
    assert last.complete and last.shards_written == 2
    one, two = open_cache(str(tmp_path / "one")), open_cache(str(tmp_path / "two"), verify=True)
    assert_caches_equal(one, two)
    assert sorted(s.worker for s in two.shards) == [0, 0, 1]


def test_bad_inputs_give_clear_errors(tmp_path, tiny_teacher, text_file):
    with pytest.raises(InputError, match=r"texts.jsonl: no column 'body' \(given as --text-column\); columns: text, id"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(text_file), text_column="body"))
    with pytest.raises(InputError, match=r"generate mode needs --prompt-column or --messages-column .*columns: text, id"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="generate", source=str(text_file)))
    with pytest.raises(InputError, match=r"missing.jsonl: no such file"):
        run_capture(job(tmp_path / "c", tiny_teacher, source=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(InputError, match=r"bad.jsonl, row 1: column 'text' holds int where row 0 holds str"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(bad)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(InputError, match=r"broken.jsonl, line 2: not valid JSON"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(broken)))
    with pytest.raises(LogitcacheError, match=r"--hidden-layers: layer 7 is out of range for a teacher with 2 layers"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(text_file), hidden_layers=[7]))
    with pytest.raises(LogitcacheError, match=r"--num-samples: 2 samples of greedy decoding would be identical"):
        run_capture(job(tmp_path / "c", tiny_teacher, num_samples=2))
    with pytest.raises(LogitcacheError, match=r"--max-length 4096 exceeds the teacher's context of 256 tokens"):
        run_capture(job(tmp_path / "c", tiny_teacher, max_length=4096))
    assert not (tmp_path / "c").exists()


def test_engine_args_that_decide_the_stored_numbers_are_refused(tmp_path, tiny_teacher, text_file):
    score = dict(mode="score", source=str(text_file), backend="vllm")
    with pytest.raises(LogitcacheError, match=r"--engine-arg logprobs_mode: logitcache sets this itself \(raw log-probs "
                                              r"at T=1 are what the cache stores\); leave it out"):
        run_capture(job(tmp_path / "c", tiny_teacher, engine_args={"logprobs_mode": "processed_logprobs"}, **score))
    with pytest.raises(LogitcacheError, match=r"--engine-arg max_model_len: logitcache sets this itself \(from "
                                              r"--max-length\)"):
        run_capture(job(tmp_path / "c", tiny_teacher, engine_args={"max_model_len": 64}, **score))
    with pytest.raises(LogitcacheError, match=r"--engine-arg speculative_config: .*\(for --hidden-layers\)"):
        run_capture(job(tmp_path / "c", tiny_teacher, engine_args={"speculative_config": {}}, hidden_layers=[-1],
                        **score))
    assert not (tmp_path / "c").exists()


def test_a_teacher_that_fails_to_load_pins_no_settings(tmp_path, tiny_teacher, text_file, monkeypatch):
    from logitcache.teacher import capture

    def fail(*args):
        raise LogitcacheError("out of memory")

    monkeypatch.setattr(capture, "_make_backend", fail)
    with pytest.raises(LogitcacheError, match="out of memory"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(text_file)))
    monkeypatch.undo()
    assert not (tmp_path / "c" / "parts").exists()
    run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(text_file), top_k=4))  # other settings
    assert open_cache(str(tmp_path / "c")).manifest.capture.top_k == 4


def test_empty_and_overlong_rows_are_skipped_and_recorded(tmp_path, tiny_teacher):
    src = tmp_path / "rows.jsonl"
    long_text = "word " * 400
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["hello there", "", "   ", long_text, "bye"]))
    run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(src)))
    cache = open_cache(str(tmp_path / "c"))
    assert cache.samples.column("row").to_pylist() == [0, 4]
    reasons = {s.row: s.reason for s in cache.manifest.skipped}
    assert reasons[1] == reasons[2] == "empty text"
    assert reasons[3].startswith("longer than the context (401 > 256 tokens)")
    run_capture(job(tmp_path / "t", tiny_teacher, mode="score", source=str(src), truncate=True))
    t = open_cache(str(tmp_path / "t"))
    rec = t.samples.to_pylist()[1]
    assert (rec["row"], rec["num_tokens"], rec["finish_reason"]) == (3, 256, "truncated")
    assert sorted(s.row for s in t.manifest.skipped) == [1, 2]


def test_appending_with_another_teacher_or_settings_is_refused(tmp_path, tiny_teacher, smollm2_dir, text_file):
    run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(text_file), limit=3))
    with pytest.raises(ConfigMismatchError, match=r"was written with capture.top_k = 8, but this run has 4"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(text_file), limit=3, top_k=4))
    with pytest.raises(ConfigMismatchError, match=r"was written with teacher.fingerprint = 'sha256-edges:\w+', but this run has 'sha256-edges:"):
        run_capture(job(tmp_path / "c", smollm2_dir, mode="score", source=str(text_file), limit=3))
    with pytest.raises(ConfigMismatchError, match=r"already holds 'texts.jsonl'.*limit 3.*limit 5.*same rows would appear twice"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(text_file), limit=5))
    # a different input with the same settings appends: new shards, one cache
    other = tmp_path / "more.jsonl"
    other.write_text(json.dumps({"text": "another document"}) + "\n")
    run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(other)))
    cache = open_cache(str(tmp_path / "c"), verify=True)
    assert cache.samples.column("source").to_pylist() == ["texts.jsonl"] * 3 + ["more.jsonl"]
    assert len(cache.manifest.inputs) == 2


def test_inputs_from_parquet_csv_and_a_saved_dataset_give_the_same_samples(tmp_path, tiny_teacher, text_file):
    import datasets
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from logitcache.teacher.inputs import load_input

    table = load_input(str(text_file), "train", {"text": None}, "score").table
    pq.write_table(table, tmp_path / "texts.parquet")
    pcsv.write_csv(table, tmp_path / "texts.csv")
    datasets.DatasetDict({"validation": datasets.Dataset(table)}).save_to_disk(str(tmp_path / "texts_ds"))
    results = {}
    for source, split in [(text_file, "train"), (tmp_path / "texts.parquet", "train"), (tmp_path / "texts.csv", "train"),
                          (tmp_path / "texts_ds", "validation")]:
        run_capture(job(tmp_path / source.name.replace(".", "_"), tiny_teacher, mode="score", source=str(source),
                        split=split, source_name="texts"))
        c = open_cache(str(tmp_path / source.name.replace(".", "_")))
        results[source.name] = c.samples.select(["sample_id", "num_tokens", "response", "mean_entropy"]).to_pylist()
    first = results.pop(text_file.name)
    assert len(first) == 8
    for name, rows in results.items():
        if name == "texts_ds":  # the split is part of a sample's identity: same data, other ids
            assert [r["sample_id"] for r in rows] == [sample_id("texts", "validation", i, 0) for i in range(8)]
            rows = [{**r, "sample_id": f["sample_id"]} for r, f in zip(rows, first)]
        assert rows == first, name
    with pytest.raises(InputError, match=r"texts_ds'?: no split 'test'; splits: validation"):
        load_input(str(tmp_path / "texts_ds"), "test", {"text": None}, "score")


def test_chat_messages_and_prompt_response_pairs_in_score_mode(tmp_path, tiny_teacher):
    rows = [{"prompt": "Say hi.", "response": "Hi!",
             "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}]
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps(rows[0]) + "\n")
    run_capture(job(tmp_path / "a", tiny_teacher, mode="score", source=str(src), prompt_column="prompt",
                    response_column="response"))
    run_capture(job(tmp_path / "b", tiny_teacher, mode="score", source=str(src), messages_column="messages"))
    a, b = open_cache(str(tmp_path / "a")), open_cache(str(tmp_path / "b"))
    ra, rb = a.samples.to_pylist()[0], b.samples.to_pylist()[0]
    np.testing.assert_array_equal(a.sample(0)["tokens"], b.sample(0)["tokens"])
    assert ra["scored_start"] == ra["prompt_tokens"] - 1 and ra["response"] == "Hi!"
    assert ra["response_tokens"] == rb["response_tokens"] == 4  # "Hi", "!", <|im_end|>, "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl, row 0: score mode needs the conversation to end with an assistant"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(bad)))


def test_capture_into_an_fsspec_url(tiny_teacher, text_file):
    url = "memory://capture-test/cache"
    run_capture(job(url, tiny_teacher, mode="score", source=str(text_file)))
    cache = open_cache(url, verify=True)
    assert cache.manifest.complete and cache.manifest.num_samples == 8
    import fsspec

    assert not fsspec.filesystem("memory").exists("/capture-test/cache/_tmp/" + cache.shards[0].name)


def test_hub_teacher_offline_gives_a_clear_error(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LogitcacheError, match=r"teacher 'someorg/not-cached-model': could not get it from the Hugging Face hub"):
        run_capture(job(tmp_path / "c", "someorg/not-cached-model", mode="score", source=str(text_file)))


def test_unknown_logit_postprocessing_is_refused(tiny_teacher, monkeypatch):
    from transformers import LlamaForCausalLM

    from logitcache.teacher.hf_backend import HFBackend
    from logitcache.teacher.identity import resolve_teacher

    original = LlamaForCausalLM.forward

    def doubled(self, *args, **kwargs):  # an architecture that scales its logits after the LM head
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 2
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", doubled)
    with pytest.raises(LogitcacheError, match=r"logits recomputed from the last hidden state differ from the model's own"):
        HFBackend(resolve_teacher(str(tiny_teacher)))


# ---- issue 12: inputs identified by their content, rows checked before anything is captured ----------

def test_a_changed_input_with_the_same_name_is_refused_not_skipped(tmp_path, tiny_teacher, text_file):
    v1, v2 = tmp_path / "v1" / "data.jsonl", tmp_path / "v2" / "data.jsonl"
    v1.parent.mkdir()
    v2.parent.mkdir()
    v1.write_text(text_file.read_text())
    v2.write_text("".join(json.dumps({"text": f"another text number {i}"}) + "\n" for i in range(8)))
    run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(v1)))
    with pytest.raises(ConfigMismatchError, match=r"holds input 'data.jsonl' .* captured from other rows .* it changed "
                                                  r"since; .* --source-name NAME"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(v2)))
    # the explicit way to add it: another source name, its own sample ids
    run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(v2), source_name="data-v2.jsonl"))
    c = open_cache(str(tmp_path / "c"), verify=True)
    assert c.manifest.num_samples == 16 and all(i.content.startswith("sha256:") for i in c.manifest.inputs)
    assert set(c.samples.column("response").to_pylist()) >= {f"another text number {i}" for i in range(8)}


def test_an_input_edited_between_a_crash_and_the_resume_is_refused(tmp_path, tiny_teacher, text_file):
    data = tmp_path / "data.jsonl"
    data.write_text(text_file.read_text())
    code = ("from logitcache.teacher.capture import CaptureJob, run_capture\n"
            f"run_capture(CaptureJob(cache={str(tmp_path / 'c')!r}, teacher={str(tiny_teacher)!r}, progress=False, "
            f"encoding='topk', top_k=8, samples_per_shard=3, mode='score', backend='hf', source={str(data)!r}))\n")
    ref = run_capture(job(tmp_path / "ref", tiny_teacher, mode="score", source=str(data)))
    name = open_cache(str(tmp_path / "ref")).shards[1].name
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "LOGITCACHE_FAULT": f"kill-before-publish:{name}"})
    assert proc.returncode == -9 and ref.complete
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:5] + [json.dumps({"text": "an edited row"})] + lines[6:]) + "\n")
    with pytest.raises(ConfigMismatchError, match="captured from other rows"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(data)))
    assert len(open_cache(str(tmp_path / "c"), allow_partial=True).shards) == 1     # nothing was added


def test_rows_are_checked_before_the_first_shard_and_u2028_is_text(tmp_path, tiny_teacher):
    chats = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [good] * 8 + [{"messages": [{"role": "user", "content": "no answer"}]}] + [good]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"chats.jsonl, row 8: score mode needs the conversation to end with an "
                                         r"assistant message"):
        run_capture(job(tmp_path / "c", tiny_teacher, mode="score", source=str(chats), samples_per_shard=2))
    assert not (tmp_path / "c").exists()                        # no shard of the first 8 rows was captured
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"text": "a line\u2028separator and a paragraph\u2029separator inside a string"}\n'
                   '{"text": "next\u0085row"}\n', encoding="utf-8")
    run_capture(job(tmp_path / "d", tiny_teacher, mode="score", source=str(odd)))
    assert open_cache(str(tmp_path / "d")).samples.column("response").to_pylist() == \
        ["a line\u2028separator and a paragraph\u2029separator inside a string", "next\u0085row"]


def test_capture_config_comes_from_the_job_by_field_name():
    from dataclasses import fields

    from logitcache.format.manifest import CaptureConfig
    from logitcache.teacher.capture import CaptureJob, capture_config

    resolved = dict(top_k=16, hidden_layers=[3], max_length=512, samples_per_shard=8, encoding={"name": "topk"})
    job = CaptureJob(cache="unused", mode="generate", temperature=0.7, top_p=0.9, num_samples=3, max_new_tokens=5,
                     system_prompt="be brief", seed=11, logprob_dtype="float32", with_prompt=True, truncate=True,
                     hidden_dtype="float16", top_k=99, max_length=4)
    cfg = capture_config(job, **resolved)
    for f in fields(CaptureConfig):     # every field: resolved, else the job's own
        assert getattr(cfg, f.name) == resolved.get(f.name, getattr(job, f.name)), f.name
    # score mode records no sampling it never did
    score = capture_config(CaptureJob(cache="unused", mode="score", temperature=0.7, top_p=0.9, num_samples=3,
                                      max_new_tokens=5, seed=11), **resolved)
    assert (score.temperature, score.top_p, score.num_samples, score.max_new_tokens) == (0.0, 1.0, 1, 0)
    assert score.seed == 11
    with pytest.raises(TypeError, match="not CaptureConfig fields"):
        capture_config(job, **resolved, bogus=1)
