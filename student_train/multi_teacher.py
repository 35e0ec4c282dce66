"""More than one teacher: other caches over the same samples (same tokenizer, same token ids),
joined to the main stream's rows by ``sample_id``.

The main cache decides what is trained on and how rows are packed; for each document of a batch the
other teacher's rows of that sample are read (``Cache.teacher_rows``) and placed at the same
positions. Tokens are compared, so two caches that tokenised a sample differently are refused rather
than silently misaligned. A row counts for the other teacher only where it is a loss row of the batch
and a scored row of that cache. Reads are per sample (random access), so joining is slower than the
main stream.
"""

from __future__ import annotations

import numpy as np
import torch

from logitcache.format.errors import LogitcacheError
from logitcache.store.reader import open_cache

from .data import CacheStream
from .targets import SparseTargets


class TeacherJoin:
    def __init__(self, url: str, main: CacheStream):
        self.cache = open_cache(url, storage_options=main.cache.cfs.storage_options or None)
        self.url = url
        mine, theirs = main.cache.manifest.tokenizer, self.cache.manifest.tokenizer
        if (mine.vocab_size, mine.vocab_sha256) != (theirs.vocab_size, theirs.vocab_sha256):
            raise LogitcacheError(f"teacher cache {url} has another tokenizer than {main.url}; "
                                  "multi-teacher distillation needs one vocabulary")
        table = self.cache.samples.select(["sample_id", "shard", "token_offset", "num_tokens", "scored_start",
                                           "scored_end"]).to_pylist()
        self.index = {r["sample_id"]: r for r in table}
        missing = [s for s in main.sample_ids if s not in self.index]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise LogitcacheError(f"teacher cache {url} lacks {len(missing)} sample(s) of {main.url}: "
                                  f"{', '.join(missing[:5])}{more}")
        self.main = main
        self.encoding = self.cache.encoding
        if self.encoding.estimated:
            raise LogitcacheError(f"teacher cache {url} is a {self.encoding.name} cache: multi-teacher training "
                                  "combines bucket divergences and needs topk, adaptive, compact or full caches")
        self.k = self.encoding.width(self.cache.manifest.capture.top_k)

    def __call__(self, batch: dict, prefix: str) -> dict:
        """This teacher's targets ``{prefix}`` (``SparseTargets``: ids and log-probs (B, T, k), the exact tail
        (B, T) where the encoding stores it) and ``{prefix}_mask`` (B, T), at the batch's positions."""
        tokens, doc = batch["input_ids"].numpy(), batch["document_ids"].numpy()
        pos, index, loss = batch["position_ids"].numpy(), batch["sample_index"].numpy(), batch["loss_mask"].numpy()
        B, T = tokens.shape
        ragged = self.encoding.ragged
        ids = np.full((B, T, self.k), -1 if ragged else 0, np.int64)
        lps = np.full((B, T, self.k), -np.inf if ragged else 0.0, np.float32)
        tail = np.zeros((B, T), np.float32)
        mask = np.zeros((B, T), bool)
        for b, t in zip(*np.nonzero((pos == 0) & (doc != 0))):          # one document at a time
            n = int((doc[b] == doc[b, t]).sum())
            sid = self.main.sample_id(int(index[b, t]))
            rec = self.index[sid]
            start = rec["token_offset"]
            stored = self.cache.read_rows(rec["shard"], start, start + n, ["tokens"])["tokens"]
            if not np.array_equal(stored.astype(np.int64), tokens[b, t:t + n]):
                raise LogitcacheError(f"sample {sid}: teacher cache {self.url} holds other tokens than {self.main.url}")
            m = loss[b, t:t + n].copy()
            m[:rec["scored_start"]] = False
            m[rec["scored_end"]:] = False
            rows = self.cache.teacher_rows(rec["shard"], start, start + n)      # decoded, padded to k
            r_ids, r_lp = rows.padded(self.k)
            ids[b, t:t + n][m], lps[b, t:t + n][m] = r_ids[m], r_lp[m]
            if rows.tail is not None:
                tail[b, t:t + n][m] = rows.tail[m]
            mask[b, t:t + n] = m
        targets = SparseTargets(torch.from_numpy(ids), torch.from_numpy(lps),
                                torch.from_numpy(tail) if self.encoding.stores_tail else None)
        return {prefix: targets, f"{prefix}_mask": torch.from_numpy(mask)}
