"""The training loader's output is pinned: every tensor of every batch, on fixed plans, against digests
recorded before the loader's speed work (issue 14), so a faster loader is proven to yield the very
same batches, byte for byte.

Two sources, both independent of the machine's floating point and of numpy's random streams:

- the committed regression caches (tests/fixtures/caches: every release and encoding, hidden layer 2);
- synthetic caches written here through the real shard writer from integer arithmetic only (compact
  with a bf16 hidden layer, topk, sampled; generate mode, so completion masking applies), large
  enough that their entry and hidden arrays span several Zarr chunks.

Each plan is a stream configuration (batch, seq_len, packing, shuffle, rank/world, resume point,
selection, workers). The digest of a plan is, per batch key, the sha256 over its tensors in stream
order (dtype, shape, bytes). Re-record (only when a plan's output is meant to change) with
``python tests/student/test_loader_identity.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "caches"
DIGESTS = ROOT / "tests" / "fixtures" / "loader_identity.json"
REGRESSION = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
SYNTHETIC = ("compact", "topk", "sampled")

# (name, stream keywords, how it is consumed); "resume": consume that many batches, save the state,
# continue in a fresh loader; "workers": DataLoader workers
FIXTURE_PLANS = [
    ("packed-16x2", dict(seq_len=16, batch_size=2, shuffle_buffer=2, seed=0), {}),
    ("unpacked-8x3-ordered", dict(seq_len=8, batch_size=3, packing=False, shuffle=False), {}),
    ("packed-32x1-hidden-window2", dict(seq_len=32, batch_size=1, pack_window=2, seed=7, hidden=True,
                                        merge_gap_rows=0), {}),
    ("rank1of2-24x2", dict(seq_len=24, batch_size=2, rank=1, world_size=2, seed=3, hidden=True), {}),
    ("rank0of2-12x1-resumed", dict(seq_len=12, batch_size=1, rank=0, world_size=2, seed=1), {"resume": 2}),
    ("selection-10x2-completion", dict(seq_len=10, batch_size=2, select=(3, 0, 2), loss_on="completion",
                                       shuffle_buffer=1), {}),
    ("full-distribution-16x1", dict(seq_len=16, batch_size=1, with_full=True), {}),
]
SYNTHETIC_PLANS = [
    ("packed-4x256", dict(seq_len=256, batch_size=4, seed=0, hidden=True), {}),
    ("packed-2x1024-buffer64", dict(seq_len=1024, batch_size=2, seed=5, shuffle_buffer=64, hidden=True), {}),
    ("unpacked-3x128-ordered", dict(seq_len=128, batch_size=3, packing=False, shuffle=False), {}),
    ("rank1of2-8x512-resumed-workers", dict(seq_len=512, batch_size=8, rank=1, world_size=2, seed=2, hidden=True),
     {"resume": 3, "workers": 2}),
    ("scored-5x300-gap0", dict(seq_len=300, batch_size=5, loss_on="scored", merge_gap_rows=0, seed=9), {}),
]


# ---- synthetic caches from integer arithmetic -----------------------------------------------------

def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of uint64 values: deterministic pseudo-random bits without numpy's generators."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def draw(n: int, salt: int, lo: int, hi: int) -> np.ndarray:
    """n integers in [lo, hi), from (salt, position)."""
    bits = mix(np.arange(n, dtype=np.uint64) + np.uint64(salt) * np.uint64(1 << 40))
    return lo + ((bits >> np.uint64(11)) % np.uint64(hi - lo)).astype(np.int64)


VOCAB, TOP_K, HIDDEN, LAYER = 49152, 32, 32, 2


def ragged_ids(counts: np.ndarray, salt: int) -> np.ndarray:
    """Ascending distinct ids per token (counts entries each, at most TOP_K), delta-coded: the first id,
    then gaps >= 1; every gap below V / TOP_K keeps the ids inside the vocabulary."""
    return draw(int(counts.sum()), salt, 1, VOCAB // TOP_K)


def synthetic_arrays(encoding: str, n: int, salt: int) -> dict[str, np.ndarray]:
    out = {"tokens": draw(n, salt, 0, VOCAB).astype(np.uint16),
           "entropy": (draw(n, salt + 1, 0, 1 << 12) / 512).astype(np.float32),
           "target_logprob": (-draw(n, salt + 2, 0, 1 << 12) / 256).astype(np.float32)}
    if encoding == "topk":
        out["topk_ids"] = draw(n * TOP_K, salt + 3, 0, VOCAB).astype(np.uint16).reshape(n, TOP_K)
        steps = draw(n * TOP_K, salt + 4, 0, 64).reshape(n, TOP_K)
        out["topk_logprobs"] = (-np.cumsum(steps, axis=1) / 32).astype(np.float16)
    elif encoding == "compact":
        counts = draw(n, salt + 3, 1, TOP_K + 1)
        out["dist/counts"] = counts.astype(np.uint8)
        out["dist/ids"] = ragged_ids(counts, salt + 4).astype(np.uint16)
        out["dist/codes"] = draw(int(counts.sum()), salt + 5, 0, 256).astype(np.uint8)
        out["dist/tail"] = (draw(n, salt + 6, 0, 1 << 10) / 1024).astype(np.float32)
    elif encoding == "sampled":
        counts = draw(n, salt + 3, 1, 17)
        out["dist/counts"] = counts.astype(np.uint8)
        out["dist/ids"] = ragged_ids(counts, salt + 4).astype(np.uint16)
        out["dist/draw_counts"] = draw(int(counts.sum()), salt + 5, 1, 5).astype(np.uint8)
    if encoding == "compact":
        out[f"hidden/{LAYER}"] = (draw(n * HIDDEN, salt + 7, -512, 512) / 64).astype(np.float32).reshape(n, HIDDEN)
    return out


ENCODINGS = {"compact": {"name": "compact", "top_p": 0.99, "bits": 8, "lo": -16.0},
             "topk": {"name": "topk"}, "sampled": {"name": "sampled", "draws": 16, "temperature": 1.0}}


def write_synthetic(root: Path, encoding: str) -> str:
    """Three shards of 60 samples (2..1200 tokens; prompts of 1..40 tokens) in generate mode."""
    from logitcache.format import SAMPLES_SCHEMA, layout
    from logitcache.format.arrays import array_specs
    from logitcache.store.fs import CacheFS
    from logitcache.store.shard_writer import write_shard
    from logitcache.store.synthetic import synthetic_manifest

    layers = [LAYER] if encoding == "compact" else []
    top_k = 1 if encoding == "sampled" else TOP_K
    specs = array_specs(VOCAB, top_k, "float16", layers, HIDDEN, "bfloat16", ENCODINGS[encoding])
    cfs = CacheFS(str(root))
    records = []
    for j in range(3):
        m = 60
        lengths = draw(m, 100 + j, 2, 1200)
        lengths[::17] = draw(len(lengths[::17]), 200 + j, 2, 12)        # a few very short samples
        prompt = np.minimum(draw(m, 300 + j, 1, 40), lengths - 1)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        arrays = synthetic_arrays(encoding, int(lengths.sum()), 1000 * (j + 1))
        name = layout.shard_name("isynth001", j)
        table = pa.table({
            "sample_id": [f"s{j:02d}{i:04d}" for i in range(m)], "shard": [name] * m, "token_offset": offsets,
            "num_tokens": lengths.astype(np.int32), "prompt_tokens": prompt.astype(np.int32),
            "response_tokens": (lengths - prompt).astype(np.int32),
            "scored_start": np.zeros(m, np.int32), "scored_end": (lengths - 1).astype(np.int32),
            "mean_entropy": np.ones(m, np.float32), "max_entropy": np.ones(m, np.float32),
            "p90_entropy": np.ones(m, np.float32), "teacher_logprob_sum": -np.ones(m), "finish_reason": ["length"] * m,
            "source": ["s"] * m, "split": [""] * m, "row": np.arange(m, dtype=np.int64),
            "sample_index": np.zeros(m, np.int32), "prompt": ["p"] * m, "response": ["r"] * m}).cast(SAMPLES_SCHEMA)
        records.append(write_shard(cfs, name, arrays, specs, table).record("isynth001", j, worker=0))
    manifest = synthetic_manifest("isynth001", specs, records, vocab=VOCAB, hidden=HIDDEN, top_k=top_k,
                                  layers=layers, encoding=ENCODINGS[encoding], num_layers=2, max_length=4096,
                                  samples_per_shard=60, with_prompt=True,
                                  created_by="tests/student/test_loader_identity.py")
    cfs.write_atomic(layout.MANIFEST, manifest.to_json().encode())
    return str(root)


# ---- running a plan -------------------------------------------------------------------------------

def flat(batch: dict) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    t = batch["teacher"]
    out.update({f"teacher.{type(t).__name__}.{f.name}": getattr(t, f.name) for f in dataclasses.fields(t)
                if getattr(t, f.name) is not None})
    return out


def run_plan(url: str, kw: dict, how: dict) -> list[dict]:
    """The batches a plan yields (None when the plan does not apply to this cache)."""
    from logitcache import open_cache
    from student_train.data import CacheStream, make_dataloader, stores_full_distribution

    kw = dict(kw)
    cache = open_cache(url)
    hidden = kw.pop("hidden", False)
    gap = kw.pop("merge_gap_rows", None)
    select = kw.pop("select", None)
    if kw.get("with_full") and not stores_full_distribution(cache):
        return None
    if hidden:
        kw["hidden_layers"] = list(cache.manifest.capture.hidden_layers)
    if select is not None:
        ids = cache.samples.column("sample_id").to_pylist()
        kw["sample_ids"] = [ids[i] for i in select if i < len(ids)]

    def make():
        s = CacheStream(url, **kw)
        if gap is not None:
            s.merge_gap_rows = gap
        return s

    workers = how.get("workers", 0)
    first = make_dataloader(make(), num_workers=workers)
    if "resume" not in how:
        return list(first)
    got = []
    for batch in first:
        got.append(batch)
        if len(got) == how["resume"]:
            break
    state = json.loads(json.dumps(first.state_dict()))
    rest = make_dataloader(make(), num_workers=workers)
    rest.load_state_dict(state)
    return got + list(rest)


def digest(batches: list[dict]) -> dict:
    """Per key: sha256 (first 24 hex digits) over the key's tensors of every batch, in order."""
    hashes: dict[str, hashlib._Hash] = {}
    for batch in map(flat, batches):
        assert set(hashes) in (set(), set(batch)), "batches of one plan must have the same keys"
        for key, t in batch.items():
            h = hashes.setdefault(key, hashlib.sha256())
            a = t.contiguous().numpy()
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return {"batches": len(batches), **{k: h.hexdigest()[:24] for k, h in sorted(hashes.items())}}


def copy_fixture(name: str, dest: Path) -> str:
    shutil.copytree(FIXTURES / name, dest / name, ignore=shutil.ignore_patterns("_tmp"))
    return str(dest / name)


def all_cases():
    for name in REGRESSION:
        for plan, kw, how in FIXTURE_PLANS:
            yield f"{name}/{plan}", ("fixture", name), kw, how
    for enc in SYNTHETIC:
        for plan, kw, how in SYNTHETIC_PLANS:
            if kw.get("hidden") and enc != "compact":
                kw = {k: v for k, v in kw.items() if k != "hidden"}
            yield f"synthetic-{enc}/{plan}", ("synthetic", enc), kw, how


CASES = list(all_cases())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Copies of the regression caches and the synthetic caches, made on first use."""
    root = tmp_path_factory.mktemp("loader-identity")
    made: dict = {}

    def get(kind: str, name: str) -> str:
        if (kind, name) not in made:
            made[kind, name] = (copy_fixture(name, root) if kind == "fixture"
                                else write_synthetic(root / f"synthetic-{name}", name))
        return made[kind, name]

    return get


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(DIGESTS.read_text())


@pytest.mark.parametrize("case,source,kw,how", CASES, ids=[c[0] for c in CASES])
def test_loader_output_is_identical_to_the_recorded_one(case, source, kw, how, sources, expected):
    want = expected[case]
    batches = run_plan(sources(*source), kw, how)
    if want is None:
        assert batches is None
        return
    got = digest(batches)
    assert got["batches"] == want["batches"] > 0
    differ = [k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    assert not differ, f"{case}: these batch tensors differ from the recorded loader output: {differ}"


def test_the_synthetic_caches_span_several_chunks_and_truncate(sources):
    """What the synthetic plans exercise: entry and hidden arrays of several Zarr chunks per shard,
    samples longer than seq_len, completion masks that start inside a sample."""
    from logitcache import open_cache

    cache = open_cache(sources("synthetic", "compact"))
    shard = cache.shards[0].name
    for name in ("dist/ids", f"hidden/{LAYER}"):
        arr = cache.array(shard, name)
        assert arr.shape[0] > 2 * arr.chunks[0], name
    n = np.array(cache.samples.column("num_tokens"))
    assert (n > 1024).any() and (n < 12).any() and (np.array(cache.samples.column("prompt_tokens")) > 1).any()


def record() -> None:
    """Write the digests of the loader as it is now (run from the repository root)."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        made: dict = {}
        for case, (kind, name), kw, how in CASES:
            if (kind, name) not in made:
                made[kind, name] = (copy_fixture(name, Path(tmp)) if kind == "fixture"
                                    else write_synthetic(Path(tmp) / f"synthetic-{name}", name))
            batches = run_plan(made[kind, name], kw, how)
            out[case] = None if batches is None else digest(batches)
            print(case, "-" if batches is None else out[case]["batches"], flush=True)
    DIGESTS.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in out.items()) + "\n}\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    record()
