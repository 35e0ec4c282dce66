"""axolotl's KD dataset, beyond the conformance class: one sample written out by hand, and the directory
loading with `datasets` as axolotl loads a local directory, already tokenized."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache import open_cache
from logitcache.interop import export_to

from tests.interop.conftest import VOCAB, fixture


def hand_cache(root) -> str:
    """One generate-mode sample, tokens 10 11 12 13 after a prompt of 2: rows 1 and 2 are scored, row 1
    [12: 0.5, 7: 0.25], row 2 [13: 0.6, 9: 0.1] (float32 log-probs, k 2)."""
    from logitcache.format import SAMPLES_SCHEMA, layout, sample_id
    from logitcache.format.arrays import array_specs
    from logitcache.store.fs import CacheFS
    from logitcache.store.shard_writer import write_shard
    from logitcache.store.synthetic import synthetic_manifest

    encoding = {"name": "topk"}
    specs = array_specs(VOCAB, 2, "float32", [], 0, "bfloat16", encoding)
    nan = np.nan
    arrays = {"tokens": np.array([10, 11, 12, 13], np.uint16),
              "topk_ids": np.array([[0, 0], [12, 7], [13, 9], [0, 0]], np.uint16),
              "topk_logprobs": np.log(np.array([[nan, nan], [0.5, 0.25], [0.6, 0.1], [nan, nan]], np.float32)),
              "entropy": np.array([nan, 1.0, 1.0, nan], np.float32),
              "target_logprob": np.array([nan, math.log(0.5), math.log(0.6), nan], np.float32)}
    name = layout.shard_name("ihand", 0)
    table = pa.Table.from_pylist([{
        "sample_id": sample_id("hand", "", 0, 0), "shard": name, "token_offset": 0, "num_tokens": 4,
        "prompt_tokens": 2, "response_tokens": 2, "scored_start": 1, "scored_end": 3, "finish_reason": "stop",
        "source": "hand", "split": "", "row": 0, "sample_index": 0, "prompt": "p", "response": "r",
        "mean_entropy": 1.0, "max_entropy": 1.0, "p90_entropy": 1.0, "teacher_logprob_sum": -1.2}],
        schema=SAMPLES_SCHEMA)
    cfs = CacheFS(str(root))
    record = write_shard(cfs, name, arrays, specs, table).record("ihand", 0, worker=0)
    manifest = synthetic_manifest("ihand", specs, [record], vocab=VOCAB, hidden=0, top_k=2, layers=[],
                                  created_by="tests/interop/test_axolotl.py", encoding=encoding, samples_per_shard=1)
    cfs.write_atomic(layout.MANIFEST, manifest.to_json().encode())
    return str(root)


@pytest.mark.parametrize("temperature, row1, row2", [
    (1.0, [2 / 3, 1 / 3], [6 / 7, 1 / 7]),
    # at T = 2: p^(1/2) renormalised: sqrt(.5) / (sqrt(.5) + .5) = 0.5857864..., sqrt(.6) / (sqrt(.6) + sqrt(.1))
    (2.0, [0.5857864376, 0.4142135624], [0.7101020514, 0.2898979486]),
])
def test_one_sample_by_hand(temperature, row1, row2, tmp_path):
    src = hand_cache(tmp_path / "cache")
    export_to(open_cache(src), str(tmp_path / "out"), to="axolotl", kd_temperature=temperature)
    (r,) = pq.read_table(tmp_path / "out" / "data_0.parquet").to_pylist()
    assert r["input_ids"] == [10, 11, 12, 13] and r["attention_mask"] == [1, 1, 1, 1]
    assert r["position_ids"] == [0, 1, 2, 3]
    # cross-entropy at j is against labels[j + 1]: tokens 12 and 13, predicted at the scored rows 1 and 2
    assert r["labels"] == [-100, -100, 12, 13]
    assert r["target_token_ids"] == [[0, 0], [12, 7], [13, 9], [0, 0]]
    assert r["target_mask"] == [[0, 0], [1, 1], [1, 1], [0, 0]]
    lp = np.array(r["target_logprobs"])
    assert (lp[[0, 3]] == -1e9).all()
    np.testing.assert_allclose(np.exp(lp[1:3]), [row1, row2], rtol=1e-6)


def test_the_directory_loads_already_tokenized_with_datasets(tmp_path):
    """axolotl reads a local directory with `datasets.load_dataset(DIR)` and uses it as it is when it has
    input_ids, attention_mask and labels; our record (a dot directory) is not a data file to it."""
    import datasets

    report = export_to(open_cache(fixture("compact")), str(tmp_path / "out"), to="axolotl", top_k=4)
    ds = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == report.samples == 4
    assert {"input_ids", "attention_mask", "labels"} <= set(ds.features)
    assert ds.column_names == ["input_ids", "attention_mask", "position_ids", "labels", "target_token_ids",
                               "target_logprobs", "target_mask"]
    assert all(len(row) == 4 for sample in ds["target_token_ids"] for row in sample)
    assert report.checks["longest_sample_tokens"] == 13 and report.checks["max_abs_target_mass_minus_1"] < 1e-6
