"""Small caches for the interop tests: the committed fixtures of every encoding (score mode, k 4..16) and
generated generate-mode caches whose prompt rows are not scored, with smooth top-k curves (Zipf-like:
the shape a polynomial tail is made for) and k up to 128."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "caches"
VOCAB = 49152                       # SmolLM2's tokenizer: the fixtures' and the generated caches'


def fixture(encoding: str) -> str:
    return str(FIXTURES / f"v1.4-{encoding}")


def make_cache(root: Path, encoding: dict, lengths: list[tuple[int, int]], k: int, seed: int = 0,
               logprob_dtype: str = "float16") -> str:
    """A generate-mode cache at ``root`` of one shard: per (tokens, prompt tokens) a sample whose rows
    [prompt - 1, tokens - 1) are scored, each row k distinct ids with log-probs p_i ~ (i + 1)^-a scaled
    to 1 - tail (a in [0.5, 2.5], tail in [0.01, 0.3]), encoded by ``encoding``'s own encoder."""
    from logitcache.format import SAMPLES_SCHEMA, layout, sample_id
    from logitcache.format.arrays import array_specs
    from logitcache.format.encodings import encoding_from
    from logitcache.store.fs import CacheFS
    from logitcache.store.shard_writer import write_shard
    from logitcache.store.synthetic import synthetic_manifest

    rng = np.random.default_rng(seed)
    enc = encoding_from(encoding)
    n = sum(t for t, _ in lengths)
    tokens = rng.integers(3, VOCAB, size=n)
    cand = np.stack([rng.choice(VOCAB, size=k, replace=False) for _ in range(n)])
    a = rng.uniform(0.5, 2.5, size=(n, 1))
    tail = rng.uniform(0.01, 0.3, size=n)
    p = (np.arange(k)[None, :] + 1.0) ** -a
    p = p / p.sum(1, keepdims=True) * (1 - tail)[:, None]
    lp = np.log(p).astype(np.float32)
    scored = np.zeros(n, dtype=bool)
    rows, off = [], 0
    for i, (t, prompt) in enumerate(lengths):
        scored[off + prompt - 1:off + t - 1] = True
        rows.append({"sample_id": sample_id("synthetic.jsonl", "", i, 0), "shard": layout.shard_name("isynth", 0),
                     "token_offset": off, "num_tokens": t, "prompt_tokens": prompt, "response_tokens": t - prompt,
                     "scored_start": prompt - 1, "scored_end": t - 1, "mean_entropy": 1.0, "max_entropy": 2.0,
                     "p90_entropy": 1.5, "teacher_logprob_sum": -3.0, "finish_reason": "stop",
                     "source": "synthetic.jsonl", "split": "", "row": i, "sample_index": 0, "prompt": f"p{i}",
                     "response": f"r{i}"})
        off += t
    specs = array_specs(VOCAB, k, logprob_dtype, [], 0, "bfloat16", encoding)
    cand_ids = np.where(scored[:, None], cand, 0)
    cand_lp = np.where(scored[:, None], lp, np.nan).astype(np.float32)
    arrays = enc.encode_rows(k, VOCAB, cand_ids, cand_lp, {"tail": tail.astype(np.float32)}, scored, logprob_dtype)
    arrays.update(tokens=tokens.astype(specs["tokens"].storage_dtype),
                  entropy=np.where(scored, 1.0, np.nan).astype(np.float32),
                  target_logprob=np.where(scored, -1.0, np.nan).astype(np.float32))
    cfs = CacheFS(str(root))
    table = pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
    record = write_shard(cfs, layout.shard_name("isynth", 0), arrays, specs, table).record("isynth", 0, worker=0)
    manifest = synthetic_manifest("isynth", specs, [record], vocab=VOCAB, hidden=0, top_k=k, layers=[],
                                  created_by="tests/interop/conftest.py", encoding=encoding,
                                  samples_per_shard=len(lengths))
    cfs.write_atomic(layout.MANIFEST, manifest.to_json().encode())
    return str(root)


GENERATED = {"topk": {"name": "topk"}, "compact": {"name": "compact", "top_p": 0.9, "bits": 10, "lo": -16.0},
             "adaptive": {"name": "adaptive", "top_p": 0.8}}
LENGTHS = [(40, 7), (2, 1), (25, 1), (33, 12), (60, 5)]


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> dict[str, str]:
    """Generate-mode caches (k 32, five samples of 2..60 tokens, prompts of 1..12) of topk, compact, adaptive."""
    root = tmp_path_factory.mktemp("generated")
    return {name: make_cache(root / name, enc, LENGTHS, 32, seed=i) for i, (name, enc) in enumerate(GENERATED.items())}


@pytest.fixture(scope="session")
def tokenizer_dir(smollm2_dir) -> str:
    """SmolLM2's tokenizer alone (the fixtures' and the generated caches' vocabulary)."""
    return str(smollm2_dir)
