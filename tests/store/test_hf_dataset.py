"""logitcache.to_hf_dataset: every example equals Cache.sample_view element by element, for every
encoding and format release; split_dataset_by_node covers every sample exactly once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from logitcache import open_cache, to_hf_dataset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "caches"
CACHES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


@pytest.mark.parametrize("name", CACHES)
def test_examples_equal_sample_view(name):
    cache = open_cache(str(FIXTURES / name))
    examples = list(to_hf_dataset(cache))
    assert [e["sample_id"] for e in examples] == cache.samples["sample_id"].to_pylist()
    for e in examples:
        view = cache.sample_view(e["sample_id"])
        assert set(view) <= set(e), set(view) - set(e)
        for key, want in view.items():
            got = np.asarray(e[key])
            if key in ("ids", "probs"):                     # trimmed to the sample's own widest row
                assert got.shape == (want.shape[0], int((want >= 0).sum(1).max()) if key == "ids" else got.shape[1])
                want = want[:, :got.shape[1]]
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {e['sample_id']} {key}")
        assert e["num_tokens"] == len(e["tokens"])


def test_split_by_node_covers_every_sample_once():
    from datasets.distributed import split_dataset_by_node

    cache = open_cache(str(FIXTURES / "v1.4-compact"))
    ds = to_hf_dataset(cache)
    seen = [e["sample_id"] for rank in range(2) for e in split_dataset_by_node(ds, rank=rank, world_size=2)]
    assert sorted(seen) == sorted(cache.samples["sample_id"].to_pylist())
    assert ds.n_shards == len(cache.shards)


def test_torch_format_and_url(tmp_path):
    ds = to_hf_dataset(str(FIXTURES / "v1.4-topk")).with_format("torch")
    first = next(iter(ds))
    assert first["tokens"].ndim == 1 and first["ids"].shape[0] == first["tokens"].shape[0]
