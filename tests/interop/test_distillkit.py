"""DistillKit both ways, beyond the conformance class: the exported directory is DistillKit's capture
layout (and loads with `datasets` as its trainer loads it), ragged and unscored rows are completed as
documented, and the import reads files written the way DistillKit's capture writes them (no labels, no
record of ours), refusing damaged ones with the file and the row."""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from logitcache import open_cache
from logitcache.format.errors import LogitcacheError
from logitcache.format.samples import sample_id
from logitcache.interop import export_to, import_from
from logitcache.interop.distillkit import missing_ids
from logitcache.interop.distillkit_codec import CompressionConfig, compress_logprobs, pack_bits

from tests.interop.conformance import ours, record_ids
from tests.interop.conftest import VOCAB, fixture

DK_SCHEMA = pa.schema([("input_ids", pa.list_(pa.uint64())), ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                       ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])      # sample_common.py's


def test_the_export_is_distillkits_capture_layout_and_loads_with_datasets(tmp_path):
    import datasets

    report = export_to(open_cache(fixture("topk")), str(tmp_path / "out"), to="distillkit")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [".logitcache", ".manifest.lock", "compression_config.yaml", "data_0.parquet", "data_1.parquet"]
    for f in ("data_0.parquet", "data_1.parquet"):
        schema = pq.read_schema(tmp_path / "out" / f)
        assert schema.remove_metadata() == DK_SCHEMA.append(pa.field("labels", pa.list_(pa.int64())))
    cfg = yaml.safe_load((tmp_path / "out" / "compression_config.yaml").read_text())
    assert cfg == {"d": VOCAB, "k": 8, "exact_k": 8, "exact_dtype": "bfloat16", "polynomial_terms": None,
                   "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False,
                   "normalize_t": False}                  # the fields DistillKit's model_dump writes, k = the cache's
    ds = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == report.samples == 4 and ds.column_names == ["input_ids", "compressed_logprobs",
                                                                      "bytepacked_indices", "labels"]
    # 8 values of 2 bytes and 8 ids of 16 bits (d = 49152) per position
    assert report.checks["codec_bytes_per_position"] == 8 * 2 + 8 * 2


def test_the_smallest_missing_ids_by_hand():
    ids = np.array([[0, 1, 3, -1, -1], [7, 2, 0, 5, 1]])
    np.testing.assert_array_equal(missing_ids(ids, np.array([3, 2]), 5), [[0, 1, 3, 2, 4], [7, 2, 0, 1, 3]])


def test_ragged_and_unscored_rows_are_completed_as_documented(generated, tmp_path):
    cache = open_cache(generated["compact"])
    export_to(cache, str(tmp_path / "out"), to="distillkit")
    cfg = CompressionConfig.from_dict(yaml.safe_load((tmp_path / "out" / "compression_config.yaml").read_text()))
    assert cfg.exact_k == cfg.k == 32                        # rows that end early: every value exact by default
    from tests.interop.test_formats import TestDistillKit

    read = TestDistillKit().read(tmp_path / "out")
    padded = unscored = 0
    for sid, file, row in record_ids(tmp_path / "out"):
        s = next(x for x in cache.samples.to_pylist() if x["sample_id"] == sid)
        ids, lp, scored = ours(cache, s, 32)
        got = read[(file, row)]
        a = s["token_offset"]
        tails = cache.teacher_rows(s["shard"], a, a + s["num_tokens"]).tail_mass()
        for j in range(s["num_tokens"] - 1):
            if not scored[j]:            # the placeholder: the next token at log-prob 0, the smallest other ids at -100
                nxt = got["tokens"][j + 1]
                assert got["ids"][j].tolist() == [nxt] + [i for i in range(32) if i != nxt][:31]
                assert got["values"][j].tolist() == [0.0] + [-100.0] * 31
                unscored += 1
                continue
            c = int((ids[j] >= 0).sum())
            if c == 32:
                continue
            pads = got["ids"][j, c:]
            free = [i for i in range(VOCAB) if i not in set(ids[j, :c].tolist())][:32 - c]
            assert pads.tolist() == free                     # the smallest ids outside the row
            want = max(min(math.log(tails[j] / (VOCAB - c)), float(lp[j, c - 1]) if c else 0.0), -100.0)
            np.testing.assert_allclose(got["values"][j, c:], want, rtol=2.0 ** -8)     # its tail spread evenly
            padded += 1
    assert padded > 10 and unscored == sum(p - 1 for _, p in [(40, 7), (2, 1), (25, 1), (33, 12), (60, 5)])


def test_a_polynomial_that_misses_ragged_rows_is_reported_and_warned(generated, tmp_path, caplog):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"d": VOCAB, "k": 32, "exact_k": 8, "exact_dtype": "bfloat16",
                                   "polynomial_terms": [0, 1, 2, "sqrt"], "residual_bins": [],
                                   "delta_encoding": False}))
    with caplog.at_level(logging.WARNING):
        report = export_to(open_cache(generated["compact"]), str(tmp_path / "out"), to="distillkit",
                           compression_config=str(cfg))
    worst = report.checks["approximated_values"]["max_abs_error"]
    assert worst > 2 and f"misses our log-probs by up to {worst:.2f} nats" in caplog.text
    assert report.checks["exact_values"]["max_abs_error"] <= 16 * 2.0 ** -8


def capture_files(root, rows_per_file=(3, 2), k=6, seed=0, names=("data_0.parquet", "data_1.parquet")) -> CompressionConfig:
    """A directory as DistillKit's capture writes it: its compression_config.yaml, and per file samples of
    T tokens (the last a pad token) with T - 1 rows of k distinct ids and descending log-probs; no labels."""
    rng = np.random.default_rng(seed)
    cfg = CompressionConfig.from_dict({"d": VOCAB + 1, "k": k, "exact_k": 2, "exact_dtype": "bfloat16",
                                       "polynomial_terms": [0, 1, "sqrt"], "residual_bins": [],
                                       "delta_encoding": False})
    root.mkdir(parents=True, exist_ok=True)
    (root / "compression_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    for name, n in zip(names, rows_per_file):
        out = {"input_ids": [], "compressed_logprobs": [], "bytepacked_indices": []}
        for _ in range(n):
            t = int(rng.integers(3, 12))
            tokens = rng.integers(3, VOCAB, size=t)
            ids = np.stack([rng.choice(VOCAB, size=k, replace=False) for _ in range(t - 1)])
            ids[:, 0] = tokens[1:]                           # the next token, most probable
            lp = np.sort(np.log(rng.dirichlet(np.ones(k) * 0.5, size=t - 1) * 0.9), axis=1)[:, ::-1]
            out["input_ids"].append(tokens.tolist())
            out["compressed_logprobs"].append([list(r) for r in compress_logprobs(lp, cfg)])
            out["bytepacked_indices"].append([list(r) for r in pack_bits(ids, cfg.index_bits)])
        pq.write_table(pa.table(out, schema=DK_SCHEMA), root / name)
    return cfg


def test_distillkits_own_files_import_whole(tokenizer_dir, tmp_path):
    capture_files(tmp_path / "dk", names=("data_10.parquet", "data_2.parquet"))
    report = import_from(str(tmp_path / "dk"), str(tmp_path / "c"), from_="distillkit", tokenizer=tokenizer_dir,
                         teacher_name="some-teacher")
    assert report.files == ["data_2.parquet", "data_10.parquet"]          # in DistillKit's order, not the string's
    cache = open_cache(str(tmp_path / "c"), verify=True)
    m = cache.manifest
    assert m.teacher.name == "some-teacher" and m.teacher.fingerprint.startswith("imported:sha256:")
    assert m.teacher.vocab_size == VOCAB + 1 and m.capture.top_k == 6 and m.capture.logprob_dtype == "float32"
    assert not m.arrays["entropy"].exact and not m.arrays["topk_logprobs"].exact
    assert m.provenance.imported_from["files"] == ["data_2.parquet", "data_10.parquet"]
    assert m.provenance.imported_from["compression_config"]["k"] == 6
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = cache.samples.to_pylist()
    assert [(r["source"], r["row"]) for r in rows] == [("data_2.parquet", 0), ("data_2.parquet", 1),
                                                      ("data_10.parquet", 0), ("data_10.parquet", 1),
                                                      ("data_10.parquet", 2)]
    for r in rows:
        assert r["sample_id"] == sample_id(r["source"], "", r["row"], 0)
        assert (r["scored_start"], r["scored_end"]) == (0, r["num_tokens"] - 1)   # no labels: every row
        a = cache.sample(r["sample_id"])
        assert r["response"] == tok.decode(a["tokens"]) and r["prompt"] is None
        assert np.isnan(a["entropy"]).all() and math.isnan(r["mean_entropy"])
        # the next token is every row's first id here: its decoded value is the target log-prob
        np.testing.assert_array_equal(a["target_logprob"][:-1], a["topk_logprobs"][:-1][
            np.arange(r["num_tokens"] - 1), np.argmax(a["topk_ids"][:-1] == a["tokens"][1:, None], axis=1)])
        assert np.isnan(a["target_logprob"][-1]) and (np.diff(a["topk_logprobs"][:-1], axis=1) <= 0).all()
    one = import_from(str(tmp_path / "dk" / "data_2.parquet"), str(tmp_path / "one"), from_="distillkit",
                      tokenizer=tokenizer_dir)
    assert one.samples == 2
    glob = import_from(str(tmp_path / "dk" / "data_1*.parquet"), str(tmp_path / "glob"), from_="distillkit",
                       tokenizer=tokenizer_dir)
    assert glob.files == ["data_10.parquet"] and glob.samples == 3


def rewrite(path, column: str, fn) -> None:
    t = pq.read_table(path)
    values = t.column(column).to_pylist()
    fn(values)
    pq.write_table(t.set_column(t.schema.get_field_index(column), column, pa.array(values, t.schema.field(column).type)),
                   path)


@pytest.mark.parametrize("damage, words", [
    (lambda p: rewrite(p, "input_ids", lambda v: v[1].append(5)),
     r"data_0.parquet row 1: \d+ input_ids, \d+ rows of compressed_logprobs and \d+ of bytepacked_indices"),
    (lambda p: rewrite(p, "input_ids", lambda v: v[2].__setitem__(0, VOCAB + 7)),
     f"data_0.parquet row 2: input_ids holds {VOCAB + 7}, outside the tokenizer's {VOCAB} ids"),
    (lambda p: rewrite(p, "bytepacked_indices", lambda v: v[0].__setitem__(1, [255] * len(v[0][1]))),
     r"data_0.parquet row 0, position 1: token id \d+ is outside the vocabulary of d = 49153"),
    (lambda p: rewrite(p, "bytepacked_indices", lambda v: v[1].__setitem__(0, v[1][0][:2] * (len(v[1][0]) // 2))),
     "data_0.parquet row 1, position 0: a token id appears twice among its 6 ids"),
    (lambda p: rewrite(p, "compressed_logprobs", lambda v: v[2].__setitem__(2, [255] * len(v[2][2]))),
     "data_0.parquet row 2, position 2: compressed_logprobs decode to values that are not finite"),
    (lambda p: rewrite(p, "compressed_logprobs", lambda v: v[0].__setitem__(0, v[0][0] + [0])),
     r"data_0.parquet row 0, position 0: compressed_logprobs has 17 bytes, the compression config \(k 6, d 49153\)"),
])
def test_damaged_files_are_refused_naming_file_and_row(damage, words, tokenizer_dir, tmp_path):
    capture_files(tmp_path / "dk")
    damage(tmp_path / "dk" / "data_0.parquet")
    with pytest.raises(LogitcacheError, match=words):
        import_from(str(tmp_path / "dk"), str(tmp_path / "c"), from_="distillkit", tokenizer=tokenizer_dir)
    assert not (tmp_path / "c").exists()


def test_packed_legacy_and_configless_inputs_are_refused(tokenizer_dir, tmp_path):
    capture_files(tmp_path / "dk")
    rewrite(tmp_path / "dk" / "data_1.parquet", "input_ids", lambda v: v[0].pop())   # rows == tokens: packed
    with pytest.raises(LogitcacheError, match="as many rows as tokens: packed by distillkit-pack-logits"):
        import_from(str(tmp_path / "dk"), str(tmp_path / "c"), from_="distillkit", tokenizer=tokenizer_dir)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "compression_config.yaml").write_text((tmp_path / "dk" / "compression_config.yaml").read_text())
    pq.write_table(pa.table({"input_ids": [[1, 2]], "packed_indices": [[[1]]], "exact_values": [[[0.0]]],
                             "coeffs": [[[0.0]]]}), legacy / "data_0.parquet")
    with pytest.raises(LogitcacheError, match="legacy layout packed_indices/exact_values/coeffs is not read"):
        import_from(str(legacy), str(tmp_path / "c"), from_="distillkit", tokenizer=tokenizer_dir)
    (tmp_path / "dk" / "compression_config.yaml").unlink()
    with pytest.raises(LogitcacheError, match="compression_config.yaml: no such compression config"):
        import_from(str(tmp_path / "dk"), str(tmp_path / "c"), from_="distillkit", tokenizer=tokenizer_dir)
    with pytest.raises(LogitcacheError, match="--tokenizer .*nowhere: cannot load a tokenizer"):
        import_from(str(legacy), str(tmp_path / "c"), from_="distillkit", tokenizer=str(tmp_path / "nowhere"))
    assert not (tmp_path / "c").exists()


def test_an_imported_cache_refuses_token_selection_by_entropy(tokenizer_dir, tmp_path):
    """student-train's --entropy-* would select no token of a cache whose entropy is NaN: refused, named."""
    from student_train.config import TrainConfig
    from student_train.objective import check_loss_supported

    capture_files(tmp_path / "dk")
    import_from(str(tmp_path / "dk"), str(tmp_path / "c"), from_="distillkit", tokenizer=tokenizer_dir)
    cache = open_cache(str(tmp_path / "c"))
    check_loss_supported(TrainConfig(cache="c", out="r"), cache.encoding, "c", cache.manifest.arrays)   # trains
    with pytest.raises(LogitcacheError, match="--entropy-top-frac: c does not store the teacher's entropy"):
        check_loss_supported(TrainConfig(cache="c", out="r", entropy_top_frac=0.2), cache.encoding, "c",
                             cache.manifest.arrays)
    check_loss_supported(TrainConfig(cache="c", out="r", entropy_top_frac=0.2), cache.encoding, "c",
                         open_cache(fixture("topk")).manifest.arrays)                         # a captured cache: fine
    with pytest.raises(LogitcacheError, match="--token-select teacher-entropy: c does not store the teacher's"):
        check_loss_supported(TrainConfig(cache="c", out="r", token_select="teacher-entropy", top_frac=0.2),
                             cache.encoding, "c", cache.manifest.arrays)
    check_loss_supported(TrainConfig(cache="c", out="r", token_select="student-entropy", top_frac=0.2),
                         cache.encoding, "c", cache.manifest.arrays)              # the student's entropy: fine
