"""A student with another tokenizer: rows in its tokens, targets over its vocabulary, ULD."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from logitcache.align import TokenBytes, messages_of
from logitcache.format.errors import LogitcacheError
from logitcache.teacher.capture import CaptureJob, run_capture
from student_train import losses
from student_train.cross_tokenizer import CrossTokenizer
from student_train.data import CacheStream
from student_train.objective import teacher_loss
from tests.align.conftest import byte_level_tokenizer

from .conftest import WORDS

TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + i % 11)) + ("!" if i % 2 else "")
         for i in range(12)]
CHAT_TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                 "<|endoftext|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<<assistant>> {% endif %}")


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory, tiny_teacher):
    d = tmp_path_factory.mktemp("xtok")
    (d / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run_capture(CaptureJob(encoding="topk", cache=str(d / "c"), teacher=str(tiny_teacher), backend="hf", mode="score",
                           source=str(d / "t.jsonl"), top_k=8, samples_per_shard=5, progress=False))
    return str(d / "c")


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory, tiny_teacher):
    d = tmp_path_factory.mktemp("xtok-chat")
    rows = [{"messages": [{"role": "user", "content": TEXTS[i]}, {"role": "assistant", "content": TEXTS[i + 1]}]}
            for i in range(4)]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_capture(CaptureJob(encoding="compact", cache=str(d / "c"), teacher=str(tiny_teacher), backend="hf",
                           mode="score", source=str(d / "m.jsonl"), top_k=8, samples_per_shard=4, progress=False))
    return str(d / "c")


@pytest.fixture(scope="module")
def teacher_tok(tiny_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="module")
def other_tok():
    tok = byte_level_tokenizer(TEXTS * 3, vocab_size=280)   # finer than the teacher: some boundaries meet none
    tok.chat_template = CHAT_TEMPLATE
    return tok


def batch_of(cache, seq_len=64):
    stream = CacheStream(cache, seq_len, 4, packing=False, shuffle=False, rank=0, world_size=1)
    return stream, next(iter(stream))


def test_same_tokenizer_gives_the_direct_rows_and_loss(text_cache, teacher_tok):
    stream, batch = batch_of(text_cache)
    conv = CrossTokenizer(stream, teacher_tok, teacher_tok, "map+uld")
    out = conv.convert(batch)
    for name in ("input_ids", "labels", "loss_mask", "position_ids", "document_ids", "sample_index"):
        assert torch.equal(out[name], batch[name]), name
    m = batch["loss_mask"]
    t, d = out["teacher"], batch["teacher"]
    assert torch.equal(t.ids[m], d.ids[m]) and torch.equal(t.logprobs[m], d.logprobs[m])
    assert not t.uld.any() and conv.stats()["aligned_share"] == 1.0
    torch.manual_seed(0)
    z = torch.randn(*batch["input_ids"].shape, len(teacher_tok), dtype=torch.float64, requires_grad=True)
    for kd in (None, losses.DistillationConfig(kind="reverse_kl")):
        direct = teacher_loss(z, d, m.double(), kd)
        (g_direct,) = torch.autograd.grad(direct, z)
        cross = teacher_loss(z, t, out["loss_mask"].double(), kd)
        (g_cross,) = torch.autograd.grad(cross, z)
        assert torch.allclose(cross, direct, rtol=1e-12) and torch.allclose(g_cross, g_direct, rtol=1e-10, atol=1e-15)


def test_other_tokenizer_rows_carry_the_teacher_over(text_cache, teacher_tok, other_tok):
    stream, batch = batch_of(text_cache)
    conv = CrossTokenizer(stream, teacher_tok, other_tok, "map+uld")
    out = conv.convert(batch)
    only_mapped = CrossTokenizer(stream, teacher_tok, other_tok, "map").convert(batch)
    assert torch.equal(only_mapped["loss_mask"], out["loss_mask"] & (out["teacher"].ids >= 0).any(-1))
    assert not only_mapped["teacher"].uld.any() and CrossTokenizer(stream, teacher_tok, other_tok, "uld").convert(
        batch)["teacher"].uld[out["loss_mask"]].all()
    tb, sb = TokenBytes.from_tokenizer(teacher_tok), TokenBytes.from_tokenizer(other_tok)
    checked = 0
    for b in range(batch["input_ids"].shape[0]):
        n_t = int((batch["document_ids"][b] != 0).sum())
        n_s = int((out["document_ids"][b] != 0).sum())
        t_text, t_ends = tb.join(batch["input_ids"][b, :n_t].numpy())
        s_ids = out["input_ids"][b, :n_s].numpy()
        s_text, s_ends = sb.join(s_ids)
        assert s_text == t_text                               # the same text in the student's tokens
        assert s_ids.tolist() == other_tok(t_text.decode())["input_ids"]
        labels = out["labels"][b, :n_s - 1].numpy()
        assert np.array_equal(labels[labels >= 0], s_ids[1:][labels >= 0])
        for j in np.flatnonzero(out["loss_mask"][b].numpy()):
            t = int(np.flatnonzero(t_ends == s_ends[j])[-1])  # the teacher position ending at the same byte
            assert batch["loss_mask"][b, t]
            ids, lp = out["teacher"].ids[b, j].numpy(), out["teacher"].logprobs[b, j].numpy()
            t_ids, t_lp = batch["teacher"].ids[b, t].numpy(), batch["teacher"].logprobs[b, t].numpy()
            want = [(sb_id, v) for tid, v in zip(t_ids, t_lp)
                    if (sb_id := next((x for x in range(len(sb)) if sb.piece(x) == tb.piece(int(tid))), -1)) >= 0]
            assert [(int(i), float(v)) for i, v in zip(ids, lp) if i >= 0] == [(i, float(v)) for i, v in want]
            assert np.all(ids[len(want):] == -1)
            assert bool(out["teacher"].uld[b, j]) == (not want)          # map+uld: ULD where nothing maps
            assert torch.equal(out["teacher"].ranked_logprobs[b, j], batch["teacher"].logprobs[b, t])
            checked += 1
    assert checked > 10
    s = conv.stats()
    assert 0.1 < s["aligned_share"] < 1.0 and 0 <= s["mapped_mass"] <= 1


def test_chat_samples_use_the_students_template(chat_cache, teacher_tok, other_tok):
    stream, batch = batch_of(chat_cache, seq_len=96)
    conv = CrossTokenizer(stream, teacher_tok, other_tok, "map+uld")
    out = conv.convert(batch)
    sb = TokenBytes.from_tokenizer(other_tok)
    sample = int(batch["sample_index"][0, 0])
    messages = messages_of(stream.cache.samples.column("prompt")[sample].as_py())
    response = stream.cache.samples.column("response")[sample].as_py().replace("<|im_end|>", "").strip()
    want = other_tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    n = int((out["document_ids"][0] != 0).sum())
    s_text, s_ends = sb.join(out["input_ids"][0, :n].numpy())
    assert s_text.decode() == want and s_text.startswith(b"<<user>> ")
    # the distilled positions lie in the response, which both texts share; the templates align nowhere
    start = s_text.index(b"<<assistant>> ") + len(b"<<assistant>> ")
    kd = np.flatnonzero(out["loss_mask"][0].numpy())
    assert len(kd) > 3 and s_ends[kd].min() >= start
    ce = np.flatnonzero(out["labels"][0].numpy() >= 0)
    assert s_ends[ce].min() >= start - 1
    assert out["teacher"].tail is not None                  # compact: stored tail + unmapped mass
    # stored values are rounded: a tail plus the unmapped mass may pass 1, and is kept a probability
    batch["teacher"].tail[batch["loss_mask"]] = 1.0
    tail = conv.convert(batch)["teacher"].tail
    assert tail.max() == 1.0 and tail.min() >= 0


def test_uld_equals_a_direct_computation_over_the_whole_vocabulary():
    torch.manual_seed(0)
    N, V = 6, 11
    z = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(N, V, dtype=torch.float64) * 2, -1)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0], dtype=torch.float64)
    got = losses.uld_loss(z, p.log()[:, torch.randperm(V)], w, chunk_rows=4)
    (g_got,) = torch.autograd.grad(got, z)
    q = torch.softmax(z, -1)
    direct = ((p.sort(-1, descending=True).values - q.sort(-1, descending=True).values).abs().sum(-1) * w).sum() / w.sum()
    (g_direct,) = torch.autograd.grad(direct, z)
    assert torch.allclose(got, direct, rtol=1e-12) and torch.allclose(g_got, g_direct, rtol=1e-10, atol=1e-14)
    assert torch.all(g_got[1] == 0)                                          # a weight-0 row: no gradient


def test_uld_with_top_k_compares_ranks_then_tails():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    lp = torch.tensor([[0.5, 0.3, float("-inf")]], dtype=torch.float64).log()   # two entries, one padding
    q = torch.softmax(z.detach(), -1)[0]
    want = abs(0.5 - q[0]) + abs(0.3 - q[1]) + abs(0.2 - (1 - q[0] - q[1]))
    assert torch.isclose(losses.uld_loss(z, lp, None), want)
    tail = torch.tensor([0.1], dtype=torch.float64)                          # a stored tail replaces 1 - sum
    want = abs(0.5 - q[0]) + abs(0.3 - q[1]) + abs(0.1 - (1 - q[0] - q[1]))
    assert torch.isclose(losses.uld_loss(z, lp, None, teacher_tail=tail), want)
    assert losses.uld_loss(z, lp, torch.zeros(1)).item() == 0.0


def test_cross_tokenizer_refuses_estimated_encodings(tmp_path, tiny_teacher, teacher_tok, other_tok):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    run_capture(CaptureJob(encoding="sampled", cache=str(tmp_path / "c"), teacher=str(tiny_teacher), backend="hf",
                           mode="score", source=str(tmp_path / "t.jsonl"), top_k=8, progress=False))
    stream = CacheStream(str(tmp_path / "c"), 32, 1, packing=False, rank=0, world_size=1)
    with pytest.raises(LogitcacheError, match="exact sparse rows .* not sampled"):
        CrossTokenizer(stream, teacher_tok, other_tok)
    with pytest.raises(LogitcacheError, match="packing=False"):
        CrossTokenizer(CacheStream(str(tmp_path / "c"), 32, 1, rank=0, world_size=1), teacher_tok, other_tok)


@pytest.fixture(scope="module")
def other_student(tmp_path_factory, other_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("other-student")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(other_tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(d)
    other_tok.save_pretrained(d)
    return str(d)


def run_train(*args):
    from click.testing import CliRunner

    from student_train.cli import cli

    return CliRunner().invoke(cli, [*map(str, args), "--no-progress"], catch_exceptions=False)


def test_student_train_with_another_tokenizer(text_cache, other_student, tmp_path):
    out = tmp_path / "run"
    r = run_train(text_cache, "--out", out, "--student", other_student, "--max-steps", 3, "--seq-len", 64,
                  "--batch-size", 4, "--eval-frac", 0.2, "--ce-alpha", 0.5, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    stats = report["cross_tokenizer"]
    assert stats["student_positions"] > stats["aligned"] > 0 and 0 < stats["aligned_share"] < 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"step"' in line]
    assert [s["step"] for s in log if "loss" in s] == [1, 2, 3]
    assert all(np.isfinite(s["loss"]) and s["kd"] > 0 and s["ce"] > 0 for s in log if "loss" in s)
    assert report["eval_end"]["tokens"] > 0 and np.isfinite(report["eval_end"]["perplexity"])
    assert (out / "vocab_map.npz").exists()
    (key, files), = kept_files(out).items()                  # one key: the training and held-out rows share it
    assert "key.json" in files and any(f.endswith(".npz") for f in files)
    # run again: the map beside the run is read back; one built for other tokenizers is refused
    r = run_train(text_cache, "--out", out, "--student", other_student, "--max-steps", 3, "--seq-len", 64,
                  "--batch-size", 4, "--eval-frac", 0.2, "--ce-alpha", 0.5)
    assert r.exit_code == 0, r.output
    from logitcache.align import VocabMap

    VocabMap(np.zeros(3, np.int64), 3, "x", "y").save(out / "vocab_map.npz")
    r = run_train(text_cache, "--out", out, "--student", other_student, "--max-steps", 3, "--seq-len", 64,
                  "--batch-size", 4, "--eval-frac", 0.2, "--ce-alpha", 0.5)
    assert r.exit_code == 1 and "vocab_map.npz was built for other tokenizers" in r.output


@pytest.mark.parametrize("flags, message", [
    (["--layer-map", "0:-1"], "--layer-map: not supported with a student whose tokenizer differs"),
    (["--fused-loss", "on"], "--fused-loss on: not supported with a student whose tokenizer differs"),
    (["--teacher-tokenizer", "{student}"], "not the tokenizer the cache was written with"),
])
def test_student_train_refusals_with_another_tokenizer(text_cache, other_student, tmp_path, flags, message):
    r = run_train(text_cache, "--out", tmp_path / "run", "--student", other_student, "--max-steps", 1,
                  *[f.format(student=other_student) for f in flags])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


def test_inspect_reports_the_shares_a_training_run_sees(text_cache, teacher_tok, other_tok, other_student,
                                                        tiny_teacher):
    from click.testing import CliRunner

    from logitcache.cli.main import cli

    stream = CacheStream(text_cache, 128, len(TEXTS), packing=False, shuffle=False, rank=0, world_size=1)
    conv = CrossTokenizer(stream, teacher_tok, other_tok, "map+uld")
    conv.convert(next(iter(stream)))
    want = conv.stats()
    r = CliRunner().invoke(cli, ["inspect", text_cache, "--json", "--no-token-stats", "--student-tokenizer",
                                 other_student], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["alignment"]
    assert got["samples"] == len(TEXTS) and want["truncated_samples"] == 0
    for key in ("student_positions", "aligned", "mapped"):
        assert got[key] == want[key], key
    assert got["mapped_mass"] == pytest.approx(want["mapped_mass"], rel=1e-5)
    r = CliRunner().invoke(cli, ["inspect", text_cache, "--no-token-stats", "--student-tokenizer", other_student,
                                 "--teacher-tokenizer", other_student])
    assert r.exit_code == 1 and "not the tokenizer the cache was written with" in r.output


# ---- alignments kept beside the run (student_train/alignment_cache.py) ------------------------------------

def assert_same_rows(got: dict, want: dict) -> None:
    """Every output of ``convert``, element by element, the teacher targets' fields included."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name == "teacher":
            for field in dataclasses.fields(value):
                a, b = getattr(got[name], field.name), getattr(value, field.name)
                assert (a is None) == (b is None), field.name
                assert b is None or (a.dtype == b.dtype and torch.equal(a, b)), field.name
        else:
            assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def kept_files(out) -> dict[str, list[str]]:
    root = out / "alignments"
    return {d.name: sorted(p.name for p in d.iterdir()) for d in root.iterdir()} if root.exists() else {}


@pytest.mark.parametrize("which, seq_len", [("text_cache", 12), ("chat_cache", 40)])
def test_kept_alignments_give_the_rows_made_afresh(request, which, seq_len, teacher_tok, other_tok, tmp_path,
                                                   monkeypatch):
    cache = request.getfixturevalue(which)
    stream = CacheStream(cache, seq_len, 3, packing=False, seed=1, shuffle_buffer=4, rank=0, world_size=1)
    fresh = CrossTokenizer(stream, teacher_tok, other_tok, "map+uld")
    kept = CrossTokenizer(stream, teacher_tok, other_tok, "map+uld", alignments=str(tmp_path))
    made = []                                                                 # (converter, sample) made
    align = CrossTokenizer.align
    monkeypatch.setattr(CrossTokenizer, "align", lambda self, i, t: made.append((self, i)) or align(self, i, t))

    def epochs(converter, n=2):
        for epoch in range(n):
            stream.set_epoch(epoch)
            for batch in stream:
                want = fresh.convert(batch)
                assert_same_rows(converter.convert(batch), want)

    def made_by(converter):
        return sorted(i for c, i in made if c is converter)

    epochs(kept)
    assert made_by(kept) == list(range(stream.num_samples))                  # once each; fresh: every epoch
    assert len(made_by(fresh)) == 2 * stream.num_samples and kept.counts == fresh.counts
    assert fresh.counts["truncated_samples"] > 0 and stream.stats["truncated_samples"] > 0   # both sides cut
    (key, files), = kept_files(tmp_path).items()
    shards = {stream.shard_of(i) for i in range(stream.num_samples)}
    assert len(shards) == {"text_cache": 3, "chat_cache": 1}[which] and files == sorted([f"{s}.npz" for s in shards] + ["key.json"])
    # a resume (a new converter on the same run directory) and another rank (writes nothing) make none
    made.clear()
    epochs(resumed := CrossTokenizer(stream, teacher_tok, other_tok, "map+uld", alignments=str(tmp_path)))
    epochs(reader := CrossTokenizer(stream, teacher_tok, other_tok, "map+uld", alignments=str(tmp_path),
                                    write_alignments=False), 1)
    assert made_by(resumed) == made_by(reader) == [] and len(made_by(fresh)) == 3 * stream.num_samples
    # a rank that finds no file makes the alignments in memory only, once per shard held
    other_rank = CrossTokenizer(stream, teacher_tok, other_tok, "map+uld", alignments=str(tmp_path / "r1"),
                                write_alignments=False)
    epochs(other_rank)
    assert made_by(other_rank) == list(range(stream.num_samples)) and not (tmp_path / "r1").exists()


def test_kept_alignments_for_other_settings_are_not_used(text_cache, teacher_tok, other_tok, tmp_path, caplog):
    def run(seq_len, student):
        stream = CacheStream(text_cache, seq_len, 4, packing=False, shuffle=False, rank=0, world_size=1)
        kept = CrossTokenizer(stream, teacher_tok, student, "map+uld", alignments=str(tmp_path))
        fresh = CrossTokenizer(stream, teacher_tok, student, "map+uld")
        for batch in stream:
            assert_same_rows(kept.convert(batch), fresh.convert(batch))
        return kept, stream

    first, stream = run(12, other_tok)
    with caplog.at_level(logging.INFO, logger="student_train.alignment_cache"):
        longer, _ = run(16, other_tok)
        same, _ = run(12, teacher_tok)
    assert f"{first.alignments.directory} was made for seq_len 12 (this run: 16): not used" in caplog.text
    assert f"{first.alignments.directory} was made for another student tokenizer: not used" in caplog.text
    assert len(kept_files(tmp_path)) == 3
    # a file whose recorded key is not its directory's is refused, saying what differs
    shard = stream.shard_of(0)
    shutil.copy(os.path.join(first.alignments.directory, f"{shard}.npz"),
                os.path.join(longer.alignments.directory, f"{shard}.npz"))
    with pytest.raises(LogitcacheError, match=r"was made for seq_len 12 \(this run: 16\), not for this run's key "
                                              r"[0-9a-f]{16}; remove it"):
        run(16, other_tok)
    # an entry made from other teacher tokens than a row holds is refused
    tokens = stream.shard_samples(shard)[1][0]
    assert first.alignments.lookup(shard, stream.sample_id(0), tokens) is not None
    with pytest.raises(LogitcacheError, match=r"aligned from \d+ other teacher tokens than the \d+ it has now"):
        first.alignments.lookup(shard, stream.sample_id(0), tokens[:-1])


def _stats_on_rank(rank: int, init_file: str, out: str) -> None:
    """One of two gloo ranks: its own counts in, the summed statistics out (a JSON file per rank)."""
    import types

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", world_size=2, rank=rank)
    try:
        counts = {"student_positions": 10 + rank, "aligned": 6 + 2 * rank, "mapped": 5 + rank, "uld": 1,
                  "mapped_mass": 3.0 + 0.5 * rank, "truncated_samples": rank}
        me = types.SimpleNamespace(counts=counts, vocab_map=types.SimpleNamespace(mapped_share=0.25))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(CrossTokenizer.stats(me), f)
    finally:
        torch.distributed.destroy_process_group()


def test_statistics_are_summed_over_the_ranks(tmp_path):
    """Under DDP the report's cross_tokenizer counts are every rank's together, not rank 0's alone."""
    torch.multiprocessing.spawn(_stats_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1]
    assert {k: got[0][k] for k in ("student_positions", "aligned", "mapped", "uld", "truncated_samples")} == \
        {"student_positions": 21, "aligned": 14, "mapped": 11, "uld": 2, "truncated_samples": 1}
    assert got[0]["aligned_share"] == pytest.approx(14 / 21) and got[0]["mapped_mass"] == pytest.approx(6.5 / 14)
    assert got[0]["vocab_mapped_share"] == 0.25
