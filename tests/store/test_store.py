"""Write/read round trips, checksums, crash safety and finalize on synthetic shards (no model)."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from logitcache import open_cache
from logitcache.format import CorruptShardError, FormatError, SAMPLES_SCHEMA
from logitcache.format.arrays import array_specs, float32_to_bf16_bits, bf16_bits_to_float32
from logitcache.format.errors import LogitcacheError
from logitcache.store import codecs
from logitcache.store.commit import finalize, save_part
from logitcache.store.fs import CacheFS
from logitcache.store.shard_writer import write_shard
from tests.format.test_manifest import make_manifest


def random_shard(rng, n_tokens, k=8, hidden_layers=(2,), d=32, hidden_dtype="bfloat16", vocab=49152):
    specs = array_specs(vocab, k, "float16", list(hidden_layers), d, hidden_dtype)
    arrays = {
        "tokens": rng.integers(0, vocab, n_tokens).astype(np.uint16),
        "topk_ids": rng.integers(0, vocab, (n_tokens, k)).astype(np.uint16),
        "topk_logprobs": (-rng.exponential(2.0, (n_tokens, k))).astype(np.float16),
        "entropy": rng.random(n_tokens).astype(np.float32) * 5,
        "target_logprob": -rng.random(n_tokens).astype(np.float32),
    }
    arrays["entropy"][::7] = np.nan  # unscored rows hold the fill value
    for layer in hidden_layers:
        arrays[f"hidden/{layer}"] = rng.standard_normal((n_tokens, d)).astype(np.float32)
    return specs, arrays


def samples_for(shard, lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows = []
    for i, (off, n) in enumerate(zip(offsets, lengths)):
        rows.append(dict(sample_id=f"{i:016x}", shard=shard, token_offset=int(off), num_tokens=int(n),
                         prompt_tokens=0, response_tokens=int(n), scored_start=0, scored_end=int(n) - 1,
                         mean_entropy=1.0, max_entropy=2.0, p90_entropy=1.5, teacher_logprob_sum=-3.0,
                         finish_reason="scored", source="s", split="", row=i, sample_index=0, prompt=None,
                         response=f"text {i}"))
    return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)


def commit(cfs, name, specs, arrays, lengths, codec=codecs.DEFAULT_CODEC):
    written = write_shard(cfs, name, arrays, specs, samples_for(name, lengths), codec)
    m = make_manifest()
    m.arrays = specs
    m.codecs = codecs.describe(specs, codec)
    m.inputs[0].num_shards = 1
    m.shards = [written.record("i0", 0, worker=0)]
    m.skipped = []
    save_part(cfs, m)
    return finalize(cfs)


@pytest.mark.parametrize("url_kind", ["local", "memory"])
@pytest.mark.parametrize("hidden_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("codec", codecs.CODEC_CHOICES)
def test_write_read_round_trip_is_exact(tmp_path, url_kind, hidden_dtype, codec, request):
    rng = np.random.default_rng(1)
    url = str(tmp_path / "c") if url_kind == "local" else f"memory://{tmp_path.name}/c"
    cfs = CacheFS(url)
    lengths = [5, 17, 1, 9000, 40]   # 9000 rows: more than one chunk of topk (8192 rows at k=8? no: 65536)
    specs, arrays = random_shard(rng, sum(lengths), hidden_dtype=hidden_dtype)
    commit(cfs, "i0-000000", specs, arrays, lengths, codec)
    cache = open_cache(url, verify=True)
    got = cache.read_rows("i0-000000", 0, sum(lengths))
    for name, want in arrays.items():
        if name.startswith("hidden/") and hidden_dtype == "bfloat16":
            want = bf16_bits_to_float32(float32_to_bf16_bits(want))       # the stored precision, exactly
        elif name.startswith("hidden/"):
            want = want.astype(hidden_dtype)
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert got["tokens"].dtype == np.uint16 and got["topk_logprobs"].dtype == np.float16
    # per-sample access and chunked iteration agree with the whole
    one = cache.sample(3)
    np.testing.assert_array_equal(one["topk_ids"], arrays["topk_ids"][5 + 17 + 1:5 + 17 + 1 + 9000])
    np.testing.assert_array_equal(cache.sample(f"{1:016x}")["tokens"], arrays["tokens"][5:22])
    chunks = list(cache.iter_token_chunks(["entropy"], chunk_tokens=1000))
    assert [c.start for c in chunks] == list(range(0, sum(lengths), 1000))
    np.testing.assert_array_equal(np.concatenate([c.arrays["entropy"] for c in chunks]), arrays["entropy"])


def test_cache_is_readable_with_zarr_and_pyarrow_alone(tmp_path):
    import pyarrow.parquet as pq
    import zarr

    rng = np.random.default_rng(2)
    specs, arrays = random_shard(rng, 50)
    commit(CacheFS(str(tmp_path)), "i0-000000", specs, arrays, [20, 30])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shard = manifest["shards"][0]["name"]
    g = zarr.open_group(str(tmp_path / "shards" / shard / "arrays.zarr"), mode="r")
    np.testing.assert_array_equal(g["topk_ids"][:], arrays["topk_ids"])
    bits = g["hidden/2"][:]
    assert g["hidden/2"].attrs["logical_dtype"] == "bfloat16"
    np.testing.assert_array_equal((bits.astype(np.uint32) << 16).view(np.float32),
                                  bf16_bits_to_float32(float32_to_bf16_bits(arrays["hidden/2"])))
    samples = pq.read_table(tmp_path / "shards" / shard / "samples.parquet")
    assert samples.column("num_tokens").to_pylist() == [20, 30]


def test_corrupt_shard_is_named(tmp_path):
    rng = np.random.default_rng(3)
    specs, arrays = random_shard(rng, 100)
    commit(CacheFS(str(tmp_path)), "i0-000000", specs, arrays, [100])
    chunk = next((tmp_path / "shards" / "i0-000000" / "arrays.zarr" / "topk_logprobs").rglob("c/*/*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard 'i0-000000' is corrupt: checksum sha256:\w+ != manifest"):
        open_cache(str(tmp_path), verify=True)
    (tmp_path / "shards" / "i0-000000" / "samples.parquet").unlink()
    with pytest.raises(CorruptShardError, match="i0-000000"):
        open_cache(str(tmp_path)).verify()


def test_a_missing_chunk_file_is_an_error_not_fill_values(tmp_path):
    rng = np.random.default_rng(4)
    specs, arrays = random_shard(rng, 100)
    commit(CacheFS(str(tmp_path)), "i0-000000", specs, arrays, [100])
    np.testing.assert_array_equal(open_cache(str(tmp_path)).read_rows("i0-000000", 0, 100, ["entropy"])["entropy"],
                                  arrays["entropy"])
    next(p for p in (tmp_path / "shards" / "i0-000000" / "arrays.zarr" / "entropy" / "c").rglob("*")
         if p.is_file()).unlink()
    with pytest.raises(CorruptShardError, match=r"shard 'i0-000000' is corrupt: \d+ bytes on storage, the manifest "
                                                r"records \d+: a file is missing or truncated"):
        open_cache(str(tmp_path)).read_rows("i0-000000", 0, 10, ["entropy"])


def test_open_cache_errors(tmp_path):
    with pytest.raises(FormatError, match=r"no manifest.json here: not a logitcache cache"):
        open_cache(str(tmp_path))
    m = make_manifest()
    m.shards = []
    save_part(CacheFS(str(tmp_path)), m)
    with pytest.raises(FormatError, match=r"has part manifests but no manifest.json: a capture is running"):
        open_cache(str(tmp_path))
    assert open_cache(str(tmp_path), allow_partial=True).manifest.complete is False


def test_finalize_refuses_missing_shards_unless_allowed(tmp_path):
    cfs = CacheFS(str(tmp_path))
    m = make_manifest()
    m.inputs[0].num_shards = 3
    m.shards = []
    save_part(cfs, m)
    with pytest.raises(LogitcacheError, match=r"3 planned shard\(s\) not committed yet \(first: i0-000000, i0-000001"):
        finalize(cfs)
    assert finalize(cfs, allow_incomplete=True).complete is False
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"] is False


def test_crash_before_publish_leaves_nothing_that_looks_committed(tmp_path):
    """A writer killed (SIGKILL) after writing a shard's files but before publishing them: no reader
    sees that shard, and the next writer cleans it up."""
    code = f"""
import numpy as np
from tests.store.test_store import random_shard, samples_for
from logitcache.store.fs import CacheFS
from logitcache.store.shard_writer import write_shard
specs, arrays = random_shard(np.random.default_rng(0), 30)
write_shard(CacheFS({str(tmp_path)!r}), "i0-000000", arrays, specs, samples_for("i0-000000", [30]))
"""
    env = {"LOGITCACHE_FAULT": "kill-before-publish:i0-000000", "PYTHONPATH": "."}
    proc = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, **env})
    assert proc.returncode == -9
    assert list((tmp_path / "_tmp").iterdir()), "the half-written shard stays in _tmp"
    assert not (tmp_path / "shards").exists()
    assert not (tmp_path / "manifest.json").exists()


def doc_code_block(containing: str) -> str:
    """The python block of docs/format.md that contains ``containing``."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    (block,) = [b for b in blocks if containing in b]
    return block


def _doc_block(heading: str, lang: str = "python") -> str:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text()
    section = doc.split(heading, 1)[1]
    return section.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


def test_docs_reading_example_and_checksum_recipe_work(tmp_path):
    rng = np.random.default_rng(4)
    specs, arrays = random_shard(rng, 60)
    m = commit(CacheFS(str(tmp_path)), "i0-000000", specs, arrays, [25, 35])
    ns = {}
    exec(_doc_block("## Reading without logitcache").replace('root = "cache"', f'root = {str(tmp_path)!r}'), ns)
    np.testing.assert_array_equal(ns["tokens"], arrays["tokens"][:25])
    np.testing.assert_array_equal(ns["entropy"], arrays["entropy"][:25])
    # the decoder of every encoding (this cache: topk, from the manifest's absence of an encoding record)
    exec(doc_code_block("def distribution("), ns)
    ids, probs, tail = ns["distribution"](ns["manifest"], ns["g"], 0)
    np.testing.assert_array_equal(ids, arrays["topk_ids"][0])
    np.testing.assert_allclose(probs, np.exp(arrays["topk_logprobs"][0].astype(np.float64)))
    ns2 = {}
    exec(_doc_block("### Shard checksum"), ns2)
    shard = str(tmp_path / "shards" / "i0-000000")
    assert ns2["shard_checksum"](shard) == m.shards[0].checksum
    assert ns2["shard_checksum"](shard, only=lambda r: r.endswith("zarr.json")) == m.shards[0].metadata_checksum
    import hashlib
    assert "sha256:" + hashlib.sha256((tmp_path / "shards" / "i0-000000" / "samples.parquet").read_bytes()).hexdigest() \
        == m.shards[0].samples_checksum
    ns3 = {}
    exec(_doc_block("### Manifest checksum"), ns3)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert ns3["manifest_checksum"](raw) == raw["checksum"]


def test_auto_codec_compresses_hidden_with_zstd_and_the_rest_with_shuffled_blosc(tmp_path):
    import zarr

    specs, arrays = random_shard(np.random.default_rng(5), 40)
    commit(CacheFS(str(tmp_path)), "i0-000000", specs, arrays, [40])
    g = zarr.open_group(str(tmp_path / "shards" / "i0-000000" / "arrays.zarr"), mode="r")

    def inner(name):  # codecs inside the sharding codec
        return [c["name"] for c in g[name].metadata.to_dict()["codecs"][0]["configuration"]["codecs"]]

    assert inner("hidden/2") == ["bytes", "zstd", "crc32c"]
    assert inner("topk_logprobs") == ["bytes", "blosc", "crc32c"]
    assert g["topk_logprobs"].metadata.to_dict()["codecs"][0]["configuration"]["codecs"][1]["configuration"]["shuffle"] == "shuffle"
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert (m["codecs"]["hidden/2"]["codec"], m["codecs"]["topk_ids"]["codec"]) == ("zstd", "blosc-zstd-shuffle")
