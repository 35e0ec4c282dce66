import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from logitcache.format import FORMAT_VERSION, POSITIONS_COLUMNS, SAMPLE_COLUMNS, FormatError, Manifest, array_specs, sample_id
from logitcache.format.arrays import bf16_bits_to_float32, chunk_rows, float32_to_bf16_bits, id_dtype
from logitcache.format.manifest import (CaptureConfig, ConfigMismatchError, InputSpec, PartInfo, ShardRecord,
                                        SkipRecord, TeacherInfo, TokenizerInfo, check_same_header, manifest_checksum)

DOC = Path(__file__).resolve().parents[2] / "docs" / "format.md"


def make_manifest(**capture_overrides) -> Manifest:
    cap = dict(mode="score", top_k=8, logprob_dtype="float16", with_prompt=False, hidden_layers=[2],
               hidden_dtype="bfloat16", max_length=128, truncate=False, samples_per_shard=4)
    cap.update(capture_overrides)
    return Manifest(
        teacher=TeacherInfo("t", "/x", "", "sha256-edges:ab", "LlamaForCausalLM", 2, 32, 49152, 128, "float32", "hf"),
        tokenizer=TokenizerInfo(49152, "cd" * 32, 1, [2], 2, ""),
        capture=CaptureConfig(**cap),
        arrays=array_specs(49152, cap["top_k"], "float16", cap["hidden_layers"], 32, "bfloat16"),
        codecs={"tokens": {"codec": "zstd"}},
        inputs=[InputSpec("i0", "a.jsonl", "a.jsonl", "", {"text": "text"}, None, 10, 3)],
        shards=[ShardRecord("i0-000000", "i0", 0, 4, 100, 96, 1234, "sha256:00", 0)],
        skipped=[SkipRecord("i0", 3, "abc", "empty text")],
        part=PartInfo(0, 1, True),
    )


def test_manifest_round_trips_through_json():
    m = make_manifest()
    back = Manifest.from_json(m.to_json())
    assert back.to_dict() == m.to_dict()
    assert back.arrays["topk_logprobs"].row_shape == (8,)
    assert np.isnan(back.arrays["entropy"].fill)
    assert json.loads(m.to_json())["totals"] == {"samples": 4, "tokens": 100, "bytes": 1234, "skipped": 1}


def test_reader_refuses_unknown_major_and_accepts_newer_minor():
    d = make_manifest().to_dict()
    d["format_version"] = "2.0"
    with pytest.raises(FormatError, match=r"format_version 2.0 is not readable by this logitcache \(reads 1.x\)"):
        Manifest.from_dict(d)
    d["format_version"] = "1.7"
    d["a_field_from_the_future"] = {"x": 1}
    d["teacher"]["new_teacher_field"] = 3
    d["checksum"] = manifest_checksum(d)     # as the newer release that wrote it would
    assert Manifest.from_dict(d).format_version == "1.7"


def test_manifest_errors_name_the_problem():
    d = make_manifest().to_dict()
    del d["teacher"]["fingerprint"]
    with pytest.raises(FormatError, match=r"teacher: missing field 'fingerprint'"):
        Manifest.from_dict(resign(d))
    with pytest.raises(FormatError, match="not valid JSON"):
        Manifest.from_json("{nope")
    with pytest.raises(FormatError, match="not a logitcache manifest"):
        Manifest.from_dict({"format": "other"})


def test_header_mismatch_names_the_field():
    with pytest.raises(ConfigMismatchError, match=r"capture.top_k = 8, but this run has 16"):
        check_same_header(make_manifest(), make_manifest(top_k=16), "cache")
    check_same_header(make_manifest(), make_manifest(), "cache")  # identical: no error


def test_id_dtype_is_the_narrowest_that_holds_the_vocabulary():
    assert id_dtype(256) == "uint8"
    assert id_dtype(257) == "uint16"
    assert id_dtype(65536) == "uint16"
    assert id_dtype(65537) == "uint32"
    assert id_dtype(151936) == "uint32"


def test_bfloat16_bits_round_trip_and_round_to_nearest_even():
    import torch

    x = np.array([0.0, -1.5, 3.140625, 1e-30, 65504.0, np.inf, -np.inf, 1.00390625, 1.01171875], dtype=np.float32)
    bits = float32_to_bf16_bits(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, ref)  # same rounding as torch
    np.testing.assert_array_equal(bf16_bits_to_float32(bits), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_chunk_rows_aims_at_one_mebibyte():
    specs = array_specs(49152, 64, "float16", [3], 576, "bfloat16")
    assert chunk_rows(specs["topk_ids"]) == 8192            # 64 x 2 bytes per row
    assert chunk_rows(specs["tokens"]) == 65536             # capped
    assert chunk_rows(specs["hidden/3"]) == 1024            # 576 x 2 bytes: floor at 1024 rows


def test_sample_id_depends_on_data_identity_only():
    a = sample_id("data.jsonl", "", 7, 0)
    assert a == sample_id("data.jsonl", "", 7, 0)
    assert len(a) == 16 and re.fullmatch(r"[0-9a-f]{16}", a)
    assert len({a, sample_id("data.jsonl", "", 8, 0), sample_id("data.jsonl", "", 7, 1),
                sample_id("other.jsonl", "", 7, 0), sample_id("data.jsonl", "test", 7, 0)}) == 5
    assert a == "d3ef15d094d2dce9"  # pinned: changing the derivation breaks joins across caches


def test_docs_format_md_lists_every_column_array_and_the_version():
    doc = DOC.read_text()
    assert f"format_version: `{FORMAT_VERSION}`" in doc or f'"format_version": "{FORMAT_VERSION}"' in doc
    for name, _, _ in SAMPLE_COLUMNS + POSITIONS_COLUMNS:
        assert re.search(rf"^\| `{name}` \|", doc, re.M), f"docs/format.md lacks samples column {name}"
    for name in array_specs(49152, 4, "float16", [1], 8, "bfloat16"):
        shown = "hidden/<layer>" if name.startswith("hidden/") else name
        assert f"| `{shown}` |" in doc, f"docs/format.md lacks array {shown}"


# ---- the manifest protects itself (format 1.3) ------------------------------------------------------

def resign(d: dict) -> dict:
    d["checksum"] = manifest_checksum(d)
    return d


def complete_manifest() -> dict:
    m = make_manifest()
    m.part, m.complete = None, True
    m.inputs[0].num_shards = 2
    m.shards = [ShardRecord(f"i0-{j:06d}", "i0", j, 4, 100, 96, 1234, "sha256:00", 0) for j in range(2)]
    return m.to_dict()


def test_a_manifest_edited_after_it_was_written_is_refused():
    d = complete_manifest()
    assert d["checksum"] == manifest_checksum(d) and Manifest.from_dict(d).complete
    edits = [("capture", lambda d: d["capture"].update(encoding={"name": "compact", "top_p": 0.99, "bits": 8,
                                                                  "lo": -8.0})),
             ("shard tokens", lambda d: d["shards"][0].update(tokens=99)),
             ("dropped shard", lambda d: d["shards"].pop()),
             ("derived path", lambda d: d.update(derived=[{"name": "tokens", "params": {}, "columns": [],
                                                           "cache_fingerprint": "x", "files": []}]))]
    for what, edit in edits:
        e = json.loads(json.dumps(d))
        edit(e)
        with pytest.raises(FormatError, match=r"manifest.json: checksum 'sha256:\w+' does not match its content"):
            Manifest.from_dict(e)
    del d["checksum"]
    with pytest.raises(FormatError, match=r"has no checksum \(required from format 1.3 on\)"):
        Manifest.from_dict(d)
    d["format_version"] = "1.2"        # manifests of earlier versions have none
    assert Manifest.from_dict(d).num_samples == 8


INCONSISTENT = [      # records that contradict each other or the plan
    (lambda d: d["shards"].append(dict(d["shards"][0])), r"shard 'i0-000000' is listed twice \(records 0 and 2\)"),
    (lambda d: d["shards"].pop(), r"marked complete but 1 planned shard\(s\) are not listed \(first: i0-000001\)"),
    (lambda d: d["shards"][0].update(tokens=101), r"totals.tokens is 200 but the shard records add up to 201"),
    (lambda d: d["shards"][0].update(samples=-1), r"shard 'i0-000000': samples -1 is not a count"),
    (lambda d: d["shards"][1].update(index=0), r"shard 'i0-000001' does not match its input key and index"),
    (lambda d: d["shards"][0].update(input_key="i9", name="i9-000000"),
     r"shard 'i9-000000' belongs to input 'i9', which the manifest does not list"),
    (lambda d: d["shards"][1].update(index=7, name="i0-000007"),
     r"shard 'i0-000007': index 7 is beyond the 2 shard\(s\) planned for input 'i0'"),
]
ESCAPING = [          # names that would leave the cache
    (lambda d: d["inputs"][0].update(key="../../victim"), r"input key '\.\./\.\./victim' is not a valid input key"),
    (lambda d: d["shards"][0].update(input_key="../x", name="../x-000000"), r"input key '\.\./x' is not a valid"),
    (lambda d: d.update(derived=[{"name": "tokens", "params": {}, "columns": [], "cache_fingerprint": "x",
                                  "files": [{"path": "../victim", "rows": 1, "bytes": 1, "checksum": "x"}]}]),
     r"derived file '\.\./victim' is not a valid derived file"),
    (lambda d: d.update(derived=[{"name": "tokens", "params": {}, "columns": [], "cache_fingerprint": "x",
                                  "files": [{"path": "derived/../../victim", "rows": 1, "bytes": 1,
                                             "checksum": "x"}]}]), r"is not a (valid derived file|plain relative)"),
    (lambda d: d["arrays"].update({"../../x": d["arrays"]["tokens"]}), r"array name '\.\./\.\./x' is not a valid"),
    (lambda d: d.update(provenance={"source_cache": "c", "source_fingerprint": "f", "selection_query": "q",
                                    "selection_count": 1, "source_shards": {"i0-000000": "/etc/x-000001"}}),
     r"shard name '/etc/x-000001' is not a valid shard name"),
]


@pytest.mark.parametrize("edit, message", INCONSISTENT + ESCAPING)
def test_inconsistent_records_and_escaping_names_are_refused_even_with_a_valid_checksum(edit, message):
    d = complete_manifest()
    edit(d)
    with pytest.raises(FormatError, match=message):
        Manifest.from_dict(resign(d))


def test_fingerprint_covers_what_decides_a_decoded_value():
    from logitcache.format import cache_fingerprint

    base = Manifest.from_dict(complete_manifest())
    fp = cache_fingerprint(base)
    for change in (lambda m: m.capture.encoding.update(name="compact", top_p=0.99, bits=8, lo=-8.0),
                   lambda m: m.arrays.update({"hidden/2": dataclasses.replace(m.arrays["hidden/2"], dtype="float16")})):
        m = Manifest.from_dict(complete_manifest())
        change(m)
        assert cache_fingerprint(m) != fp
        assert cache_fingerprint(m, recipe=1) == cache_fingerprint(base, recipe=1)   # what 1.2 missed


# ---- on-policy rounds (format 1.4) ------------------------------------------------------------------

ROLLOUT = {"round": 2, "student_fingerprint": "sha256:" + "ef" * 32, "sampling": {"temperature": 1.0, "top_p": 0.95},
           "generator": "vllm"}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "caches"
# fingerprints of committed fixtures as releases before 1.4 computed them: a later version must keep them
FIXTURE_FINGERPRINTS = {
    "v1.0-topk": "sha256:636edeff92f8681cd799bfb467ba4f630dd737789017fac53b0b111049f0cdcc",
    "v1.2-topk": "sha256:e54bad7d75b1bf00ec29bc0e9a1efd3197cd19be36bd99c3cb9bd562d1b08610",
    "v1.3-compact": "sha256:a3d5f7b8cb3160070cd6efda63373a4d966d50afcfdc740b4e8e0a83ef547214",
}


def test_imported_from_round_trips_and_is_written_only_when_present():
    from logitcache.format.manifest import Provenance

    m = make_manifest()
    m.provenance = Provenance("src", "sha256:x", "q", 3)
    assert "imported_from" not in m.to_dict()["provenance"]            # an export's provenance reads as 1.5's
    assert Manifest.from_json(m.to_json()).provenance.imported_from is None
    m.provenance = Provenance("data/", "", "", 3, imported_from={"format": "distillkit", "files": ["data_0.parquet"]})
    back = Manifest.from_json(m.to_json())
    assert back.provenance.imported_from == {"format": "distillkit", "files": ["data_0.parquet"]}
    assert back.to_dict() == m.to_dict()


def test_rollout_round_trips_and_is_written_only_when_present():
    from logitcache.format.version import MINOR_ADDITIONS

    assert FORMAT_VERSION == "1.6" and "behaviour_logprob" in MINOR_ADDITIONS["1.4"] and "attn/" in MINOR_ADDITIONS["1.5"]
    assert "selected" in MINOR_ADDITIONS["1.6"]
    assert "imported_from" in MINOR_ADDITIONS["1.6"]
    plain = make_manifest()
    assert plain.rollout is None and "rollout" not in plain.to_dict() and "rollout" not in plain.header()
    m = make_manifest()
    m.rollout = ROLLOUT
    back = Manifest.from_json(m.to_json())
    assert back.rollout == ROLLOUT and back.to_dict() == m.to_dict() and back.header()["rollout"] == ROLLOUT
    d = m.to_dict()
    d["rollout"] = [1, 2]
    with pytest.raises(FormatError, match=r"manifest.json: rollout must be a JSON object, got list"):
        Manifest.from_dict(resign(d))


def test_another_rollout_is_another_cache():
    a, b = make_manifest(), make_manifest()
    a.rollout, b.rollout = ROLLOUT, dict(ROLLOUT, round=3)
    with pytest.raises(ConfigMismatchError, match=r"written with rollout.round = 2, but this run has 3"):
        check_same_header(a, b, "cache")
    with pytest.raises(ConfigMismatchError, match=r"written with rollout = None, but this run has \{'round': 2"):
        check_same_header(make_manifest(), a, "cache")
    check_same_header(a, dataclasses.replace(b, rollout=dict(ROLLOUT)), "cache")


def test_fingerprint_covers_rollout_only_when_present():
    from logitcache import open_cache
    from logitcache.format import cache_fingerprint
    from tests.format.conformance import docs_block

    for name, fp in FIXTURE_FINGERPRINTS.items():
        m = open_cache(str(FIXTURES / name)).manifest
        assert m.rollout is None and cache_fingerprint(m) == fp, name
    base = Manifest.from_dict(complete_manifest())
    with_round = dataclasses.replace(base, rollout=ROLLOUT)
    fps = {cache_fingerprint(base), cache_fingerprint(with_round),
           cache_fingerprint(dataclasses.replace(base, rollout=dict(ROLLOUT, round=3)))}
    assert len(fps) == 3
    ns = {}
    exec(docs_block("def cache_fingerprint(manifest"), ns)        # docs/format.md's recipe, as written
    for m in (base, with_round):
        assert ns["cache_fingerprint"](json.loads(m.to_json())) == cache_fingerprint(m)
