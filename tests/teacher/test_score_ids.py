"""Score inputs given as token ids (format 1.4, on-policy rounds): the cache holds exactly the given ids,
the behaviour policy's log-probs land on the rows that predict each response token, the teacher's
target log-probs equal a direct forward pass, every bad row is refused naming it, and the manifest's
``rollout`` pins one round per cache."""

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from logitcache import open_cache
from logitcache.format import FORMAT_VERSION, ConfigMismatchError, InputError, LogitcacheError, cache_fingerprint
from logitcache.format.arrays import BEHAVIOUR_LOGPROB, TARGET_LOGPROB, array_specs
from logitcache.teacher.capture import CaptureJob, run_capture
from logitcache.teacher.inputs import load_input
from logitcache.teacher.prepare import bad_id_rows, parse_row, validate_rows

V = 49152           # the tiny teacher's (SmolLM2's) vocabulary
IM_END = 2          # <|im_end|>: a special token inside a response is kept as is


def job(cache, teacher, **kw) -> CaptureJob:
    base = dict(cache=str(cache), teacher=str(teacher), progress=False, encoding="topk", top_k=8,
                samples_per_shard=3, backend="hf", mode="score")
    base.update(kw)
    return CaptureJob(**base)


def rollout_rows(seed: int = 0) -> list[dict]:
    """Rows as a student's sampler writes them: prompt ids, sampled response ids, and the sampler's
    log-prob of each response token; text columns beside them that the capture must not read."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, r in [(6, 9), (0, 5), (3, 12), (11, 1), (4, 7)]:
        response = rng.integers(3, V, r).tolist()
        if r > 2:
            response[-1] = IM_END
        rows.append(dict(prompt="not read", response="not read either", prompt_ids=rng.integers(3, V, p).tolist(),
                         response_ids=response, behaviour_logprobs=(-rng.random(r) * 4).round(6).tolist()))
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def direct_target_logprob(teacher, tokens: np.ndarray) -> np.ndarray:
    """(n - 1,) float32: log p(tokens[j+1] | tokens[:j+1]) from one plain forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.as_tensor(tokens, dtype=torch.long)[None]                    # (1, n)
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)               # (n, V)
        return logp[:-1].gather(-1, ids[0, 1:, None])[:, 0].numpy()              # (n - 1,)


def test_token_ids_are_stored_verbatim_with_behaviour_and_teacher_logprobs(tmp_path, tiny_teacher):
    rows = rollout_rows()
    src = write_jsonl(tmp_path / "round0.jsonl", rows)
    run_capture(job(tmp_path / "c", tiny_teacher, source=src))
    cache = open_cache(str(tmp_path / "c"), verify=True)
    m = cache.manifest
    assert m.format_version == FORMAT_VERSION and m.rollout is None
    assert m.inputs[0].columns == {r: r for r in ("prompt_ids", "response_ids", "behaviour_logprobs")}
    assert list(m.arrays).index(BEHAVIOUR_LOGPROB) == list(m.arrays).index(TARGET_LOGPROB) + 1
    recs = cache.samples.to_pylist()
    assert [r["row"] for r in recs] == list(range(len(rows)))
    for rec, row in zip(recs, rows):
        view = cache.sample_view(rec["sample_id"])
        p, r = len(row["prompt_ids"]), len(row["response_ids"])
        want = np.array(row["prompt_ids"] + row["response_ids"])
        assert view["tokens"].tolist() == want.tolist()                      # element by element, no re-tokenising
        assert (rec["prompt_tokens"], rec["response_tokens"], rec["finish_reason"]) == (p, r, "scored")
        assert (rec["scored_start"], rec["scored_end"]) == (max(p - 1, 0), p + r - 1)
        # behaviour: response token i at position p + i, its value at row p + i - 1; NaN elsewhere
        b = view[BEHAVIOUR_LOGPROB]
        assert b.dtype == np.float32 and b.shape == (p + r,)
        given = np.asarray(row["behaviour_logprobs"], np.float32)
        first = p - 1
        if first < 0:                                                        # no prompt: token 0 has no row
            given, first = given[1:], 0
        np.testing.assert_array_equal(b[first:first + len(given)], given)
        outside = np.ones(p + r, bool)
        outside[first:first + len(given)] = False
        assert np.isnan(b[outside]).all()
        # the teacher's log-prob of each stored next token equals a direct forward pass
        direct = direct_target_logprob(tiny_teacher, want)
        s0, s1 = rec["scored_start"], rec["scored_end"]
        np.testing.assert_allclose(view[TARGET_LOGPROB][s0:s1], direct[s0:s1], atol=1e-4, rtol=0)
        assert np.isnan(view[TARGET_LOGPROB][:s0]).all() and np.isnan(view[TARGET_LOGPROB][s1:]).all()
        # the samples table records the ids decoded (special tokens kept), not the text columns
        assert rec["response"] != "not read either" and rec["prompt"] != "not read"
        if row["response_ids"][-1] == IM_END:
            assert rec["response"].endswith("<|im_end|>")
        assert rec["prompt"] is None if p == 0 else isinstance(rec["prompt"], str)


def test_a_truncated_response_keeps_its_first_values(tmp_path, tiny_teacher):
    rng = np.random.default_rng(1)
    rows = [dict(prompt_ids=rng.integers(3, V, 5).tolist(), response_ids=rng.integers(3, V, 20).tolist(),
                 behaviour_logprobs=(-rng.random(20)).tolist()),
            dict(prompt_ids=rng.integers(3, V, 16).tolist(), response_ids=[7, 8], behaviour_logprobs=[-1.0, -2.0]),
            dict(prompt_ids=[5, 6], response_ids=[9, 10, 11], behaviour_logprobs=[-0.5, -0.25, 0.0])]
    src = write_jsonl(tmp_path / "long.jsonl", rows)
    run_capture(job(tmp_path / "t", tiny_teacher, source=src, max_length=16, truncate=True))
    cache = open_cache(str(tmp_path / "t"))
    recs = {r["row"]: r for r in cache.samples.to_pylist()}
    assert sorted(recs) == [0, 2]
    assert {s.row: s.reason for s in cache.manifest.skipped} == {1: "prompt alone fills the context (16 >= 16 tokens)"}
    rec, view = recs[0], cache.sample_view(recs[0]["sample_id"])
    assert (rec["num_tokens"], rec["response_tokens"], rec["finish_reason"]) == (16, 11, "truncated")
    assert view["tokens"].tolist() == rows[0]["prompt_ids"] + rows[0]["response_ids"][:11]
    b = view[BEHAVIOUR_LOGPROB]
    np.testing.assert_array_equal(b[4:15], np.asarray(rows[0]["behaviour_logprobs"][:11], np.float32))
    assert np.isnan(b[:4]).all() and np.isnan(b[15:]).all()
    np.testing.assert_array_equal(cache.sample_view(recs[2]["sample_id"])[BEHAVIOUR_LOGPROB],
                                  np.array([np.nan, -0.5, -0.25, 0.0, np.nan], np.float32))
    # without --truncate the long row is skipped, and recorded
    run_capture(job(tmp_path / "s", tiny_teacher, source=src, max_length=16))
    skipped = {s.row: s.reason for s in open_cache(str(tmp_path / "s")).manifest.skipped}
    assert skipped[0] == "longer than the context (25 > 16 tokens)"


GOOD = dict(prompt_ids=[5, 6, 7], response_ids=[8, 9], behaviour_logprobs=[-0.5, -1.5])
BAD_ROWS = [   # (row 2 of the file, the message)
    (dict(GOOD, response_ids=[8.0, 9.5]), r"response_ids\[1\] = 9.5 is not a token id \(an int\)"),
    (dict(GOOD, prompt_ids=[5, None]), r"prompt_ids must be a list of token ids \(ints\); it holds None"),
    (dict(GOOD, response_ids=[8, V]), rf"response_ids\[1\] = {V} is outside the tokenizer's vocabulary \[0, {V}\)"),
    (dict(GOOD, prompt_ids=[-1, 6]), rf"prompt_ids\[0\] = -1 is outside the tokenizer's vocabulary \[0, {V}\)"),
    (dict(GOOD, response_ids=[], behaviour_logprobs=[]), r"response_ids is empty: score mode needs at least one"),
    (dict(GOOD, response_ids=None), r"response_ids must be a list of token ids \(ints\), got NoneType"),
    (dict(GOOD, behaviour_logprobs=[-0.5]), r"behaviour_logprobs has 1 values for 2 response_ids"),
    (dict(GOOD, behaviour_logprobs=[-0.5, float("nan")]), r"behaviour_logprobs\[1\] = nan is not a log-probability"),
    (dict(GOOD, behaviour_logprobs=[float("-inf"), -1.0]), r"behaviour_logprobs\[0\] = -inf is not a log-probabil"),
    (dict(GOOD, behaviour_logprobs=[-0.5, 0.25]), r"behaviour_logprobs\[1\] = 0.25 is not a log-probability "
                                                  r"\(finite and <= 1e-06\)"),
    (dict(GOOD, behaviour_logprobs=[-0.5, None]), r"behaviour_logprobs must be a list of floats; it holds None"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS, ids=range(len(BAD_ROWS)))
def test_each_bad_row_is_refused_naming_file_and_row(tmp_path, bad, message):
    src = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(InputError, match=r"bad.jsonl, row 2: " + message):
        table = load_input(src, "train", {}, "score")
        validate_rows(table.table, table.source, "score", vocab_size=V)
    with pytest.raises(InputError, match=r"here: " + message):
        parse_row(bad, "score", "here", V)                      # what prepare_rows meets, row by row


def test_ids_of_every_row_as_text_are_refused_before_the_capture(tmp_path):
    src = write_jsonl(tmp_path / "text.jsonl", [dict(GOOD, prompt_ids="5 6 7")] * 3)
    table = load_input(src, "train", {}, "score")
    with pytest.raises(InputError, match=r"text.jsonl, row 0: prompt_ids must be a list of token ids \(ints\), got str"):
        validate_rows(table.table, table.source, "score", vocab_size=V)
    # what a JSON file cannot mix into one column, a Python caller (prepare_rows) may still pass
    for ids, held in (([5, [6]], r"\[6\]"), ([True, False], "True"), (["5"], "'5'"), ([2**70], "an int beyond 64 bits")):
        with pytest.raises(InputError, match=r"x: prompt_ids must be a list of token ids \(ints\); it holds " + held):
            parse_row(dict(GOOD, prompt_ids=ids), "score", "x", V)
    # whole floats (one row's float makes a JSON column float) are ids; the row with 9.5 is the one blamed
    assert parse_row(dict(GOOD, response_ids=[8.0, 9.0]), "score", "x", V).response_ids == [8, 9]


def test_a_bad_row_stops_the_capture_before_anything_is_written(tmp_path, tiny_teacher):
    src = write_jsonl(tmp_path / "bad.jsonl", [GOOD] * 7 + [dict(GOOD, response_ids=[8, V + 5])])
    with pytest.raises(InputError, match=rf"bad.jsonl, row 7: response_ids\[1\] = {V + 5} is outside the tokenizer's"):
        run_capture(job(tmp_path / "c", tiny_teacher, source=src, samples_per_shard=2))
    assert not (tmp_path / "c").exists()
    src = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello", "behaviour_logprobs": [-1.0]}])
    with pytest.raises(InputError, match=r"column 'behaviour_logprobs' needs the response as token ids"):
        run_capture(job(tmp_path / "c", tiny_teacher, source=src))


def test_column_checks_agree_with_the_row_parser_on_a_sliced_table():
    """``bad_id_rows`` (Arrow over whole columns) flags exactly the rows ``parse_row`` refuses, also on a
    table that starts inside its buffers (``--limit`` and shard slices)."""
    rng = np.random.default_rng(2)
    rows = []
    for _ in range(300):
        p, r = int(rng.integers(0, 5)), int(rng.integers(0, 5))
        row = dict(prompt_ids=rng.integers(0, 60, p).tolist(), response_ids=rng.integers(0, 60, r).tolist(),
                   behaviour_logprobs=(-rng.random(r)).tolist())
        kind = rng.integers(0, 8)
        if kind == 1 and r:
            row["behaviour_logprobs"][0] = 0.5
        elif kind == 2:
            row["behaviour_logprobs"] = row["behaviour_logprobs"][:-1] if r else [-1.0]
        elif kind == 3:
            row["prompt_ids"] = None
        elif kind == 4 and r:
            row["response_ids"][-1] = int(rng.choice([-3, 50, 64]))
        rows.append(row)
    table = pa.Table.from_pylist(rows).slice(37, 200)
    mask = bad_id_rows(table, vocab_size=50)
    assert mask is not None and mask.shape == (200,) and 0 < mask.sum() < 200

    def refused(values) -> bool:
        try:
            parse_row(values, "score", "x", 50)
            return False
        except InputError:
            return True

    assert mask.tolist() == [refused(v) for v in table.to_pylist()]
    assert bad_id_rows(pa.table({"response_ids": [[1.0, 2.0], [1.0, 2.5]]}), 50).tolist() == [False, True]
    assert bad_id_rows(pa.table({"response_ids": [["1"]]}), 50) is None      # not numbers: the row parser says why


def test_content_digest_covers_the_id_columns(tmp_path):
    import pyarrow.parquet as pq

    rows = rollout_rows()
    a = load_input(write_jsonl(tmp_path / "a.jsonl", rows), "train", {}, "score")
    rows[3]["response_ids"][0] += 1
    b = load_input(write_jsonl(tmp_path / "b.jsonl", rows), "train", {}, "score")
    rows[3]["response_ids"][0] -= 1
    rows[1]["behaviour_logprobs"][2] -= 0.125
    c = load_input(write_jsonl(tmp_path / "c.jsonl", rows), "train", {}, "score")
    assert len({a.content_digest(), b.content_digest(), c.content_digest()}) == 3
    # the same rows in parquet with narrower types hash the same
    narrow = a.table.cast(pa.schema([pa.field("prompt_ids", pa.list_(pa.int32())),
                                     pa.field("response_ids", pa.list_(pa.uint16())),
                                     pa.field("behaviour_logprobs", pa.list_(pa.float64()))]))
    pq.write_table(narrow, tmp_path / "a.parquet")
    assert load_input(str(tmp_path / "a.parquet"), "train", {}, "score").content_digest() == a.content_digest()
    assert a.content_digest() == load_input(str(tmp_path / "a.jsonl"), "train", {}, "score").content_digest()


def test_rollout_is_recorded_pins_one_round_per_cache_and_survives_export(tmp_path, tiny_teacher):
    from logitcache.query.export import export_selection
    from logitcache.query.selection import write_selection

    src = write_jsonl(tmp_path / "round.jsonl", rollout_rows())
    info = {"round": 0, "student_fingerprint": "sha256:" + "ab" * 32,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 12}, "generator": "hf"}
    run_capture(job(tmp_path / "c", tiny_teacher, source=src, rollout=info, limit=3))
    cache = open_cache(str(tmp_path / "c"))
    assert cache.manifest.rollout == info
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["rollout"] == info
    fp = cache_fingerprint(cache.manifest)
    assert cache_fingerprint(dataclasses.replace(cache.manifest, rollout=None)) != fp
    assert cache_fingerprint(dataclasses.replace(cache.manifest, rollout=dict(info, round=1))) != fp
    # the same cache, another round (or none): refused, naming the field
    with pytest.raises(ConfigMismatchError, match=r"was written with rollout.round = 0, but this run has 1"):
        run_capture(job(tmp_path / "c", tiny_teacher, source=src, rollout=dict(info, round=1)))
    with pytest.raises(ConfigMismatchError, match=r"was written with rollout = \{.*\}, but this run has None"):
        run_capture(job(tmp_path / "c", tiny_teacher, source=src, source_name="more"))
    # the same round resumes and adds rows
    run_capture(job(tmp_path / "c", tiny_teacher, source=src, rollout=info, source_name="more"))
    cache = open_cache(str(tmp_path / "c"), verify=True)
    assert cache.manifest.rollout == info and cache.manifest.num_samples == 3 + 5
    # an export keeps the round's record and the behaviour values
    pick = cache.samples.column("sample_id").to_pylist()[1:3]
    write_selection(pa.table({"sample_id": pick}), str(tmp_path / "sel.parquet"), cache, "hand made")
    export_selection(cache, str(tmp_path / "sel.parquet"), str(tmp_path / "x"))
    out = open_cache(str(tmp_path / "x"), verify=True)
    assert out.manifest.rollout == info and out.manifest.provenance.selection_count == 2
    for sid in pick:
        np.testing.assert_array_equal(out.sample(sid)[BEHAVIOUR_LOGPROB], cache.sample(sid)[BEHAVIOUR_LOGPROB])


def test_a_rollout_that_is_not_a_json_object_is_refused(tmp_path):
    for bad in ([1, 2], {"round": float("nan")}, {1: "int key"}, {"x": (1, 2)}):
        with pytest.raises(LogitcacheError, match=r"--rollout-info: the rollout record must be a JSON object"):
            run_capture(job(tmp_path / "c", "unused", rollout=bad))
    assert not (tmp_path / "c").exists()


def test_the_cli_records_rollout_info_and_refuses_a_bad_file(tmp_path, tiny_teacher):
    from click.testing import CliRunner

    from logitcache.cli.main import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    src = write_jsonl(tmp_path / "round.jsonl", rollout_rows()[:2])
    base = ("capture", tmp_path / "c", "--teacher", tiny_teacher, "--backend", "hf", "--mode", "score", "--input", src,
            "--encoding", "topk", "--top-k", 4, "--no-progress")
    for content, message in ((None, "no such file"), ("[1, 2]", "must hold a JSON object, not list"),
                             ("{nope", "not valid JSON")):
        path = tmp_path / "info.json"
        if content is not None:
            path.write_text(content)
        r = run(*base, "--rollout-info", path)
        assert r.exit_code == 1 and r.output.startswith(f"error: --rollout-info {path}: {message}"), r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "c").exists()
    (tmp_path / "info.json").write_text(json.dumps({"round": 3, "generator": "vllm"}))
    r = run(*base, "--rollout-info", tmp_path / "info.json", "--json")
    assert r.exit_code == 0, r.output
    assert open_cache(str(tmp_path / "c")).manifest.rollout == {"round": 3, "generator": "vllm"}
    r = run("inspect", tmp_path / "c", "--json")
    assert json.loads(r.stdout)["rollout"] == {"round": 3, "generator": "vllm"}


def test_array_specs_add_behaviour_only_when_asked():
    plain, with_b = array_specs(V, 4, "float16", [], 8, "bfloat16"), array_specs(V, 4, "float16", [1], 8, "bfloat16",
                                                                                 behaviour=True)
    assert BEHAVIOUR_LOGPROB not in plain
    names = list(with_b)
    assert names[names.index(TARGET_LOGPROB) + 1] == BEHAVIOUR_LOGPROB and names[-1] == "hidden/1"
    spec = with_b[BEHAVIOUR_LOGPROB]
    assert (spec.dtype, spec.row_shape, math.isnan(spec.fill)) == ("float32", (), True)
