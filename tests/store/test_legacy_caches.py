"""Caches written by earlier releases stay readable: the fixtures under tests/fixtures/caches/ (how they
were made: tests/fixtures/make_caches.py) read back element by element as the release that wrote them
read them, through the reader, a query and the training stream."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from logitcache import open_cache
from logitcache.format.encodings import names
from logitcache.query.engine import run_query
from tests.fixtures.make_caches import digest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "caches"
LEGACY = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


@pytest.fixture(params=LEGACY)
def legacy(request, tmp_path) -> tuple[Path, dict]:
    """A copy of one fixture (queries may write derived tables into it) and its expected arrays."""
    dest = tmp_path / request.param
    shutil.copytree(FIXTURES / request.param, dest)
    with np.load(FIXTURES / f"{request.param}.expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    return dest, expected


def test_there_are_fixtures_of_every_format_and_encoding():
    builtin = ["topk", "adaptive", "compact", "sampled", "hybrid", "full"]
    assert set(builtin) <= set(names())
    want = {"v1.0-topk", "v1.1-topk"} | {f"v{v}-{e}" for v in ("1.2", "1.3") for e in builtin}
    assert want <= set(LEGACY), f"missing fixtures: {sorted(want - set(LEGACY))}"


def test_legacy_cache_reads_back_element_by_element(legacy):
    path, expected = legacy
    cache = open_cache(str(path), verify=True)
    seen = set()
    for sid in cache.samples.column("sample_id").to_pylist():
        for name, values in cache.sample(sid).items():
            key = f"{sid}/{name}"
            if f"{key}#sha256" in expected:                 # a big array: expected by digest
                assert str(digest(values)) == str(expected[f"{key}#sha256"]), key
                seen.add(f"{key}#sha256")
                continue
            np.testing.assert_array_equal(values, expected[key], err_msg=key)
            assert values.dtype == expected[key].dtype, key
            seen.add(key)
        cache.sample_view(sid)                              # and it decodes
    assert seen == set(expected)


def test_legacy_cache_answers_queries_and_streams(legacy):
    from student_train.data import CacheStream

    path, expected = legacy
    cache = open_cache(str(path))
    samples = {k.split("/")[0] for k in expected}
    got = run_query(cache, "SELECT count(*) AS n, sum(num_tokens) AS t FROM samples").table.to_pylist()[0]
    assert got == {"n": len(samples), "t": sum(len(v) for k, v in expected.items() if k.endswith("/tokens"))}
    tokens = run_query(cache, "SELECT sample_id, position, token FROM tokens ORDER BY sample_id, position").table
    for sid in set(tokens.column("sample_id").to_pylist()):
        mine = [r["token"] for r in tokens.to_pylist() if r["sample_id"] == sid]
        np.testing.assert_array_equal(mine, expected[f"{sid}/tokens"].astype(np.int64))
    stream = CacheStream(cache, seq_len=64, batch_size=4, shuffle=False, rank=0, world_size=1)
    batch = next(iter(stream))
    real = batch["document_ids"] != 0
    assert int(real.sum()) == sum(len(v) for k, v in expected.items() if k.endswith("/tokens"))
