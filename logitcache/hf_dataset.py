"""A cache as a Hugging Face ``datasets.IterableDataset``: one example per sample, decoded the same way
for every encoding (``Cache.sample_view``), for trainers and tools that speak ``datasets``.

Each example holds the sample's metadata (``sample_id``, ``source``, ``row``, ``prompt``, ``response``,
``num_tokens``, ``prompt_tokens``, ``scored_start``, ``scored_end``, ``mean_entropy``) and its arrays:
``tokens`` (n,), ``entropy`` (n,), ``target_logprob`` (n,), any ``hidden/<layer>`` (n, d) and
``attn/...`` the cache holds, and the teacher's distribution at each row: ``ids`` (n, W) int64 (-1 after a
row's entries), ``probs`` (n, W) float32 (exact, or unbiased estimates for sampled / hybrid), ``tail``
(n,) float32 and ``estimated`` (bool). W is the most entries a row of that sample has.

The dataset has one ``datasets`` shard per cache shard, so ``datasets.distributed.split_dataset_by_node``
gives each rank whole cache shards when their number divides evenly (and every ``world_size``-th example
otherwise), and ``DataLoader`` workers split the shards among themselves. Each shard is read once, as
whole arrays, and decoded at once; the examples are slices of it.
"""

from __future__ import annotations

import numpy as np

from .store.reader import Cache, open_cache

METADATA = ("sample_id", "source", "row", "prompt", "response", "num_tokens", "prompt_tokens", "scored_start",
            "scored_end", "mean_entropy")


def shard_examples(cache: Cache, shard: str):
    """The examples of one shard, in the shard's sample order (module docstring)."""
    samples = cache.shard_samples(shard)
    tokens = cache.record(shard).tokens
    offsets = np.asarray(samples["token_offset"], dtype=np.int64)
    lengths = np.asarray(samples["num_tokens"], dtype=np.int64)
    ss = offsets + np.asarray(samples["scored_start"], dtype=np.int64)
    se = offsets + np.asarray(samples["scored_end"], dtype=np.int64)
    marks = np.zeros(tokens + 1, dtype=np.int64)            # rows in some [scored_start, scored_end)
    np.add.at(marks, ss, 1)
    np.add.at(marks, se, -1)
    scored = np.cumsum(marks)[:tokens] > 0
    view = cache.view_rows(shard, 0, tokens, scored)
    counts = (view["ids"] >= 0).sum(1)
    meta = samples.select([c for c in METADATA if c in samples.column_names]).to_pylist()
    for rec, a, n in zip(meta, offsets.tolist(), lengths.tolist()):
        width = int(counts[a:a + n].max()) if n else 0
        example = dict(rec)
        for name, value in view.items():
            if name in ("ids", "probs"):
                example[name] = value[a:a + n, :width]
            elif name == "estimated":
                example[name] = bool(value)
            else:
                example[name] = value[a:a + n]
        yield example


def _generate(url: str, storage_options: dict | None, shards: list[str]):
    cache = open_cache(url, storage_options=storage_options)
    for shard in shards:
        yield from shard_examples(cache, shard)


def to_hf_dataset(cache: Cache | str, storage_options: dict | None = None):
    """The cache at ``cache`` (a ``Cache`` or a URL) as a ``datasets.IterableDataset`` of decoded samples
    (module docstring). Shuffle, map, ``with_format("torch")`` and ``split_dataset_by_node`` work as on
    any iterable dataset."""
    from datasets import IterableDataset

    if not isinstance(cache, Cache):
        cache = open_cache(cache, storage_options=storage_options)
    return IterableDataset.from_generator(
        _generate, gen_kwargs={"url": cache.url, "storage_options": cache.cfs.storage_options or None,
                               "shards": [s.name for s in cache.shards]})
