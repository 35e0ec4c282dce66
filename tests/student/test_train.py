"""The student trainer end to end on a tiny cache: it learns, resumes exactly after a kill, runs as
two DDP ranks that see every sample once, trains on a selection only, and refuses bad setups."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from logitcache import open_cache
from logitcache.format import LogitcacheError
from logitcache.teacher.capture import CaptureJob, run_capture
from student_train.config import TrainConfig
from student_train.train import split_ids, train
from tests.conftest import copy_tokenizer

WORDS = ("river stone light garden number seven quiet engine paper window market summer code list table "
         "function value cloud north simple").split()


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher):
    d = tmp_path_factory.mktemp("train-cache")
    src = d / "texts.jsonl"
    rows = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + i % 11)) for i in range(36)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    run_capture(CaptureJob(encoding="topk", cache=str(d / "c"), teacher=str(tiny_teacher), backend="hf", mode="score", source=str(src),
                           top_k=8, samples_per_shard=8, hidden_layers=[-1], progress=False))
    return str(d / "c")


@pytest.fixture(scope="module")
def random_student(tmp_path_factory) -> str:
    """A 1-layer Llama config with the teacher's vocabulary (and a wider hidden state than its 32):
    random init, far from the teacher."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("student") / "student.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


def config(cache, out, **kw) -> TrainConfig:
    base = dict(cache=cache, out=str(out), keep_layers="0", seq_len=48, batch_size=2, max_steps=6, lr=3e-3,
                warmup_steps=1, eval_frac=0.2, save_every=2, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def cli(*args, env=None):
    cmd = [sys.executable, "-c", "from student_train.cli import cli; cli()", *map(str, args), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def student_weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "student", "model.safetensors"))


def test_training_lowers_the_held_out_kl_and_writes_its_report(cache, tmp_path, random_student):
    report = train(config(cache, tmp_path / "run", keep_layers=None, student=random_student, max_steps=12,
                          lr=1e-2, layer_map=[[1, -1]]), progress=False)
    start, end = report["eval_start"], report["eval_end"]
    assert report["steps"] == 12 and start["tokens"] == end["tokens"] > 0
    assert end["kl_forward"] < 0.8 * start["kl_forward"]
    assert 0 <= end["top1_agreement"] <= 1 and end["perplexity"] > 1
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "step" in r and "eval" not in r]
    assert [r["step"] for r in steps] == list(range(1, 13)) and all("hidden" in r for r in steps)
    proj = torch.load(tmp_path / "run" / "student" / "hidden_projector.pt")
    assert proj["layer_map"] == [[1, -1]] and proj["state"]["maps.0.weight"].shape == (32, 48)
    assert {"model.safetensors", "config.json", "tokenizer.json", "hidden_projector.pt"} <= \
        set(os.listdir(tmp_path / "run" / "student"))
    assert os.path.getsize(tmp_path / "run" / "curves.png") > 10_000
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["eval_end"] == pytest.approx(end) and saved["parameters"] == report["parameters"]


def test_held_out_split_is_stable_and_disjoint(cache):
    ids = open_cache(cache).samples.column("sample_id").to_pylist()
    tr, ev = split_ids(ids, 0.2)
    assert set(tr).isdisjoint(ev) and sorted(tr + ev) == sorted(ids) and 0 < len(ev) < len(ids)
    assert split_ids(list(reversed(ids)), 0.2)[1] == list(reversed(ev))


def test_a_killed_run_resumes_to_the_same_weights(cache, tmp_path):
    args = [cache, "--out", None, "--keep-layers", "0", "--seq-len", 48, "--batch-size", 2, "--max-steps", 7,
            "--lr", 3e-3, "--warmup-steps", 1, "--save-every", 2, "--seed", 3, "--grad-accum", 2]
    whole = cli(*[tmp_path / "whole" if a is None else a for a in args])
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = cli(*[tmp_path / "resumed" if a is None else a for a in args], env={"STUDENT_TRAIN_FAULT": "kill-after-step:5"})
    assert killed.returncode == -9 and not (tmp_path / "resumed" / "student").exists()
    resumed = cli(*[tmp_path / "resumed" if a is None else a for a in args])   # continues from step 4
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = student_weights(tmp_path / "whole"), student_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:   # same seed, same data order, same float operations: equal to 1e-6
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    log = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    # the killed run logged steps 1-5; the resumed one restarted from the step-4 checkpoint
    assert [r["step"] for r in log if "eval" not in r] == [1, 2, 3, 4, 5, 5, 6, 7]


def test_two_ddp_ranks_see_every_sample_exactly_once(cache, tmp_path):
    record = tmp_path / "seen"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "student_train.cli", cache, "--out", tmp_path / "ddp", "--keep-layers", "0", "--seq-len", 48,
           "--batch-size", 2, "--epochs", 1, "--eval-frac", 0.2, "--no-progress"]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600,
                       env={**os.environ, "STUDENT_TRAIN_RECORD_SAMPLES": str(record), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [(record.parent / f"seen.{rank}").read_text().split() for rank in (0, 1)]
    ids = open_cache(cache).samples.column("sample_id").to_pylist()
    train_ids, _ = split_ids(ids, 0.2)
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(train_ids)
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["world_size"] == 2 and report["train_samples"] == len(train_ids)


def test_training_on_a_filter_sees_only_the_selected_samples(cache, tmp_path, monkeypatch):
    record = tmp_path / "seen"
    monkeypatch.setenv("STUDENT_TRAIN_RECORD_SAMPLES", str(record))
    train(config(cache, tmp_path / "sel", where="response_tokens > 9", max_steps=None, epochs=1, eval_frac=0.0),
          progress=False)
    table = open_cache(cache).samples
    wanted = sorted(r["sample_id"] for r in table.to_pylist() if r["response_tokens"] > 9)
    assert 0 < len(wanted) < table.num_rows and sorted((record.parent / "seen.0").read_text().split()) == wanted


def test_bad_setups_are_refused_with_the_setting_named(cache, tmp_path, tiny_teacher):
    with pytest.raises(LogitcacheError, match=r"give exactly one of --student .* and --keep-layers"):
        train(config(cache, tmp_path / "a", keep_layers=None), progress=False)
    with pytest.raises(LogitcacheError, match=r"--keep-layers '0,5': need increasing, distinct indices in \[0, 2\)"):
        train(config(cache, tmp_path / "b", keep_layers="0,5"), progress=False)
    with pytest.raises(LogitcacheError, match=r"hidden layer 1 is not in the cache .*; it holds layers 2"):
        train(config(cache, tmp_path / "c", layer_map=[[0, 1]]), progress=False)
    with pytest.raises(LogitcacheError, match=r"--seq-len: must be >= 1, got 0"):
        config(cache, tmp_path / "d", seq_len=0)
    with pytest.raises(LogitcacheError, match=r"unknown training setting\(s\) lr_max"):
        TrainConfig.from_dict({"cache": cache, "out": "x", "lr_max": 1})
    # a student with another vocabulary
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    path = tmp_path / "student.json"
    path.write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(LogitcacheError, match=r"the student's logits have 1000 entries but the teacher's have 49152"):
        train(config(cache, tmp_path / "e", keep_layers=None, student=str(path)), progress=False)
    # resuming with other settings
    train(config(cache, tmp_path / "f", max_steps=2), progress=False)
    with pytest.raises(LogitcacheError, match=r"holds a checkpoint made with lr = 0.003, but this run has 0.01"):
        train(config(cache, tmp_path / "f", max_steps=2, lr=1e-2), progress=False)


def test_transformers_trainer_adapter_trains_with_our_loss(cache, tmp_path, random_student):
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

    from student_train import losses
    from student_train.attention import block_causal_mask
    from student_train.data import CacheStream
    from student_train.hf_trainer import DistillationTrainer, distillation_collator

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.loads(open(random_student).read())))
    stream = CacheStream(cache, seq_len=48, batch_size=1, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=stream,
                                  distillation=losses.DistillationConfig(kind="forward_kl"))
    batch = distillation_collator([b for b, _ in zip(stream, range(2))])
    mask = block_causal_mask(batch["document_ids"])[:, None]
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
    direct = losses.distillation_loss(logits, batch["teacher"].ids, batch["teacher"].logprobs, batch["loss_mask"])
    torch.testing.assert_close(trainer.compute_loss(model, batch), direct)
    out = trainer.train()
    losses_logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert out.global_step == 3 and len(losses_logged) == 3 and losses_logged[-1] < losses_logged[0]


@pytest.fixture(scope="module")
def second_teacher_cache(tmp_path_factory, tiny_teacher, cache):
    """The same texts under another random teacher (same tokenizer), in shards of another size."""
    import shutil

    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("teacher2")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(d / "t2")
    for f in os.listdir(tiny_teacher):
        if f.startswith(("tokenizer", "chat_template", "generation")):
            shutil.copy(os.path.join(tiny_teacher, f), d / "t2" / f)
    src = os.path.join(os.path.dirname(cache), "texts.jsonl")
    run_capture(CaptureJob(encoding="topk", cache=str(d / "c2"), teacher=str(d / "t2"), backend="hf", mode="score", source=src,
                           top_k=4, samples_per_shard=5, progress=False))
    return str(d / "c2")


def test_second_teacher_rows_are_joined_by_sample_id(cache, second_teacher_cache):
    from student_train.data import CacheStream
    from student_train.multi_teacher import TeacherJoin

    stream = CacheStream(cache, seq_len=48, batch_size=3, seed=1)
    join = TeacherJoin(second_teacher_cache, stream)
    other = open_cache(second_teacher_cache)
    checked = 0
    for batch in stream:
        got = join(batch, "t2")
        ids, lps, mask = got["t2"].ids, got["t2"].logprobs, got["t2_mask"]
        assert ids.shape[-1] == 4 and not (mask & ~batch["loss_mask"]).any()
        for b, t in zip(*torch.nonzero((batch["position_ids"] == 0) & (batch["document_ids"] != 0), as_tuple=True)):
            sid = stream.sample_id(int(batch["sample_index"][b, t]))
            want = other.sample(sid, ["topk_ids", "topk_logprobs"])
            n = int((batch["document_ids"][b] == batch["document_ids"][b, t]).sum())
            m = mask[b, t:t + n].numpy()
            assert m.sum() == min(n, len(want["topk_ids"])) - 1          # score mode: all rows but the last
            assert (ids[b, t:t + n].numpy()[m] == want["topk_ids"][:n][m]).all()
            assert (lps[b, t:t + n].numpy()[m] == want["topk_logprobs"][:n][m].astype(np.float32)).all()
            checked += 1
    assert checked == stream.num_samples


def test_a_compact_second_teacher_is_joined_decoded_with_its_exact_tail(cache, second_teacher_cache, tmp_path):
    from logitcache.format.encodings import encoding_from
    from student_train.data import CacheStream
    from student_train.multi_teacher import TeacherJoin

    t2 = os.path.join(os.path.dirname(second_teacher_cache), "t2")
    src = os.path.join(os.path.dirname(cache), "texts.jsonl")
    run_capture(CaptureJob(cache=str(tmp_path / "c3"), teacher=t2, backend="hf", mode="score", source=src,
                           encoding="compact", top_k=4, samples_per_shard=5, progress=False))
    stream = CacheStream(cache, seq_len=48, batch_size=3, seed=1)
    join = TeacherJoin(str(tmp_path / "c3"), stream)
    other = open_cache(str(tmp_path / "c3"))
    batch = next(iter(stream))
    got = join(batch, "t3")
    b, t = [int(x[0]) for x in torch.nonzero((batch["position_ids"] == 0) & (batch["document_ids"] != 0),
                                             as_tuple=True)]
    sid = stream.sample_id(int(batch["sample_index"][b, t]))
    rec = other.samples.to_pylist()[other._index[sid]]
    d = encoding_from(other.manifest.capture.encoding).decode(other.sample(sid), 49152)
    n = rec["scored_end"] - rec["scored_start"]
    want_ids, want_lp = d.padded(4)
    m = got["t3_mask"][b, t:t + rec["num_tokens"]].numpy()
    assert m.sum() == n
    np.testing.assert_array_equal(got["t3"].ids[b, t:t + rec["num_tokens"]].numpy()[m], want_ids[m])
    np.testing.assert_array_equal(got["t3"].logprobs[b, t:t + rec["num_tokens"]].numpy()[m], want_lp[m])
    np.testing.assert_array_equal(got["t3"].tail[b, t:t + rec["num_tokens"]].numpy()[m], d.tail[m])


def test_multi_teacher_training_combines_the_losses(cache, second_teacher_cache, tmp_path, random_student):
    report = train(config(cache, tmp_path / "mt", keep_layers=None, student=random_student, max_steps=3,
                          teachers=[second_teacher_cache], teacher_weights=[0.25, 0.75]), progress=False)
    log = [json.loads(x) for x in (tmp_path / "mt" / "log.jsonl").read_text().splitlines() if '"eval"' not in x]
    for r in log:
        assert r["kd"] == pytest.approx(0.25 * r["kd_teacher0"] + 0.75 * r["kd_teacher1"], rel=1e-5)
    assert report["steps"] == 3
    with pytest.raises(LogitcacheError, match=r"--teacher-weights: 1 weight\(s\) for 2 teacher caches"):
        config(cache, tmp_path / "x", teachers=[second_teacher_cache], teacher_weights=[1.0])


def test_cli_teaches_and_names_what_is_missing(cache):
    from click.testing import CliRunner

    from student_train.cli import cli as train_cli

    r = CliRunner().invoke(train_cli, ["--help"])
    for flag in ("--keep-layers", "--selection", "--loss", "KL(p_teacher||q_student)", "--layer-map", "--teacher",
                 "--resume"):
        assert flag in r.output
    r = CliRunner().invoke(train_cli, [cache])
    assert r.exit_code == 1 and "error: missing --out (or give it in --config)" in r.output
    r = CliRunner().invoke(train_cli, [cache, "--out", "x", "--loss-arg", "alpha"])
    assert r.exit_code == 2 and "'alpha': expected KEY=NUMBER" in r.output


def test_training_on_a_selection_file_sees_only_the_selected_samples(cache, tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from logitcache.cli.main import cli as logitcache_cli

    sel = tmp_path / "uncertain.parquet"
    r = CliRunner().invoke(logitcache_cli, ["select", cache, "--by", "mean_entropy", "--top-frac", "0.5", "--out",
                                            str(sel)])
    assert r.exit_code == 0, r.output
    chosen = set(pq.read_table(sel).column("sample_id").to_pylist())
    record = tmp_path / "seen"
    monkeypatch.setenv("STUDENT_TRAIN_RECORD_SAMPLES", str(record))
    report = train(config(cache, tmp_path / "sel", selection=str(sel), max_steps=None, epochs=1), progress=False)
    train_ids, held_out = split_ids(open_cache(cache).samples.column("sample_id").to_pylist(), 0.2)
    seen = (record.parent / "seen.0").read_text().split()
    assert sorted(seen) == sorted(chosen - set(held_out)) and report["train_samples"] == len(seen)
    assert report["eval_samples"] == len(held_out)      # evaluation stays on the whole held-out split
    other = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(sel).slice(0, 2).replace_schema_metadata({}), other)
    with pytest.raises(LogitcacheError, match="other.parquet"):
        train(config(cache, tmp_path / "bad", selection=str(other)), progress=False)


# ---- issue 12: checkpoints tied to their data, clean failures, options checked before work -----------

def perturbed_teacher(src, dest):
    """The tiny teacher with other weights (another training run): another teacher fingerprint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.25)
    model.save_pretrained(dest)
    copy_tokenizer(src, dest)
    return dest


def test_a_checkpoint_resumes_only_on_its_own_data_and_only_when_intact(cache, tmp_path, tiny_teacher):
    import shutil

    mine = shutil.copytree(cache, tmp_path / "cache")
    out = tmp_path / "run"
    train(config(str(mine), out, max_steps=2), progress=False)
    state = out / "checkpoint" / "state.pt"
    pristine = state.read_bytes()
    damaged = bytearray(pristine)
    rng = np.random.default_rng(0)
    for at in rng.choice(np.arange(len(damaged) // 2, len(damaged) - 64), 100, replace=False):
        damaged[at] ^= 1                                      # 100 flipped low bits
    state.write_bytes(bytes(damaged))
    with pytest.raises(LogitcacheError, match=r"checkpoint/state.pt does not match its checksum .* --no-resume"):
        train(config(str(mine), out, max_steps=4), progress=False)
    state.write_bytes(pristine[:len(pristine) // 2])          # truncated
    with pytest.raises(LogitcacheError, match=r"checkpoint/state.pt does not match its checksum"):
        train(config(str(mine), out, max_steps=4), progress=False)
    state.write_bytes(pristine)
    # the cache replaced under the run: same path, same sample ids, another teacher
    other = perturbed_teacher(str(tiny_teacher), str(tmp_path / "other-teacher"))
    rows = open_cache(str(mine)).manifest.inputs[0].source         # the same input file: the same sample ids
    shutil.rmtree(mine)
    run_capture(CaptureJob(encoding="topk", cache=str(mine), teacher=other, backend="hf", mode="score", source=rows,
                           top_k=8, samples_per_shard=8, hidden_layers=[-1], progress=False))
    assert open_cache(str(mine)).samples.column("sample_id").to_pylist() == \
        open_cache(cache).samples.column("sample_id").to_pylist()
    with pytest.raises(LogitcacheError, match=r"holds a checkpoint trained on cache with fingerprint .* would mix two "
                                              r"teachers"):
        train(config(str(mine), out, max_steps=4), progress=False)


def test_options_are_checked_before_any_work_and_failed_runs_leave_nothing(cache, tmp_path):
    from click.testing import CliRunner

    from student_train.cli import cli as train_cli

    def run(*args):
        return CliRunner().invoke(train_cli, [str(a) for a in args] + ["--no-progress"])

    bad_config = tmp_path / "run.json"
    bad_config.write_text(json.dumps({"max_steps": "2"}))
    bad_student = tmp_path / "student.json"
    bad_student.write_text("{not json")
    cases = [
        ((cache, "--out", tmp_path / "a", "--keep-layers", "every:5"),
         "--keep-layers every:5: the step must be in [1, 1] for a teacher with 2 layers"),
        ((cache, "--out", tmp_path / "b", "--keep-layers", "every:x"), "every:N needs an integer step N"),
        ((cache, "--out", tmp_path / "c", "--keep-layers", "0", "--config", bad_config),
         "--max-steps (max_steps in --config): must be an integer or null, got '2'"),
        ((cache, "--out", tmp_path / "d", "--keep-layers", "0", "--loss-arg", "alpha=0.1"),
         "kind='forward_kl' takes no argument alpha=0.1"),
        ((cache, "--out", tmp_path / "e", "--keep-layers", "0", "--lr", "nan"), "--lr (lr in --config): must be a number"),
        ((cache, "--out", "s3://bucket/run", "--keep-layers", "0"), "a run directory must be local"),
        ((cache, "--out", tmp_path / "f", "--student", bad_student), f"--student {bad_student}: cannot read its config"),
        ((cache, "--out", tmp_path / "g", "--keep-layers", "0", "--layer-map", "5:-1"),
         "--layer-map 5:-1: the student has layers 0..1"),
        ((cache, "--out", tmp_path / "h", "--keep-layers", "0", "--selection", tmp_path / "none.parquet"),
         "no such selection file"),
    ]
    for args, message in cases:
        r = run(*args)
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (args, r.output)
    assert sorted(os.listdir(tmp_path)) == ["run.json", "student.json"]      # no run directory, no "s3:"
    assert not os.path.exists("s3:")


def test_error_exits_are_one_line_even_from_dataloader_workers(cache, tmp_path):
    """A damaged chunk met by a DataLoader worker process: exit 3 naming the shard, no traceback, no abort."""
    import shutil

    damaged = shutil.copytree(cache, tmp_path / "cache")
    chunk = next((damaged / "shards").glob("*/arrays.zarr/topk_ids/c/0/0"))
    data = bytearray(chunk.read_bytes())
    data[20] ^= 0x55
    chunk.write_bytes(bytes(data))
    r = cli(damaged, "--out", tmp_path / "run", "--keep-layers", "0", "--seq-len", 48, "--batch-size", 2,
            "--max-steps", 3, "--num-workers", 1, "--eval-frac", 0)
    assert r.returncode == 3, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and f"shard '{chunk.parents[4].name}' is corrupt: array topk_ids" in lines[0]
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_transformers_trainer_under_two_processes_sees_every_sample_once(cache, tmp_path, random_student, sharding):
    fsdp = ('fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},'
            if sharding == "fsdp" else "")
    script = tmp_path / "hf_ddp.py"
    script.write_text(f"""
import json, os, torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments
from student_train.data import CacheStream
from student_train.hf_trainer import DistillationTrainer, distillation_collator
from student_train.train import split_ids
from logitcache import open_cache

args = TrainingArguments(output_dir={str(tmp_path / 'hf')!r}, per_device_train_batch_size=3, num_train_epochs=1,
                         learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                         ddp_backend="gloo", {fsdp})
ids, _ = split_ids(open_cache({cache!r}).samples.column("sample_id").to_pylist(), 0.0)
stream = CacheStream({cache!r}, seq_len=48, batch_size=1, seed=0, sample_ids=ids)
seen = open(os.path.join({str(tmp_path)!r}, f"seen.{{args.process_index}}"), "w")

def collate(items):
    batch = distillation_collator(items)
    for i in batch["sample_index"].unique().tolist():
        if i >= 0:
            seen.write(stream.sample_id(i) + "\\n")
    seen.flush()
    return batch

torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.load(open({random_student!r}))))
trainer = DistillationTrainer(model=model, args=args, train_dataset=stream, data_collator=collate)
trainer.train()
open(os.path.join({str(tmp_path)!r}, "wrapped.txt"), "w").write(type(trainer.model_wrapped).__name__)
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541", script]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [(tmp_path / f"seen.{rank}").read_text().split() for rank in (0, 1)]
    ids = open_cache(cache).samples.column("sample_id").to_pylist()
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(ids)           # every sample once over the two processes
    if sharding == "fsdp":     # accelerate shards on accelerators only: said, then DDP
        assert (tmp_path / "wrapped.txt").read_text() == "DistributedDataParallel"
        assert "TrainingArguments(fsdp=" in r.stderr and "is ignored by accelerate on this device" in r.stderr


def test_full_targets_train_on_every_value_of_a_full_cache(tmp_path_factory, tiny_teacher, cache, tmp_path):
    """--full-targets: the loss of the first step equals a direct full-vocabulary forward KL on that batch;
    on a top-k cache the flag is refused naming it."""
    from student_train.data import CacheStream
    from student_train.model import build_student

    d = tmp_path_factory.mktemp("full-cache")
    src = d / "texts.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(9))}) + "\n"
                           for i in range(6)))
    full = str(d / "c")
    run_capture(CaptureJob(encoding="full", cache=full, teacher=str(tiny_teacher), backend="hf", mode="score",
                           source=str(src), samples_per_shard=4, logprob_dtype="float32", progress=False))
    cfg = config(full, tmp_path / "run", full_targets=True, max_steps=1, eval_frac=0.0, lr=1e-9)
    report = train(cfg, progress=False)
    assert report["fused_loss"]["on"] is False
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][0]

    torch.manual_seed(cfg.seed)
    model, _ = build_student(None, "0", open_cache(full).manifest, cfg.seed)
    stream = CacheStream(full, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=0, world_size=1)
    stream.set_epoch(0)
    batch = next(iter(stream))
    with torch.no_grad():
        from student_train.objective import forward

        logits = forward(model, batch, False).logits.double()
    mask = batch["loss_mask"]
    from logitcache.format.arrays import FULL_LOGPROBS

    p = open_cache(full)
    records = {r["sample_id"]: r for r in p.samples.to_pylist()}
    kl = []   # the direct computation: each loss row's full distribution as stored in zarr, KL(p || q) over V ids
    for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
        rec = records[stream.sample_id(int(batch["sample_index"][b, t]))]
        row = rec["token_offset"] + int(batch["position_ids"][b, t])
        stored = p.read_rows(rec["shard"], row, row + 1, [FULL_LOGPROBS])[FULL_LOGPROBS][0]
        logp = torch.log_softmax(torch.as_tensor(stored, dtype=torch.float64), -1)
        kl.append(float((logp.exp() * (logp - torch.log_softmax(logits[b, t], -1))).sum()))
    assert logged["kd"] == pytest.approx(float(np.mean(kl)), rel=1e-3)   # float32 training, float64 here

    with pytest.raises(LogitcacheError, match="--full-targets.*--encoding full"):
        train(config(cache, tmp_path / "refused", full_targets=True), progress=False)


def test_gkd_mix_weighs_the_two_parts_and_resumes_to_the_same_weights(cache, tmp_path):
    """--offpolicy-cache / --onpolicy-frac: each step's loss is lambda * (round rows' loss) + (1 - lambda) *
    (forward KL on the other cache's rows), both logged; a run killed after step 3 resumes, the off-policy
    rows' position included, to the weights of one that never stopped."""
    args = [cache, "--out", None, "--keep-layers", "0", "--seq-len", 48, "--batch-size", 4, "--max-steps", 5,
            "--lr", 3e-3, "--warmup-steps", 1, "--save-every", 1, "--seed", 3, "--loss", "reverse_kl",
            "--offpolicy-cache", cache, "--onpolicy-frac", 0.25]
    whole = cli(*[tmp_path / "whole" if a is None else a for a in args])
    assert whole.returncode == 0, whole.stderr[-2000:]
    log = [json.loads(x) for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines() if '"eval"' not in x]
    assert len(log) == 5
    for r in log:
        assert r["loss"] == pytest.approx(0.25 * r["kd"] + 0.75 * r["kd_offpolicy"], rel=1e-5)
        assert r["kd"] != pytest.approx(r["kd_offpolicy"], rel=1e-3)    # two different parts
    killed = cli(*[tmp_path / "resumed" if a is None else a for a in args], env={"STUDENT_TRAIN_FAULT": "kill-after-step:3"})
    assert killed.returncode == -9
    resumed = cli(*[tmp_path / "resumed" if a is None else a for a in args])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = student_weights(tmp_path / "whole"), student_weights(tmp_path / "resumed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    one_row = cli(cache, "--out", tmp_path / "one", "--keep-layers", "0", "--batch-size", 1, "--offpolicy-cache", cache,
                  "--onpolicy-frac", 0.5)
    assert one_row.returncode == 1 and "leaves no row for --offpolicy-cache" in one_row.stderr


def test_policy_gradient_needs_a_round_cache(cache, tmp_path):
    with pytest.raises(LogitcacheError, match="--loss policy_gradient: .* is not an on-policy round cache"):
        train(config(cache, tmp_path / "pg", loss="policy_gradient"), progress=False)
    with pytest.raises(LogitcacheError, match="--onpolicy-frac: the rest of each batch comes from --offpolicy-cache"):
        config(cache, tmp_path / "x", onpolicy_frac=0.5)


def test_curves_figure_labels_units_markers_and_integer_steps():
    """curves.png: labelled axes with units, top-1 agreement in the legend, the exact KL when measured,
    integer step ticks, and evaluations as markers with no line between them; training loss as a line."""
    from matplotlib.ticker import MaxNLocator

    from student_train.train import curves_figure

    history = {"train": [{"step": s, "loss": 5.0 - 0.1 * s, "kd": 4.0 - 0.1 * s, "ce": 1.0} for s in range(1, 3)],
               "eval": [{"step": 0, "kl_forward": 6.0, "kl_forward_exact": 6.2, "top1_agreement": 0.1},
                        {"step": 2, "kl_forward": 3.0, "kl_forward_exact": 3.1, "top1_agreement": 0.4}]}
    fig = curves_figure(history)
    left, right, twin = fig.axes
    assert left.get_ylabel() == "loss (nats/token)" and right.get_ylabel() == "KL (nats/token)"
    assert twin.get_ylabel() == "top-1 agreement (share of tokens)"
    assert left.get_xlabel() == right.get_xlabel() == "optimizer step"
    fig.canvas.draw()
    for a in (left, right):
        assert isinstance(a.xaxis.get_major_locator(), MaxNLocator)
        assert all(float(t).is_integer() for t in a.get_xticks()), a.get_xticks()
    legend = [t.get_text() for t in right.get_legend().get_texts()]
    assert legend == ["KL(teacher || student), stored encoding", "KL(teacher || student), exact over the vocabulary",
                      "top-1 agreement (right axis)"]
    for line in right.get_lines() + twin.get_lines():          # evaluations: markers, no joining line
        assert line.get_linestyle() == "None" and line.get_marker() not in (None, "None", "")
    exact = next(line for line in right.get_lines() if "exact" in line.get_label())
    assert list(exact.get_ydata()) == [6.2, 3.1] and list(exact.get_xdata()) == [0, 2]
    loss = left.get_lines()[0]
    assert loss.get_linestyle() == "-" and list(loss.get_xdata()) == [1, 2]
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["training loss", "its distillation part"]
