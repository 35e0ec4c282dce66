"""capture --attention-layers (format 1.5): the stored post-rotary queries and keys rebuild the teacher's
own attention probabilities (transformers' output_attentions, eager attention) within the storage dtype,
in score and generate mode; the arrays are in the manifest; vLLM refuses it naming the alternative."""

import json

import numpy as np
import pytest
import torch

from logitcache import open_cache
from logitcache.format import FORMAT_VERSION, LogitcacheError
from logitcache.format.arrays import attention_layers
from logitcache.teacher.capture import CaptureJob, run_capture, validate
from student_train.attention_loss import rebuild_attention


@pytest.fixture(scope="module")
def eager_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32, attn_implementation="eager").eval()


def attentions(model, tokens):
    with torch.no_grad():
        out = model(torch.tensor([tokens.astype(np.int64).tolist()]), output_attentions=True)
    return [a[0].double() for a in out.attentions]                     # per block: (heads, t, t)


@pytest.mark.parametrize("mode, dtype, tol", [("score", "float32", 1e-5), ("score", "bfloat16", 0.03),
                                              ("generate", "float32", 1e-5)])
def test_stored_queries_and_keys_rebuild_the_teachers_attention(tmp_path, tiny_teacher, eager_model, text_file, mode,
                                                                dtype, tol):
    source = text_file
    if mode == "generate":
        source = tmp_path / "p.jsonl"
        source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Hi there", "Name a color", "2+2?"]))
    run_capture(CaptureJob(cache=str(tmp_path / "c"), teacher=str(tiny_teacher), backend="hf", mode=mode,
                           source=str(source), progress=False, encoding="topk", top_k=4, attention_layers=[0, -1],
                           hidden_dtype=dtype, max_new_tokens=6, samples_per_shard=2, batch_tokens=64))
    cache = open_cache(str(tmp_path / "c"), verify=True)
    m = cache.manifest
    assert m.format_version == FORMAT_VERSION == "1.6" and attention_layers(m.arrays) == [0, 1]
    assert m.arrays["attn/1_q"].row_shape == (4, 8) and m.arrays["attn/1_k"].row_shape == (2, 8)
    checked = 0
    for rec in cache.samples.to_pylist():
        a = cache.sample(rec["sample_id"])
        # generate mode: the last generated token was fed too (its queries and keys are stored)
        want = attentions(eager_model, a["tokens"])
        for block in (0, 1):
            got = rebuild_attention(torch.from_numpy(a[f"attn/{block}_q"]), torch.from_numpy(a[f"attn/{block}_k"]))
            assert got.shape == want[block].shape
            assert (got - want[block]).abs().max().item() <= tol, f"{mode} sample {rec['row']} block {block}"
            checked += 1
    assert checked >= 6


def test_the_vllm_backend_refuses_attention_layers_naming_the_alternative(tmp_path):
    with pytest.raises(LogitcacheError, match="--attention-layers: the vllm backend does not capture .* --backend hf"):
        validate(CaptureJob(cache=str(tmp_path / "c"), backend="vllm", attention_layers=[0]))
    assert not (tmp_path / "c").exists()


def test_a_block_out_of_range_is_refused_before_anything_is_written(tmp_path, tiny_teacher, text_file):
    with pytest.raises(LogitcacheError, match="--attention-layers: block 2 is out of range .* 2 decoder blocks"):
        run_capture(CaptureJob(cache=str(tmp_path / "c"), teacher=str(tiny_teacher), backend="hf", mode="score",
                               source=str(text_file), progress=False, attention_layers=[2]))
    assert not (tmp_path / "c").exists()


def test_the_docs_numpy_reader_rebuilds_the_same_attention(tmp_path, tiny_teacher, text_file):
    from tests.format.conformance import docs_block, run_docs_reader

    run_capture(CaptureJob(cache=str(tmp_path / "c"), teacher=str(tiny_teacher), backend="hf", mode="score",
                           source=str(text_file), progress=False, encoding="topk", top_k=4, attention_layers=[1],
                           limit=2))
    ns = run_docs_reader(str(tmp_path / "c"), distribution=False)
    exec(docs_block("def attention("), ns)
    got = ns["attention"](ns["g"], ns["s"], 1)
    a = open_cache(str(tmp_path / "c")).sample(ns["s"]["sample_id"])
    want = rebuild_attention(torch.from_numpy(a["attn/1_q"]), torch.from_numpy(a["attn/1_k"])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_stored_bytes_count_the_attention_arrays(tmp_path, tiny_teacher, text_file):
    run_capture(CaptureJob(cache=str(tmp_path / "c"), teacher=str(tiny_teacher), backend="hf", mode="score",
                           source=str(text_file), progress=False, encoding="topk", top_k=4, attention_layers=[1]))
    stored = open_cache(str(tmp_path / "c")).stored_bytes()
    files = sum(f.stat().st_size for f in (tmp_path / "c" / "shards").rglob("*") if f.is_file() and "/attn/1_q/" in str(f))
    assert stored["attn/1_q"] == files > 0 and stored["attn/1_k"] > 0


def test_export_keeps_the_attention_arrays_element_by_element(tmp_path, tiny_teacher, text_file):
    import pyarrow as pa

    from logitcache.query.export import export_selection
    from logitcache.query.selection import write_selection

    run_capture(CaptureJob(cache=str(tmp_path / "c"), teacher=str(tiny_teacher), backend="hf", mode="score",
                           source=str(text_file), progress=False, encoding="topk", top_k=4, attention_layers=[1],
                           samples_per_shard=2))
    cache = open_cache(str(tmp_path / "c"))
    ids = cache.samples.column("sample_id").to_pylist()[1::2]
    write_selection(pa.table({"sample_id": ids}), str(tmp_path / "sel.parquet"), cache, "every other sample")
    export_selection(cache, str(tmp_path / "sel.parquet"), str(tmp_path / "e"))
    exported = open_cache(str(tmp_path / "e"), verify=True)
    assert exported.samples.column("sample_id").to_pylist() == ids
    for sid in ids:
        for name in ("attn/1_q", "attn/1_k"):
            np.testing.assert_array_equal(exported.sample(sid)[name], cache.sample(sid)[name])
