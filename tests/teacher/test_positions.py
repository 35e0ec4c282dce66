"""capture --positions-from: the teacher's distribution stored only on the rows where a student is most
unsure, element by element against a full capture of the same text."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from logitcache import open_cache
from logitcache.format.arrays import SELECTED
from logitcache.format.errors import LogitcacheError
from logitcache.teacher.capture import CaptureJob, run_capture
from tests.student.conftest import WORDS, other_model

TEXTS = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(6 + i % 7)) for i in range(5)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_teacher):
    d = tmp_path_factory.mktemp("positions")
    (d / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    student = other_model(d / "student", tiny_teacher, seed=4)
    return d, student


def capture(d, tiny_teacher, name, encoding, **kw):
    out = d / name
    if not out.exists():
        run_capture(CaptureJob(encoding=encoding, cache=str(out), teacher=str(tiny_teacher), backend="hf",
                               mode="score", source=str(d / "t.jsonl"), top_k=6, samples_per_shard=2,
                               logprob_dtype="float32", progress=False, **kw))
    return open_cache(str(out))


def student_entropy(student, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.as_tensor(tokens[None].astype(np.int64))).logits[0].double(), -1)
    return -(logp.exp() * logp).sum(-1).numpy()


@pytest.mark.parametrize("encoding", ["topk", "compact", "sampled", "full"])
def test_only_the_chosen_rows_hold_the_distribution(setup, tiny_teacher, encoding):
    d, student = setup
    full = capture(d, tiny_teacher, f"full-{encoding}", encoding)
    part = capture(d, tiny_teacher, f"part-{encoding}", encoding, positions_from=str(student), keep_frac=0.25)
    m = part.manifest
    assert m.format_version == "1.6" and SELECTED in m.arrays and SELECTED not in full.manifest.arrays
    assert "positions_kept" not in full.samples.column_names            # only a chosen capture has the columns
    assert m.positions["rule"] == "student-entropy" and m.positions["keep_frac"] == 0.25
    assert m.positions["student"]["fingerprint"].startswith("sha256")
    for sid in full.samples.column("sample_id").to_pylist():
        a, b = full.sample_view(sid), part.sample_view(sid)
        for name in ("tokens", "entropy", "target_logprob"):
            np.testing.assert_array_equal(a[name], b[name])            # every row keeps these
        scored = np.isfinite(a["entropy"])
        h = student_entropy(student, a["tokens"])
        idx = np.flatnonzero(scored)
        want = np.zeros(len(scored), bool)
        want[idx[np.argsort(-h[idx], kind="stable")[:math.ceil(0.25 * len(idx))]]] = True
        sel = part.sample(sid, [SELECTED])[SELECTED].astype(bool)
        np.testing.assert_array_equal(sel, want)
        row = part.samples.filter(pc.equal(part.samples.column("sample_id"), sid)).to_pylist()[0]
        assert (row["positions_rule"], row["positions_kept"]) == ("student-entropy", int(want.sum()))
        assert row["positions_share"] == pytest.approx(want.sum() / len(idx), rel=1e-6)
        has = (b["ids"] >= 0).any(-1)
        np.testing.assert_array_equal(has, want)                        # left-out rows have no entries
        w = max(a["ids"].shape[1], b["ids"].shape[1])               # the widest row of each range differs

        def padded(x, fill):
            return np.pad(x[want], ((0, 0), (0, w - x.shape[1])), constant_values=fill)

        np.testing.assert_array_equal(padded(b["ids"], -1), padded(a["ids"], -1))
        np.testing.assert_array_equal(padded(b["probs"], 0), padded(a["probs"], 0))
        if encoding != "sampled":
            np.testing.assert_array_equal(b["tail"][want], a["tail"][want])
    dist = [k for k in full.stored_bytes() if k.startswith(("topk_", "dist/"))]
    assert sum(part.stored_bytes()[k] for k in dist) < sum(full.stored_bytes()[k] for k in dist)   # tiny: headers dominate


def test_the_loader_distils_only_the_chosen_rows_and_trains_ce_on_all(setup, tiny_teacher):
    from student_train import losses
    from student_train.data import CacheStream

    d, student = setup
    full = capture(d, tiny_teacher, "full-topk", "topk")
    part = capture(d, tiny_teacher, "part-topk", "topk", positions_from=str(student), keep_frac=0.25)
    a = next(iter(CacheStream(full, 32, 5, packing=False, shuffle=False, rank=0, world_size=1)))
    b = next(iter(CacheStream(part, 32, 5, packing=False, shuffle=False, rank=0, world_size=1)))
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    sel = torch.zeros_like(b["loss_mask"])
    for r in range(5):
        sid = part.samples.column("sample_id")[int(b["sample_index"][r, 0])].as_py()
        s = torch.from_numpy(part.sample(sid, [SELECTED])[SELECTED].astype(bool))
        n = int((b["document_ids"][r] != 0).sum())
        sel[r, :n] = s[:n]
    assert torch.equal(b["loss_mask"], a["loss_mask"] & sel) and 0 < int(sel.sum()) < int(a["loss_mask"].sum())
    m = b["loss_mask"]
    assert torch.equal(b["teacher"].ids[m], a["teacher"].ids[m])
    assert torch.equal(b["teacher"].logprobs[m], a["teacher"].logprobs[m])
    # the loss of the selected cache is the full cache's loss restricted to the chosen rows (value and gradient)
    z = torch.randn(*a["input_ids"].shape, 49152, dtype=torch.float64, requires_grad=True)
    got = losses.distillation_loss(z, b["teacher"].ids, b["teacher"].logprobs, b["loss_mask"])
    (g_got,) = torch.autograd.grad(got, z)
    want = losses.distillation_loss(z, a["teacher"].ids, a["teacher"].logprobs, m)
    (g_want,) = torch.autograd.grad(want, z)
    assert torch.allclose(got, want, rtol=1e-12) and torch.equal(g_got[~m], torch.zeros_like(g_got[~m]))
    assert torch.allclose(g_got, g_want, rtol=1e-10)


def test_inspect_reports_the_rows_kept(setup, tiny_teacher):
    from click.testing import CliRunner

    from logitcache.cli.main import cli

    d, student = setup
    part = capture(d, tiny_teacher, "part-topk", "topk", positions_from=str(student), keep_frac=0.25)
    r = CliRunner().invoke(cli, ["inspect", str(d / "part-topk"), "--json"], catch_exceptions=False)
    ts = json.loads(r.output)["token_stats"]
    n = sum(int(part.sample(s, [SELECTED])[SELECTED].sum()) for s in part.samples.column("sample_id").to_pylist())
    assert ts["rows_with_distribution"] == n and 0.2 < ts["rows_with_distribution_share"] < 0.5


def test_the_samples_table_records_the_rule_and_share_for_queries_and_selections(setup, tiny_teacher, tmp_path):
    from click.testing import CliRunner

    from logitcache.cli.main import cli

    d, student = setup
    part = capture(d, tiny_teacher, "part-topk", "topk", positions_from=str(student), keep_frac=0.25)
    kept = {sid: int(part.sample(sid, [SELECTED])[SELECTED].sum()) for sid in part.samples.column("sample_id").to_pylist()}
    r = CliRunner().invoke(cli, ["query", str(d / "part-topk"), "--json", "--no-persist",
                                 "SELECT sample_id, positions_rule, positions_kept FROM samples ORDER BY sample_id"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert {x["sample_id"]: x["positions_kept"] for x in rows} == kept
    assert {x["positions_rule"] for x in rows} == {"student-entropy"}
    # a selection copied out of the cache keeps the columns, the rows and the manifest's rule
    some = sorted(kept)[:3]
    ids = ", ".join(f"'{s}'" for s in some)
    r = CliRunner().invoke(cli, ["query", str(d / "part-topk"), "--no-persist", "--out", str(tmp_path / "sel.parquet"),
                                 f"SELECT sample_id FROM samples WHERE sample_id IN ({ids})"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["export", str(d / "part-topk"), str(tmp_path / "out"), "--selection",
                                 str(tmp_path / "sel.parquet")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = open_cache(str(tmp_path / "out"))
    assert out.manifest.positions == part.manifest.positions
    assert dict(zip(out.samples.column("sample_id").to_pylist(), out.samples.column("positions_kept").to_pylist())) \
        == {s: kept[s] for s in some}


def test_bad_positions_flags_are_refused(setup, tiny_teacher, tmp_path, smollm2_dir):
    d, student = setup
    job = dict(encoding="topk", teacher=str(tiny_teacher), backend="hf", mode="score", source=str(d / "t.jsonl"),
               progress=False)
    with pytest.raises(LogitcacheError, match="--keep-frac: chooses the rows --positions-from keeps"):
        run_capture(CaptureJob(cache=str(tmp_path / "a"), keep_frac=0.3, **job))
    with pytest.raises(LogitcacheError, match="--keep-frac: 1.5: must be in \\(0, 1\\]"):
        run_capture(CaptureJob(cache=str(tmp_path / "b"), positions_from=str(student), keep_frac=1.5, **job))
    other = other_model(tmp_path / "other", smollm2_dir, vocab=49152)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"<|im_end|>"', '"<|im_END|>"'))
    with pytest.raises(LogitcacheError, match="--positions-from .*: its tokenizer is not the teacher's"):
        run_capture(CaptureJob(cache=str(tmp_path / "c"), positions_from=str(other), **job))
    assert not (tmp_path / "c").exists()
