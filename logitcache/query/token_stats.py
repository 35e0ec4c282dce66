"""Token-level statistics, streamed from the shards' Zarr arrays chunk by chunk.

Every token row belongs to one sample (samples are laid end to end in a shard), so a chunk of rows
maps to samples with one ``searchsorted`` over the shard's ``token_offset`` column; per-sample sums
are then ``bincount``s. Memory is one chunk of rows plus one shard's index columns, whatever the
size of the cache; there is no Python loop per token or per sample.

Two tables come from here:

- ``token_stats`` (one row per sample): how many scored tokens have an entropy above a threshold,
  and their share. High-entropy tokens are the "forking tokens" where the teacher hesitates between
  continuations (Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive
  Effective Reinforcement Learning for LLM Reasoning"); samples rich in them carry most of what a
  student can learn from the teacher's distribution.
- ``tokens`` (one row per token): sample_id, position, token, entropy, target_logprob.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from ..format.arrays import ENTROPY, TARGET_LOGPROB, TOKENS
from ..format.manifest import ShardRecord
from ..store.reader import Cache
from .thresholds import DEFAULT_THRESHOLD  # noqa: F401  (re-exported)
CHUNK_TOKENS = 1 << 16
INDEX_COLUMNS = ["sample_id", "token_offset", "num_tokens", "scored_start", "scored_end"]

# (name, arrow type, meaning): docs/query.md mirrors these.
TOKEN_STATS_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("sample_id", pa.string(), "the sample (joins samples on sample_id)"),
    ("high_entropy_tokens", pa.int32(), "scored rows whose entropy is above the threshold (nats)"),
    ("high_entropy_share", pa.float64(), "high_entropy_tokens / scored rows; null for a sample without scored rows"),
]
TOKENS_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("sample_id", pa.string(), "the sample this row belongs to"),
    ("position", pa.int32(), "row within the sample (0 = its first token); the row's index in the arrays is token_offset + position"),
    ("token", pa.int64(), "token id at this position"),
    ("entropy", pa.float32(), "entropy (nats) of the next-token distribution; null outside the scored rows"),
    ("target_logprob", pa.float32(), "log-probability of the next token; null outside the scored rows"),
]
TOKEN_STATS_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in TOKEN_STATS_COLUMNS])
TOKENS_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in TOKENS_COLUMNS])


def shard_index(cache: Cache, shard: str) -> pa.Table:
    """The columns of a shard's samples that locate its rows (not the prompt and response texts)."""
    return cache.shard_samples(shard, INDEX_COLUMNS)


@dataclass
class SampleRows:
    """Rows [start, stop) of one shard, each tagged with its sample."""

    shard: str
    index: pa.Table          # the shard's INDEX_COLUMNS, one row per sample
    first_sample: int        # row of the shard's first sample in the cache's samples table
    start: int
    stop: int
    sample: np.ndarray       # (rows,) int64: the row's sample, as a row of ``index``
    position: np.ndarray     # (rows,) int64: row within its sample
    scored: np.ndarray       # (rows,) bool: inside [scored_start, scored_end) of its sample
    arrays: dict[str, np.ndarray]

    @property
    def scored_position(self) -> np.ndarray:
        """(rows,) position among the sample's scored rows (0 = first scored row); meaningful where scored."""
        return self.position - self.index.column("scored_start").to_numpy()[self.sample]


def iter_sample_rows(cache: Cache, arrays: list[str], chunk_tokens: int = CHUNK_TOKENS) -> Iterator[SampleRows]:
    """Every token row of every committed shard, in manifest order, ``chunk_tokens`` rows at a time."""
    first = 0
    for s in cache.shards:
        index = shard_index(cache, s.name)
        offsets = index.column("token_offset").to_numpy()
        lengths = index.column("num_tokens").to_numpy()
        start_rel = index.column("scored_start").to_numpy()
        end_rel = index.column("scored_end").to_numpy()
        for start in range(0, s.tokens, chunk_tokens):
            stop = min(start + chunk_tokens, s.tokens)
            rows = np.arange(start, stop, dtype=np.int64)
            sample = np.maximum(np.searchsorted(offsets, rows, side="right") - 1, 0)   # (rows,)
            position = rows - offsets[sample]
            scored = (position >= start_rel[sample]) & (position < end_rel[sample]) & (position < lengths[sample])
            yield SampleRows(s.name, index, first, start, stop, sample, position, scored,
                             cache.read_rows(s.name, start, stop, arrays))
        first += index.num_rows


def compute_token_stats(cache: Cache, threshold: float, chunk_tokens: int = CHUNK_TOKENS) -> pa.Table:
    """Per sample (in the cache's samples order): scored rows with entropy > ``threshold``, and their share."""
    n = cache.manifest.num_samples
    scored = np.zeros(n, dtype=np.int64)
    high = np.zeros(n, dtype=np.int64)
    ids: list[pa.Array] = []
    last_shard = None
    for c in iter_sample_rows(cache, [ENTROPY], chunk_tokens):
        if c.shard != last_shard:
            ids.append(c.index.column("sample_id").combine_chunks())
            last_shard = c.shard
        ent = c.arrays[ENTROPY]                                   # (rows,) float32, NaN outside scored rows
        ok = c.scored & ~np.isnan(ent)
        g = c.first_sample + c.sample                             # (rows,) sample row in the cache
        scored += np.bincount(g[ok], minlength=n)
        high += np.bincount(g[ok & (ent > np.float64(threshold))], minlength=n)  # compared in float64
    # shards without token rows still have their (empty) samples listed
    seen = sum(len(a) for a in ids)
    if seen < n:
        ids = [shard_index(cache, s.name).column("sample_id").combine_chunks() for s in cache.shards]
    share = np.divide(high, scored, out=np.zeros(n), where=scored > 0)
    return pa.table([
        pa.concat_arrays(ids) if ids else pa.array([], pa.string()),
        pa.array(high.astype(np.int32)),
        pa.array(share, mask=scored == 0),
    ], schema=TOKEN_STATS_SCHEMA)


def shard_tokens(cache: Cache, record: ShardRecord, chunk_tokens: int = CHUNK_TOKENS) -> pa.Table:
    """The ``tokens`` rows of one shard: one row per token, NaN statistics outside scored rows as null."""
    shard = record.name
    index = shard_index(cache, shard)
    offsets = index.column("token_offset").to_numpy()
    ids = index.column("sample_id").combine_chunks()
    parts = []
    for start in range(0, record.tokens, chunk_tokens):
        stop = min(start + chunk_tokens, record.tokens)
        a = cache.read_rows(shard, start, stop, [TOKENS, ENTROPY, TARGET_LOGPROB])
        rows = np.arange(start, stop, dtype=np.int64)
        sample = np.maximum(np.searchsorted(offsets, rows, side="right") - 1, 0)
        ent, tgt = a[ENTROPY], a[TARGET_LOGPROB]
        parts.append(pa.table([
            ids.take(pa.array(sample)),
            pa.array((rows - offsets[sample]).astype(np.int32)),
            pa.array(a[TOKENS].astype(np.int64)),
            pa.array(ent, mask=np.isnan(ent)),
            pa.array(tgt, mask=np.isnan(tgt)),
        ], schema=TOKENS_SCHEMA))
    return pa.concat_tables(parts) if parts else TOKENS_SCHEMA.empty_table()
