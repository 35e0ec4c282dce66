"""capture --encoding (format 1.2) on a tiny random Llama: what each encoding stores against a direct
full-vocabulary computation, the estimators' statistics over captured draws, zarr-only reading,
the loader's batches, training and its exact metrics, and the bad inputs. What every encoding must
do (round trip, docs reader, loader, losses, export, training) is the conformance class,
tests/format/conformance.py."""

import json

import numpy as np
import pytest
import torch
import zarr

from logitcache import open_cache
from logitcache.format import FORMAT_VERSION, LogitcacheError
from logitcache.format.encodings import encoding_from, resolve_encoding
from logitcache.format.encodings import EncodingError, max_abs_error
from logitcache.teacher.capture import CaptureJob, run_capture
from tests.conftest import assert_caches_equal
from tests.teacher.estimators import assert_same_draws, direct_logp, hybrid_z, sampled_z, scored_rows

FP16_ATOL, FP16_RTOL = 2e-3, 1e-3


def job(cache, teacher, **kw) -> CaptureJob:
    base = dict(cache=str(cache), teacher=str(teacher), progress=False, samples_per_shard=3, backend="hf",
                mode="score", batch_tokens=64)
    base.update(kw)
    return CaptureJob(**base)


@pytest.fixture(scope="module")
def tiny_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()


@pytest.mark.parametrize("encoding", ["adaptive", "compact"])
def test_bucket_encodings_store_the_most_probable_ids_and_the_exact_tail(tmp_path, tiny_teacher, tiny_model, text_file,
                                                                          encoding):
    top_p = 0.9
    run_capture(job(tmp_path / "c", tiny_teacher, source=str(text_file), encoding=encoding, top_k=16, keep_mass=top_p))
    cache = open_cache(str(tmp_path / "c"), verify=True)
    enc = cache.manifest.capture.encoding
    assert enc["name"] == encoding and cache.manifest.format_version == FORMAT_VERSION
    assert "topk_ids" not in cache.manifest.arrays and cache.manifest.arrays["dist/ids"].index == "dist/counts"
    bound = max_abs_error(enc["bits"], enc["lo"]) + 1e-4 if encoding == "compact" else None
    checked = 0
    for rec, a, logp in scored_rows(cache, tiny_model):
        s, e = rec["scored_start"], rec["scored_end"]
        assert (a["dist/counts"][:s] == 0).all() and (a["dist/counts"][e:] == 0).all()
        rows = encoding_from(enc).decode(a, 49152).rows(s, e)
        off = rows.offsets
        for t in range(e - s):
            ids, lp = rows.ids[off[t]:off[t + 1]], rows.logprobs[off[t]:off[t + 1]].astype(np.float64)
            want = logp[s + t, ids]
            if bound is None:
                np.testing.assert_allclose(lp, want, atol=FP16_ATOL, rtol=FP16_RTOL)
            else:
                assert np.abs(lp - want).max() <= bound
            # the stored ids are the most probable ones, as many as the mass needs (up to ties / rounding)
            srt = np.sort(logp[s + t])[::-1]
            assert want.min() >= srt[len(ids) - 1] - 1e-6
            mass = np.cumsum(np.exp(srt))
            n_need = min(int((mass < top_p).sum()) + 1, 16)
            assert abs(len(ids) - n_need) <= 1 and (len(ids) == n_need or abs(mass[min(len(ids), n_need) - 1] - top_p) < 1e-4)
            tail = 1.0 - np.exp(want).sum()
            assert rows.tail[t] == pytest.approx(tail, rel=1e-4, abs=1e-6)
            checked += 1
    assert checked > 50


def test_sampled_capture_draws_from_the_teacher_unbiased(tmp_path, tiny_teacher, tiny_model, text_file):
    n = 64
    run_capture(job(tmp_path / "c", tiny_teacher, source=str(text_file), encoding="sampled", draws=n))
    cache = open_cache(str(tmp_path / "c"), verify=True)
    assert cache.manifest.capture.encoding == {"name": "sampled", "draws": 64, "temperature": 1.0}
    z, rows = sampled_z(cache, tiny_model)
    assert rows > 50 and abs(z) < 4.5
    # the draws are seeded: capturing again gives the very same cache
    run_capture(job(tmp_path / "again", tiny_teacher, source=str(text_file), encoding="sampled", draws=n))
    assert_caches_equal(cache, open_cache(str(tmp_path / "again")))
    # and keyed by sample and position: other batches and shards draw the same ids for every sample
    run_capture(job(tmp_path / "other", tiny_teacher, source=str(text_file), encoding="sampled", draws=n,
                    batch_tokens=4096, samples_per_shard=2))
    other = open_cache(str(tmp_path / "other"))
    assert len(other.manifest.shards) != len(cache.manifest.shards)
    assert_same_draws(cache, other, ("dist/counts", "dist/ids", "dist/draw_counts"))


def test_hybrid_capture_head_exact_tail_drawn_outside_it(tmp_path, tiny_teacher, tiny_model, text_file):
    run_capture(job(tmp_path / "c", tiny_teacher, source=str(text_file), encoding="hybrid", top_k=4, draws=32))
    z, rows = hybrid_z(open_cache(str(tmp_path / "c"), verify=True), tiny_model, top_k=4, head_atol=1e-6)
    assert rows > 20 and abs(z) < 4.5


def test_full_capture_holds_every_value_and_reads_with_zarr_alone(tmp_path, tiny_teacher, tiny_model, text_file):
    run_capture(job(tmp_path / "c", tiny_teacher, source=str(text_file), encoding="full", top_k=4, limit=3))
    cache = open_cache(str(tmp_path / "c"), verify=True)
    assert cache.manifest.capture.samples_per_shard == 3
    for rec, a, logp in scored_rows(cache, tiny_model):
        s, e = rec["scored_start"], rec["scored_end"]
        np.testing.assert_allclose(a["dist/full_logprobs"][s:e].astype(np.float64), logp[s:e], atol=FP16_ATOL,
                                   rtol=FP16_RTOL)
        assert np.isnan(a["dist/full_logprobs"][e:]).all()
    # and a ragged cache through zarr + the manifest alone: entries located by the index array
    run_capture(job(tmp_path / "r", tiny_teacher, source=str(text_file), encoding="adaptive", top_k=8))
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["capture"]["encoding"] == {"name": "adaptive", "top_p": 0.99}
    assert m["arrays"]["dist/logprobs"]["index"] == "dist/counts"
    shard = m["shards"][0]["name"]
    g = zarr.open_group(str(tmp_path / "r" / "shards" / shard / "arrays.zarr"), mode="r")
    counts = g["dist/counts"][...].astype(np.int64)
    assert g["dist/ids"].shape[0] == g["dist/logprobs"].shape[0] == counts.sum() and len(counts) == m["shards"][0]["tokens"]
    assert g["dist/ids"].metadata.dimension_names == ("entry",)
    ours = open_cache(str(tmp_path / "r")).read_rows(shard, 5, 9, ["dist/ids"])["dist/ids"]
    o = np.concatenate([[0], np.cumsum(counts)])
    np.testing.assert_array_equal(ours, g["dist/ids"][o[5]:o[9]])


def test_generated_responses_do_not_depend_on_the_encoding(tmp_path, tiny_teacher):
    kw = dict(mode="generate", limit=4, max_new_tokens=6, samples_per_shard=4)
    run_capture(job(tmp_path / "a", tiny_teacher, encoding="topk", **kw))
    run_capture(job(tmp_path / "b", tiny_teacher, encoding="hybrid", **kw))
    a, b = open_cache(str(tmp_path / "a")), open_cache(str(tmp_path / "b"))
    for rec in a.samples.to_pylist():
        np.testing.assert_array_equal(a.sample(rec["sample_id"])["tokens"], b.sample(rec["sample_id"])["tokens"])
        np.testing.assert_array_equal(a.sample(rec["sample_id"])["entropy"], b.sample(rec["sample_id"])["entropy"])


def test_loader_pads_ragged_rows_and_training_reports_the_exact_kl(tmp_path, tiny_teacher, text_file):
    from transformers import AutoModelForCausalLM

    from student_train.config import TrainConfig
    from student_train.data import CacheStream
    from student_train.train import train

    run_capture(job(tmp_path / "c", tiny_teacher, source=str(text_file), encoding="compact", top_k=8))
    run_capture(job(tmp_path / "e", tiny_teacher, source=str(text_file), encoding="full", top_k=4, limit=3))
    cache = open_cache(str(tmp_path / "c"))
    stream = CacheStream(cache, seq_len=32, batch_size=2, shuffle=False, prefetch=0)
    batch = next(iter(stream))
    teacher = batch["teacher"]
    assert teacher.ids.shape[-1] == 8 and teacher.tail is not None
    m = batch["loss_mask"]
    ids, lp = teacher.ids[m], teacher.logprobs[m]
    assert ((ids == -1) == torch.isinf(lp)).all() and (ids[:, 0] >= 0).all()
    d = encoding_from(cache.manifest.capture.encoding).decode(cache.sample(0), 49152)
    rec = cache.samples.to_pylist()[0]
    want_ids, want_lp = d.rows(rec["scored_start"], rec["scored_end"]).padded(8)
    row0 = batch["sample_index"][0] == 0
    np.testing.assert_array_equal(teacher.ids[0][row0 & m[0]].numpy(), want_ids)
    np.testing.assert_array_equal(teacher.logprobs[0][row0 & m[0]].numpy(), want_lp)

    cfg = TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "run"), student=str(tiny_teacher), seq_len=32,
                      batch_size=2, max_steps=2, warmup_steps=1, eval_cache=str(tmp_path / "e"), save_every=100)
    report = train(cfg, progress=False)
    end = report["eval_end"]
    assert report["eval_samples"] == 3 and report["train_samples"] == 8
    # the exact KL against a direct computation: the trained student, the teacher, the evaluation tokens
    student = AutoModelForCausalLM.from_pretrained(report["student_dir"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    ev = open_cache(str(tmp_path / "e"))
    fwd = rev = count = 0.0
    for rec in ev.samples.to_pylist():
        toks = ev.sample(rec["sample_id"])["tokens"]
        s, e = rec["scored_start"], rec["scored_end"]
        lp_t = torch.tensor(direct_logp(teacher, toks)[s:e])
        lp_s = torch.tensor(direct_logp(student, toks)[s:e])
        fwd += float((lp_t.exp() * (lp_t - lp_s)).sum())
        rev += float((lp_s.exp() * (lp_s - lp_t)).sum())
        count += e - s
    assert end["tokens"] == count
    assert end["kl_forward_exact"] == pytest.approx(fwd / count, rel=2e-3, abs=2e-3)   # fp16-stored teacher
    assert end["kl_reverse_exact"] == pytest.approx(rev / count, rel=2e-3, abs=2e-3)


def test_estimated_caches_refuse_other_divergences(tmp_path, tiny_teacher, text_file):
    from student_train.config import TrainConfig
    from student_train.train import train

    run_capture(job(tmp_path / "c", tiny_teacher, source=str(text_file), encoding="sampled", draws=8, limit=3))
    cfg = TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "run"), student=str(tiny_teacher), seq_len=32,
                      batch_size=2, max_steps=1, loss="reverse_kl")
    with pytest.raises(LogitcacheError, match="sampled cache: it supports --loss forward_kl"):
        train(cfg, progress=False)


@pytest.mark.parametrize("kw, message", [
    (dict(encoding="adaptive", bits=8), "--bits applies to --encoding compact/hybrid, not adaptive"),
    (dict(encoding="sampled", proposal_temperature=0.5), "--proposal-temperature must be >= 1"),
    (dict(encoding="compact", keep_mass=1.5), "--keep-mass must be in"),
    (dict(encoding="full", samples_per_shard=100), "too many for --encoding full"),
    (dict(encoding="zip"), "'zip' is not one of"),
])
def test_bad_encoding_flags_are_refused_before_anything_is_written(tmp_path, tiny_teacher, text_file, kw, message):
    with pytest.raises(LogitcacheError, match=message):
        run_capture(job(tmp_path / "c", tiny_teacher, source=str(text_file), **kw))
    assert not (tmp_path / "c").exists()


def test_the_default_encoding_is_compact():
    """Chosen from benchmarks/results/distillation_quality.md: ~70 B/token, held-out KL within seed noise
    of lossless top-128, every divergence, every backend."""
    from click.testing import CliRunner

    from logitcache.cli.capture import capture

    assert CaptureJob(cache="x").encoding == "compact"
    assert "[default: compact]" in CliRunner().invoke(capture, ["--help"]).output.replace("\n", " ")


def test_resolve_encoding_fills_defaults():
    assert resolve_encoding("compact") == {"name": "compact", "top_p": 0.99, "bits": 8, "lo": -16.0}
    assert resolve_encoding("hybrid", draws=16)["draws"] == 16
    with pytest.raises(EncodingError, match="--draws applies to --encoding sampled/hybrid, not topk"):
        resolve_encoding("topk", draws=3)
