"""Stream a logitcache cache as packed, fixed-length training rows for a student.

``CacheStream`` is a torch ``IterableDataset`` that yields whole batches (dicts of ``[B, T, ...]``
tensors). Three promises shape the design:

**A plan from the samples table alone.** Which samples an epoch visits, in what order, packed into
which rows, for which rank and DataLoader worker, is a pure function of the (selected) samples
table, ``seed`` and ``epoch``; no Zarr array is touched to make it. So every rank and worker
computes the same plan independently, every selected sample lands in exactly one row of exactly
one rank per epoch, and resuming skips rows without reading them.

1. *Shard order*: the selected samples' shards are permuted (seeded by ``(seed, epoch)``).
2. *Shuffle buffer*: the samples are walked shard by shard (each shard in stored order, which is
   what makes reads local) through a buffer of ``shuffle_buffer`` samples: once it is full, each
   step emits a uniformly chosen buffered sample and puts the next walked sample in its place; at
   the end the rest is emitted in random order. A sample therefore leaves the buffer no earlier than
   ``shuffle_buffer`` positions before its walk position, so the rows being read at any time come
   from the few shards around the walk front (plus the occasional straggler). ``shuffle_buffer``
   <= 1 keeps the walk order inside shards; >= the number of samples is a full uniform shuffle.
   ``shuffle=False`` is the cache order (no shard permutation, no buffer).
3. *Packing* (``packing=True``): samples in that order are placed first-fit into the open rows
   (at most ``pack_window`` rows stay open; the oldest is closed when one more is needed; a full row
   closes at once), so rows are filled well while the order stays close to the shuffled one.
   ``packing=False`` puts one sample per row. A sample longer than ``seq_len`` keeps its first
   ``seq_len`` tokens (counted in ``stats["truncated_samples"]``); the label of its last kept row
   is the sample's next token, read from the cache, so no scored row of the kept part is lost.
4. *Ranks*: the rows (in creation order) are split into ``world_size`` contiguous blocks of equal
   size up to one row (contiguous, so each rank reads its own shards). Every rank then gets padding
   rows at the end up to ``batches_per_rank * batch_size`` rows: the same number of full batches on
   every rank, as DDP needs. Padding rows are fully masked; no sample is ever duplicated.
5. *Workers*: batch ``j`` of a rank (counted from the resume point) goes to DataLoader worker
   ``j % num_workers``. The DataLoader asks workers round-robin and returns results in order, so
   the batches come out as ``0, 1, 2, ...`` whatever the number of workers.

**Rows and the attention contract.** Each row holds ``seq_len`` tokens. ``document_ids`` numbers
the documents of a row 1, 2, ... in placement order; 0 marks padding. ``position_ids`` restart at 0
for each document (0 on padding). A document never crosses rows. The trainer must let token ``i``
attend to token ``j`` only when ``j <= i`` and both have the same non-zero document id (a
block-diagonal causal mask, see ``attention.block_causal_mask``); padding positions attend to themselves only.
Row ``t`` of a document is the teacher's row ``t`` (its prediction of token ``t + 1``): the
student's logits at position ``t`` are compared with ``teacher_*[t]`` with no shift, where
``loss_mask[t]``; ``labels[t]`` is the next token there and -100 elsewhere.

**Loss rows.** ``loss_on="scored"``: a sample's rows ``[scored_start, scored_end)``.
``loss_on="completion"`` (the default for generate-mode caches; score-mode caches default to
"scored"): only rows from ``prompt_tokens - 1`` on, i.e. those predicting response tokens,
intersected with the scored rows. Teacher values are copied on loss rows only; everywhere else the
targets hold their padding and ``teacher_entropy`` is 0 (never NaN). Hidden states
(``hidden.<layer>``) and attention queries and keys (``attn_q.<block>`` / ``attn_k.<block>``, (B, T,
heads, head_dim), format 1.5) are copied for every real token (0 on padding).

**Teacher targets** (``batch["teacher"]``, typed: ``targets``), from the cache's encoding decoded
by ``Cache.teacher_rows``, ``teacher_width`` = ``Encoding.width(k)`` columns per token:
``SparseTargets`` for exact encodings: ``ids`` (B, T, W) and ``logprobs`` in rank order (topk and full
as stored, 0 / 0 outside the loss rows; ragged encodings -1 / -inf after a token's entries) and, where
the encoding stores it, ``tail`` (B, T), the exact mass outside the ids; ``EstimatedTargets`` for
sampled / hybrid: ``ids`` (-1 padding), ``targets`` (B, T, W), unbiased estimates of the teacher's p
on those ids, and the exact ``entropy``. ``with_full=True`` on a cache that stores the full
distribution adds ``teacher_full_logprobs`` (B, T, V) for exact metrics; ``dense_targets=True`` makes
those rows the targets (``DenseTargets``). ``token_logprobs=True`` adds, on the loss rows (0 elsewhere),
``teacher_token_logprob`` (B, T) float32, the teacher's log-probability of the next token
(``target_logprob``), and ``behaviour_logprob`` (B, T) float32, its log-probability under the policy that
sampled it (a round cache's ``behaviour_logprob``; the cache must hold it).

**Resumption.** A stream's position is ``(epoch, rows_consumed)``: rows of this rank's epoch
already consumed by the trainer. It is the same number on every rank (all ranks consume equal
batches), so one ``state_dict()`` saved on rank 0 resumes every rank. ``__iter__`` never moves the
position by itself: batches may be prefetched (by the stream's thread and by DataLoader workers,
which hold copies of the stream) long before the trainer uses them. The consumer reports what it
used with ``mark_consumed(rows)``; ``CacheLoader`` (from ``make_dataloader``) does that for every
batch it hands out, and its ``state_dict()`` is the stream's. A later ``__iter__`` (new DataLoader
workers get a fresh copy of the stream) starts at the recorded position, skipping consumed rows
using the plan alone. ``set_epoch(e)`` starts epoch ``e`` from its beginning.

**Reads** (``_Blocks``): each array of a shard is read in blocks (the whole shard, or one Zarr chunk
for wide rows such as hidden states) with ``Cache.read_rows`` (``read_raw`` for bfloat16, widened as
rows are taken), so every chunk is decoded once per epoch while the blocks fit in
``block_cache_bytes``. Blocks cover only what the iterator's remaining batches need (samples closer
than ``merge_gap_rows`` merged; on an object store ``remote_merge_gap_rows``: a shard's needed runs become
one request), are dropped after the last batch that reads them (the plan says
which), and beyond the budget the block needed again latest is dropped first. A helper thread reads
the blocks of the batches in the next ``read_ahead_tokens`` token slots while the current batch is
built. A batch is then filled with no loop per sample or token: its tokens' places and rows are
computed at once, rows gathered per block, and the teacher's rows of the whole batch decoded with one
``Encoding.decode`` call and put in place entry by entry. A background thread builds the next ``prefetch`` batches while the current
one is used; its errors (a read's included) are raised in the consumer, at the place in the stream
where they happened. ``tests/student/test_loader_identity.py`` pins the batches element by element.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import queue
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from logitcache.format import LogitcacheError
from logitcache.format.arrays import (BEHAVIOUR_LOGPROB, FULL_LOGPROBS, SELECTED, TARGET_LOGPROB, absolute_layer,
                                     attention_name, bf16_bits_to_float32)
from logitcache.format.arrays import attention_layers as attention_layers_of
from logitcache.format.encodings import SparseRows, TargetRows, as_targets
from logitcache.format.fingerprint import vocab_sha256
from logitcache.store.reader import Cache, open_cache

from .targets import DenseTargets, EstimatedTargets, SparseTargets

STATE_VERSION = 1
LOSS_ON = ("completion", "scored")
READ_ARRAYS = ("tokens", "entropy")
MAX_BLOCK_ROWS = 1 << 20  # token rows of one block at most
_PLAN_COLUMNS = ["sample_id", "shard", "token_offset", "num_tokens", "prompt_tokens", "scored_start", "scored_end"]


# ---- selection ---------------------------------------------------------------------------------

def where_ids(cache: Cache, where: str) -> pa.Array:
    """The sample ids of ``cache`` whose samples-table row matches ``where``, a SQL condition in the
    dialect of ``logitcache query`` (DuckDB; any column of its ``samples`` view, computed ones such as
    ``perplexity`` included)."""
    from logitcache.query.engine import Engine
    from logitcache.query.errors import QueryError

    try:
        table = Engine(cache, persist=False).run(f"SELECT sample_id FROM samples WHERE {where}").table
    except QueryError as e:
        raise LogitcacheError(f"--where {where!r}: {e}") from None
    return table.column("sample_id").combine_chunks()


def select_samples(table: pa.Table, url: str, sample_ids: Iterable[str] | None = None,
                   where: pc.Expression | pa.Array | None = None) -> pa.Table:
    """The rows of ``table`` with the given ids (all must exist) that match ``where`` (a pyarrow
    expression, or the ids ``where_ids`` found); cache order."""
    columns = table.column_names
    if sample_ids is not None:
        wanted = list(dict.fromkeys(sample_ids))
        mask = pc.is_in(table.column("sample_id"), value_set=pa.array(wanted, pa.string()))
        table = table.filter(mask)
        if table.num_rows != len(wanted):
            found = set(table.column("sample_id").to_pylist())
            missing = [s for s in wanted if s not in found]
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise LogitcacheError(f"{len(missing)} sample id(s) are not in the cache {url}: "
                                  f"{', '.join(map(repr, missing[:5]))}{more}")
    if isinstance(where, (pa.Array, pa.ChunkedArray)):
        table = table.filter(pc.is_in(table.column("sample_id"), value_set=where))
    elif where is not None:
        try:
            table = table.filter(where)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError) as e:
            m = re.search(r"FieldRef\.Name\((\w+)\)", str(e))
            what = f"unknown column {m.group(1)!r}" if m else str(e).splitlines()[0]
            raise LogitcacheError(f"where: {what}; valid columns: {', '.join(columns)}") from None
    return table


# ---- tokenizer check ---------------------------------------------------------------------------

def _vocab_problems(cache: Cache, student) -> list[str]:
    want = cache.manifest.tokenizer
    if hasattr(student, "get_vocab"):
        size, digest = len(student.get_vocab()), vocab_sha256(student)
    else:
        size, digest = student
    problems = []
    if int(size) != want.vocab_size:
        problems.append(f"vocab_size {size} != {want.vocab_size}")
    if digest != want.vocab_sha256:
        problems.append(f"vocab_sha256 {str(digest)[:12]}... != {want.vocab_sha256[:12]}...")
    return problems


def tokenizer_matches(cache: Cache | str, student) -> bool:
    """Whether ``student`` (a tokenizer, or a ``(vocab_size, vocab_sha256)`` pair) is the cache's
    teacher tokenizer: same vocabulary size and digest."""
    return not _vocab_problems(open_cache(cache) if isinstance(cache, str) else cache, student)


def check_student_vocab(cache: Cache | str, student) -> None:
    """Refuse a student whose tokenizer is not the cache's: ``student`` is a tokenizer (with
    ``get_vocab``) or a ``(vocab_size, vocab_sha256)`` pair. (Training takes such a student through
    ``cross_tokenizer``; exact metrics such as ``fidelity`` need the same tokenizer.)"""
    cache = open_cache(cache) if isinstance(cache, str) else cache
    problems = _vocab_problems(cache, student)
    if problems:
        raise LogitcacheError(
            f"the student's tokenizer differs from the teacher tokenizer of {cache.url} ({'; '.join(problems)}): "
            "this measure compares distributions over one vocabulary; use a student with the teacher's tokenizer")


# ---- the epoch plan ----------------------------------------------------------------------------

@dataclass
class EpochPlan:
    """Rows of one epoch over all ranks (CSR: the segments of global row r are
    ``row_ptr[r]:row_ptr[r + 1]``)."""

    epoch: int
    seg_sample: np.ndarray   # (S,) int64  sample position in the selection
    seg_col: np.ndarray      # (S,) int64  first column of the segment in its row
    seg_doc: np.ndarray      # (S,) int64  document id in the row (1, 2, ...)
    row_ptr: np.ndarray      # (R + 1,) int64
    rank_start: np.ndarray   # (world,) first global row of each rank
    rank_count: np.ndarray   # (world,) real rows of each rank
    rows_per_rank: int       # padded: a multiple of batch_size, equal on every rank

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1


def shuffle_buffer_order(walk: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of ``buffer`` items emits ``walk`` in (see the module doc)."""
    n = len(walk)
    if buffer <= 1 or n <= 1:
        return walk.copy()
    out = np.empty(n, dtype=walk.dtype)
    buf = walk[:buffer].tolist()
    draws = rng.random(n)
    emitted = 0
    for item in walk[buffer:].tolist():
        k = int(draws[emitted] * len(buf))
        out[emitted] = buf[k]
        buf[k] = item
        emitted += 1
    out[emitted:] = np.asarray(buf, dtype=walk.dtype)[rng.permutation(len(buf))]
    return out


def pack_rows(order: np.ndarray, lengths: np.ndarray, seq_len: int, window: int):
    """First-fit packing of ``lengths[order]`` (each <= seq_len) into rows of ``seq_len``, keeping
    at most ``window`` rows open. Returns (seg_sample, seg_col, seg_doc, row_ptr), rows in creation
    order, segments of a row in placement order."""
    rows: list[list[int]] = []
    fill: list[int] = []
    open_rows: list[int] = []
    for s in order.tolist():
        n = int(lengths[s])
        for i, r in enumerate(open_rows):
            if fill[r] + n <= seq_len:
                break
        else:
            r, i = len(rows), len(open_rows)
            rows.append([])
            fill.append(0)
            open_rows.append(r)
            if len(open_rows) > window:
                open_rows.pop(0)
                i -= 1
        rows[r].append(s)
        fill[r] += n
        if fill[r] >= seq_len:
            open_rows.pop(i)
    counts = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    row_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    seg_sample = np.fromiter((s for r in rows for s in r), dtype=np.int64, count=int(row_ptr[-1]))
    starts = np.concatenate([[0], np.cumsum(lengths[seg_sample])]).astype(np.int64)  # tokens before each segment
    seg_col = starts[:-1] - np.repeat(starts[row_ptr[:-1]], counts)
    seg_doc = np.arange(len(seg_sample), dtype=np.int64) - np.repeat(row_ptr[:-1], counts) + 1
    return seg_sample, seg_col, seg_doc, row_ptr


def default_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---- the stream --------------------------------------------------------------------------------

class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()
# stop events of live prefetch threads: set at interpreter exit, before daemon threads would be frozen
# in the middle of a torch call (which aborts the process: "terminate called without an active exception")
_PREFETCHERS: dict[threading.Thread, threading.Event] = {}


@atexit.register
def _stop_prefetchers() -> None:
    for thread, stop in list(_PREFETCHERS.items()):
        stop.set()
        thread.join(timeout=10)


class CacheStream(IterableDataset):
    """Packed ``[batch_size, seq_len]`` batches over a cache, exactly once per epoch across ranks
    and DataLoader workers; see the module doc for the plan, the row contract and resumption."""

    merge_gap_rows = 1024  # samples of a shard closer than this are read in one request
    # on an object store a request costs more than the bytes it skips: a worker that builds every other
    # batch would make tens of small range requests per array; it reads the whole runs instead
    remote_merge_gap_rows = 1 << 22
    block_bytes = 32 << 20  # an array of a shard up to this size is read whole; wider ones a chunk at a time
    block_cache_bytes = 1 << 30  # decoded blocks kept across batches, at most (see _Blocks)
    read_ahead_tokens = 1 << 17  # token slots (rows x seq_len) of later batches whose blocks are read ahead

    def __init__(self, cache: Cache | str, seq_len: int, batch_size: int = 1, *, packing: bool = True,
                 shuffle: bool = True, seed: int = 0, shuffle_buffer: int = 1024, pack_window: int = 8,
                 hidden_layers: Iterable[int] = (), loss_on: str | None = None,
                 sample_ids: Iterable[str] | None = None, where: str | pc.Expression | None = None,
                 rank: int | None = None, world_size: int | None = None, prefetch: int = 2, pad_id: int = 0,
                 storage_options: dict | None = None, allow_partial: bool = False, with_full: bool = False,
                 dense_targets: bool = False, token_logprobs: bool = False, attention_layers: Iterable[int] = ()):
        if seq_len < 2:
            raise LogitcacheError(f"seq_len must be at least 2 (a row needs a token and its next one), got {seq_len}")
        if batch_size < 1:
            raise LogitcacheError(f"batch_size must be at least 1, got {batch_size}")
        if pack_window < 1:
            raise LogitcacheError(f"pack_window must be at least 1, got {pack_window}")
        if seed < 0:
            raise LogitcacheError(f"seed must be non-negative, got {seed}")
        if isinstance(cache, Cache):
            self._cache: Cache | None = cache
            self.url, storage_options = cache.url, cache.cfs.storage_options
            allow_partial = True  # the caller opened it; workers reopen it the same way
        else:
            self._cache = open_cache(cache, allow_partial=allow_partial, storage_options=storage_options)
            self.url = str(cache)
        self._storage_options, self._allow_partial, self._pid = storage_options, allow_partial, os.getpid()
        manifest = self._cache.manifest
        self.seq_len, self.batch_size, self.packing = int(seq_len), int(batch_size), bool(packing)
        self.shuffle, self.seed, self.shuffle_buffer = bool(shuffle), int(seed), int(shuffle_buffer)
        self.pack_window = int(pack_window) if packing else 1
        self.prefetch, self.pad_id = int(prefetch), int(pad_id)

        self.encoding = self._cache.encoding
        self.teacher_width = self.encoding.width(manifest.capture.top_k)
        if (with_full or dense_targets) and not stores_full_distribution(self._cache):
            raise LogitcacheError(f"{self.url} was captured with --encoding {self.encoding.name}: it holds no full "
                                  "distributions (capture with --encoding full for exact metrics or --full-targets)")
        self.with_full = bool(with_full or dense_targets)
        self.dense_targets = bool(dense_targets)     # the targets are the full rows (DenseTargets)
        if token_logprobs and BEHAVIOUR_LOGPROB not in manifest.arrays:
            raise LogitcacheError(f"{self.url} holds no {BEHAVIOUR_LOGPROB} array: the log-probabilities of sampled "
                                  "tokens under the student that sampled them come from an on-policy round cache "
                                  "(student-onpolicy)")
        self.token_logprobs = bool(token_logprobs)
        # 1.6: rows a capture left without a distribution (--positions-from): CE there, no distillation
        self.has_selected = SELECTED in manifest.arrays
        self.loss_on = loss_on or ("completion" if manifest.capture.mode == "generate" else "scored")
        if self.loss_on not in LOSS_ON:
            raise LogitcacheError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")

        available = list(manifest.capture.hidden_layers)
        self.hidden_layers: list[int] = []
        for layer in hidden_layers:
            resolved = absolute_layer(layer, manifest.teacher.num_layers)
            if resolved not in available:
                have = f"it holds layers {', '.join(map(str, available))}" if available else "it holds no hidden states"
                raise LogitcacheError(f"hidden layer {layer} is not in the cache {self.url}; {have}")
            if resolved not in self.hidden_layers:
                self.hidden_layers.append(resolved)
        stored_blocks = attention_layers_of(manifest.arrays)          # 1.5: attn/<block>_q / _k
        self.attention_layers: list[int] = []
        for block in attention_layers:
            resolved = block + manifest.teacher.num_layers if block < 0 else block
            if resolved not in stored_blocks:
                have = (f"it holds blocks {', '.join(map(str, stored_blocks))}" if stored_blocks else
                        "it holds no attention queries and keys (capture --attention-layers)")
                raise LogitcacheError(f"attention block {block} is not in the cache {self.url}; {have}")
            if resolved not in self.attention_layers:
                self.attention_layers.append(resolved)

        world_default = default_rank_world() if rank is None or world_size is None else (0, 1)
        self.rank = int(rank if rank is not None else world_default[0])
        self.world_size = int(world_size if world_size is not None else world_default[1])
        if not 0 <= self.rank < self.world_size:
            raise LogitcacheError(f"rank {self.rank} is not in [0, world_size={self.world_size})")

        table = select_samples(self._cache.samples, self.url, sample_ids,
                               where_ids(self._cache, where) if isinstance(where, str) else where)
        if table.num_rows == 0:
            raise LogitcacheError(f"the selection matches no sample of {self.url}")
        table = table.select(_PLAN_COLUMNS)
        self._ids = table.column("sample_id").combine_chunks()
        shard_col = table.column("shard").combine_chunks().dictionary_encode()
        self._shard_names: list[str] = shard_col.dictionary.to_pylist()
        self._shard_code = shard_col.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        col = {name: table.column(name).to_numpy().astype(np.int64) for name in _PLAN_COLUMNS[2:]}
        self._offset, self._num_tokens = col["token_offset"], col["num_tokens"]
        self._used = np.minimum(self._num_tokens, self.seq_len)
        lo = col["scored_start"]
        if self.loss_on == "completion":  # rows predicting response tokens: from prompt_tokens - 1 on
            lo = np.maximum(lo, col["prompt_tokens"] - 1)
        self._loss_hi = np.minimum(col["scored_end"], self._used)
        self._loss_lo = np.minimum(lo, self._loss_hi)
        # samples of each shard, in stored order: the walk of the shuffle buffer
        by_shard = np.lexsort((self._offset, self._shard_code))
        bounds = np.searchsorted(self._shard_code[by_shard], np.arange(len(self._shard_names) + 1))
        self._members = [by_shard[bounds[i]:bounds[i + 1]] for i in range(len(self._shard_names))]
        self._selection_digest: str | None = None

        self.epoch, self.rows_consumed = 0, 0
        self._plan_cache: EpochPlan | None = None

    # ---- selection and plan --------------------------------------------------------------------
    @property
    def sample_ids(self) -> list[str]:
        """Ids of the selected samples in cache order; ``sample_index`` in batches indexes this."""
        return self._ids.to_pylist()

    def sample_id(self, index: int) -> str:
        """The id of ``sample_index`` value ``index`` (without building the whole list)."""
        return self._ids[index].as_py()

    @property
    def num_samples(self) -> int:
        return len(self._ids)

    def shard_of(self, index: int) -> str:
        """The name of the shard that holds sample ``index``."""
        return self._shard_names[int(self._shard_code[index])]

    def shard_samples(self, shard: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """The selected samples ``shard`` holds (their indices, in stored order) and the teacher tokens of
        each as a row holds them (its first ``seq_len``, int64): one read of the shard's tokens."""
        members = self._members[self._shard_names.index(shard)]
        if not len(members):
            return members, []
        starts, used = self._offset[members], self._used[members]
        lo, hi = int(starts.min()), int((starts + used).max())
        tokens = self._read(self.cache, shard, lo, hi, ["tokens"])["tokens"].astype(np.int64)
        return members, [tokens[s - lo:s - lo + n] for s, n in zip(starts.tolist(), used.tolist())]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        walk = np.concatenate([self._members[i] for i in rng.permutation(len(self._members))])
        return shuffle_buffer_order(walk, self.shuffle_buffer, rng)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The epoch's rows for every rank, from the samples table only (cached per epoch)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is not None and self._plan_cache.epoch == epoch:
            return self._plan_cache
        order = self._epoch_order(epoch)
        if self.packing:
            seg_sample, seg_col, seg_doc, row_ptr = pack_rows(order, self._used, self.seq_len, self.pack_window)
        else:
            seg_sample, row_ptr = order, np.arange(len(order) + 1, dtype=np.int64)
            seg_col, seg_doc = np.zeros(len(order), np.int64), np.ones(len(order), np.int64)
        rows = len(row_ptr) - 1
        q, r = divmod(rows, self.world_size)
        counts = np.array([q + (k < r) for k in range(self.world_size)], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        per_rank = math.ceil(math.ceil(rows / self.world_size) / self.batch_size) * self.batch_size
        self._plan_cache = EpochPlan(epoch, seg_sample, seg_col, seg_doc, row_ptr, starts, counts, per_rank)
        return self._plan_cache

    @property
    def batches_per_rank(self) -> int:
        return self.plan().rows_per_rank // self.batch_size

    def __len__(self) -> int:
        """Batches this rank still yields in the current epoch (from the resume point)."""
        return self.batches_per_rank - self.rows_consumed // self.batch_size

    @property
    def stats(self) -> dict[str, Any]:
        """Counts of the current epoch's plan over all ranks (padding rows included in ``rows``)."""
        plan = self.plan()
        slots = plan.rows_per_rank * self.world_size * self.seq_len
        tokens = int(self._used.sum())
        return {
            "epoch": plan.epoch, "samples": self.num_samples, "tokens": tokens,
            "loss_tokens": int((self._loss_hi - self._loss_lo).sum()),
            "truncated_samples": int((self._num_tokens > self.seq_len).sum()),
            "rows": plan.rows_per_rank * self.world_size, "data_rows": plan.num_rows,
            "rows_per_rank": plan.rows_per_rank, "batches_per_rank": plan.rows_per_rank // self.batch_size,
            "padding_share": 1.0 - tokens / slots,
        }

    # ---- position --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (call before each epoch, as with DistributedSampler)."""
        self.epoch, self.rows_consumed = int(epoch), 0

    def mark_consumed(self, rows: int) -> None:
        """The trainer used ``rows`` more rows (a multiple of batch_size) of this rank's epoch."""
        if rows % self.batch_size:
            raise LogitcacheError(f"consumed rows must be whole batches of {self.batch_size}, got {rows}")
        self.rows_consumed += int(rows)

    def _identity(self) -> dict[str, Any]:
        if self._selection_digest is None:
            h = hashlib.sha256()
            for start in range(0, len(self._ids), 1 << 16):
                h.update("\n".join(self._ids.slice(start, 1 << 16).to_pylist()).encode() + b"\n")
            self._selection_digest = h.hexdigest()
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "world_size": self.world_size, "packing": self.packing, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "pack_window": self.pack_window,
                "samples": self.num_samples, "selection_sha256": self._selection_digest}

    def state_dict(self) -> dict[str, Any]:
        """Position of this rank's stream (the same on every rank): epoch and rows consumed."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "rows_consumed": self.rows_consumed,
                "plan": self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken; refuses a stream whose plan would differ."""
        if state.get("version") != STATE_VERSION:
            raise LogitcacheError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self._identity()
        for key, value in state["plan"].items():
            if mine.get(key) != value:
                raise LogitcacheError(f"stream state was saved with {key} = {value!r}, but this stream has "
                                      f"{mine.get(key)!r}; resuming would not continue the same plan")
        epoch, rows = int(state["epoch"]), int(state["rows_consumed"])
        if rows % self.batch_size:
            raise LogitcacheError(f"stream state: rows_consumed {rows} is not whole batches of {self.batch_size}")
        if rows > self.plan(epoch).rows_per_rank:
            raise LogitcacheError(f"stream state: rows_consumed {rows} exceeds the epoch's "
                                  f"{self.plan(epoch).rows_per_rank} rows per rank")
        self.epoch, self.rows_consumed = epoch, rows

    # ---- iteration -------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # reopened (manifest only) where the copy runs
        return state

    @property
    def cache(self) -> Cache:
        """The cache this stream reads (reopened, manifest only, in a process the stream was copied to)."""
        if self._cache is None or self._pid != os.getpid():
            self._cache = open_cache(self.url, allow_partial=self._allow_partial, storage_options=self._storage_options)
            self._pid = os.getpid()
        return self._cache

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan()
        first = self.rows_consumed // self.batch_size
        batches = range(first + worker, plan.rows_per_rank // self.batch_size, workers)
        return self._prefetched(self._batches(plan, batches))

    def _batches(self, plan: EpochPlan, batches: range) -> Iterator[dict[str, torch.Tensor]]:
        blocks = _Blocks(self, plan, batches)       # made where the batches are built (thread, worker)
        try:
            for j in batches:
                yield self._build_batch(plan, j, blocks)
        finally:
            blocks.close()

    def _prefetched(self, batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        if self.prefetch <= 0:
            yield from batches
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce() -> None:
            try:
                for batch in batches:
                    if not put(batch):
                        return
                put(_DONE)
            except BaseException as e:  # handed to the consumer, raised there
                put(_Failure(e))
            finally:
                getattr(batches, "close", lambda: None)()   # in this thread: the batches' reader stops here

        thread = threading.Thread(target=produce, name="logitcache-prefetch", daemon=True)
        _PREFETCHERS[thread] = stop
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            thread.join(timeout=30)
            _PREFETCHERS.pop(thread, None)

    def _segments(self, plan: EpochPlan, batches: Iterable[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every segment of the given batches of this rank: (batch ordinal, row in its batch, segment index),
        in batch, row and placement order."""
        batches = np.asarray(list(batches), dtype=np.int64)
        local = batches[:, None] * self.batch_size + np.arange(self.batch_size, dtype=np.int64)   # (nb, B)
        real = local < plan.rank_count[self.rank]
        ordinal, row = np.nonzero(real)
        g = plan.rank_start[self.rank] + local[real]                                # global rows
        n = plan.row_ptr[g + 1] - plan.row_ptr[g]                                   # segments per row
        seg = np.repeat(plan.row_ptr[g] - _starts(n), n) + np.arange(int(n.sum()), dtype=np.int64)
        return np.repeat(ordinal, n), np.repeat(row, n), seg

    def _build_batch(self, plan: EpochPlan, batch: int, blocks: "_Blocks | None" = None) -> dict:
        if blocks is None:      # a batch on its own
            blocks = _Blocks(self, plan, [batch])
            try:
                return self._build_batch(plan, batch, blocks)
            finally:
                blocks.close()
        cache = self.cache
        B, T = self.batch_size, self.seq_len
        W, enc = self.teacher_width, self.encoding
        pad_id, pad_value = (-1, -np.inf) if enc.ragged else (0, 0.0)
        out = {
            "input_ids": np.full((B, T), self.pad_id, np.int64),
            "labels": np.full((B, T), -100, np.int64),
            "loss_mask": np.zeros((B, T), np.bool_),
            "position_ids": np.zeros((B, T), np.int64),
            "document_ids": np.zeros((B, T), np.int64),
            "sample_index": np.full((B, T), -1, np.int64),
            "teacher_entropy": np.zeros((B, T), np.float32),
        }
        if self.token_logprobs:
            out["teacher_token_logprob"] = np.zeros((B, T), np.float32)
            out["behaviour_logprob"] = np.zeros((B, T), np.float32)
        t_ids = np.full((B, T, W), pad_id, np.int64)
        t_values = np.full((B, T, W), 0.0 if enc.estimated else pad_value, np.float32)   # targets or log-probs
        t_tail = np.zeros((B, T), np.float32) if enc.stores_tail and not enc.estimated else None
        if self.with_full:
            out["teacher_full_logprobs"] = np.zeros((B, T, cache.manifest.teacher.vocab_size), np.float32)
        d = cache.manifest.teacher.hidden_size
        for layer in self.hidden_layers:
            out[f"hidden.{layer}"] = np.zeros((B, T, d), np.float32)
        for block in self.attention_layers:
            for part in ("q", "k"):
                row = cache.manifest.arrays[attention_name(block, part)].row_shape
                out[f"attn_{part}.{block}"] = np.zeros((B, T, *row), np.float32)

        blocks.start(batch)
        _, seg_row, seg = self._segments(plan, [batch])
        if len(seg):
            # every token of the batch at once: where it goes (flat b * T + column) and where it comes from
            samples = plan.seg_sample[seg]
            used, lo, hi = self._used[samples], self._loss_lo[samples], self._loss_hi[samples]
            first = seg_row * T + plan.seg_col[seg]                  # flat slot of each segment's first token
            tok = np.repeat(np.arange(len(seg)), used)               # (N,) segment of each token
            t = np.arange(len(tok), dtype=np.int64) - np.repeat(_starts(used), used)
            dest, rows, shards = first[tok] + t, self._offset[samples][tok] + t, self._shard_code[samples][tok]
            flat = {name: a.reshape(B * T, *a.shape[2:]) for name, a in out.items()}
            flat["position_ids"][dest] = t
            flat["document_ids"][dest] = plan.seg_doc[seg][tok]
            flat["sample_index"][dest] = samples[tok]
            on = (t >= lo[tok]) & (t < hi[tok])                        # loss rows: [lo, hi) of each segment
            # values are gathered by shard and row (``_Rows`` order) and put at their places in that order
            every = _Rows(shards, rows)
            sorted_dest = dest[every.order]
            flat["input_ids"][sorted_dest] = blocks.take("tokens", every)
            for layer in self.hidden_layers:
                blocks.take_into(f"hidden/{layer}", every, flat[f"hidden.{layer}"], sorted_dest)
            for block in self.attention_layers:
                for part in ("q", "k"):
                    blocks.take_into(attention_name(block, part), every, flat[f"attn_{part}.{block}"], sorted_dest)
            if on.any() and self.has_selected:   # labels on every loss row; the rest only where a distribution is
                loss = _Rows(shards[on], rows[on])
                flat["labels"][dest[on][loss.order]] = blocks.take("tokens", _Rows(loss.shards, loss.rows + 1,
                                                                                  loss.order))
                on[on] = blocks.take(SELECTED, loss)[np.argsort(loss.order)] != 0
            if on.any():
                loss = _Rows(shards[on], rows[on])
                dest = dest[on][loss.order]
                flat["labels"][dest] = blocks.take("tokens", _Rows(loss.shards, loss.rows + 1, loss.order))
                flat["loss_mask"][dest] = True
                flat["teacher_entropy"][dest] = blocks.take("entropy", loss)
                if self.token_logprobs:
                    flat["teacher_token_logprob"][dest] = blocks.take(TARGET_LOGPROB, loss)
                    flat["behaviour_logprob"][dest] = blocks.take(BEHAVIOUR_LOGPROB, loss)
                if self.with_full:
                    blocks.take_into(FULL_LOGPROBS, loss, flat["teacher_full_logprobs"], dest)
                decoded = as_targets(enc.decode(blocks.stored_rows(loss), cache.manifest.teacher.vocab_size))
                _place_rows(decoded, W, enc.ragged, dest, t_ids.reshape(B * T, W), t_values.reshape(B * T, W))
                if t_tail is not None:
                    t_tail.reshape(B * T)[dest] = decoded.tail
        blocks.done(batch)
        batch_out: dict = {name: torch.from_numpy(a) for name, a in out.items()}
        ids, values = torch.from_numpy(t_ids), torch.from_numpy(t_values)
        if self.dense_targets:
            batch_out["teacher"] = DenseTargets(batch_out["teacher_full_logprobs"])
        elif enc.estimated:
            batch_out["teacher"] = EstimatedTargets(ids, values, batch_out["teacher_entropy"])
        else:
            batch_out["teacher"] = SparseTargets(ids, values, None if t_tail is None else torch.from_numpy(t_tail))
        return batch_out

    def _read_raw(self, cache: Cache, shard: str, start: int, stop: int, name: str) -> np.ndarray:
        """Rows [start, stop) of one array as stored (bfloat16 as its 16 bits); failures as in ``_read``."""
        return _naming_failures(cache, shard, start, stop, lambda: cache.read_raw(shard, name, start, stop))

    def _read(self, cache: Cache, shard: str, start: int, stop: int, names: list[str]) -> dict[str, np.ndarray]:
        """Rows [start, stop) of a shard; the reader refuses a shard with a missing or truncated file
        (``CorruptShardError``), and any other failure is re-raised naming the shard and rows."""
        return _naming_failures(cache, shard, start, stop, lambda: cache.read_rows(shard, start, stop, names))


def _naming_failures(cache: Cache, shard: str, start: int, stop: int, read):
    """``read()``; a failure that is not already a LogitcacheError becomes one naming the shard and rows."""
    try:
        return read()
    except LogitcacheError:
        raise
    except Exception as e:
        raise LogitcacheError(f"shard {shard!r} of {cache.url}: reading rows [{start}, {stop}) failed: "
                              f"{type(e).__name__}: {e}") from e


def _place_rows(decoded: SparseRows | TargetRows, width: int, ragged: bool, dest: np.ndarray, ids: np.ndarray,
                values: np.ndarray) -> None:
    """``ids[dest], values[dest] = decoded.padded(width)`` without the padded copy: each entry goes
    straight to its place. The targets already hold what ``padded`` puts after a row's entries (-1 and
    -inf, or 0 for estimates, where rows are ragged; rows of other encodings are full)."""
    counts = decoded.counts
    flat_values = decoded.logprobs if isinstance(decoded, SparseRows) else decoded.targets
    if len(counts) and int(counts.min()) == width == int(counts.max()):
        ids[dest] = decoded.ids.reshape(-1, width)
        values[dest] = flat_values.reshape(-1, width)
    elif ragged and int(counts.max(initial=0)) <= width:
        at = np.repeat(dest * width - _starts(counts), counts) + np.arange(len(decoded.ids), dtype=np.int64)
        ids.reshape(-1)[at] = decoded.ids
        values.reshape(-1)[at] = flat_values
    else:   # rows shorter than the width in an encoding that is not ragged, or too long (padded refuses)
        ids[dest], values[dest] = decoded.padded(width)


def _starts(counts: np.ndarray) -> np.ndarray:
    """(n,) int64: where each of n consecutive runs of ``counts`` items starts."""
    out = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=out[1:])
    return out


class _Blocks:
    """The rows one iterator of a stream reads, in blocks kept across batches.

    Each array of a shard is read in blocks of token rows: the whole shard when its decoded array
    is at most ``CacheStream.block_bytes``, else one Zarr chunk (wide rows: hidden states, full
    distributions), so a chunk is decoded once however many samples and batches it serves. Blocks
    cover only rows this iterator needs: the samples of its remaining batches, merged where they are
    at most ``merge_gap_rows`` apart, cut at block boundaries. The plan says which batches read each
    block: a block is dropped after the last of them, and when more than
    ``CacheStream.block_cache_bytes`` are held, the block needed again latest goes first (read again
    when that time comes). bfloat16 blocks are held as stored (16 bits) and widened as rows are taken."""

    def __init__(self, stream: CacheStream, plan: EpochPlan, batches: Iterable[int]):
        self.stream, self.cache = stream, stream.cache
        batches = list(batches)
        self.ordinal = {j: i for i, j in enumerate(batches)}
        seg_batch, _, seg = stream._segments(plan, batches) if batches else (np.zeros(0, np.int64),) * 3
        samples = plan.seg_sample[seg]
        n_read = np.minimum(stream._num_tokens[samples], stream._used[samples] + 1)   # kept tokens + the last label
        shard = stream._shard_code[samples]
        order = np.lexsort((stream._offset[samples], shard))
        self.needed: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}     # shard -> (starts, stops, ordinal)
        bounds = np.searchsorted(shard[order], np.arange(len(stream._shard_names) + 1))
        for code in np.unique(shard).tolist():
            o = order[bounds[code]:bounds[code + 1]]
            start = stream._offset[samples[o]]
            self.needed[code] = (start, start + n_read[o], seg_batch[o])
        self.pieces: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        self.held: dict[tuple[int, int, int], dict[str, np.ndarray]] = {}   # (shard, grid, piece) -> arrays
        self.held_bytes = 0
        self.next_use: dict[tuple[int, int, int], int] = {}    # batch ordinal that reads a held block next
        self.touched: set = set()                               # blocks read by the batch being built
        self.now = 0
        self.grid: dict[str, int] = {}
        self.largest_shard = max((r.tokens for r in self.cache.shards), default=0)
        self.raw = {name for name, spec in self.cache.manifest.arrays.items()
                    if spec.dtype == "bfloat16" and not spec.per_entry}
        # read-ahead: the blocks of the next batches are read by a helper thread while this one is built
        self.pending: dict[tuple[int, int, int], Future] = {}
        self.pending_bytes = 0
        self.row_bytes: dict[str, float] = {}                     # held bytes per token row, per array
        self.pool: ThreadPoolExecutor | None = None
        self.needs: dict[int, list[tuple[int, int, int]]] = {}   # batch ordinal -> blocks it reads
        self.names_on: dict[int, list[str]] = {}                  # grid -> arrays read on it
        self.lookahead = math.ceil(stream.read_ahead_tokens / (stream.batch_size * stream.seq_len))
        if self.needed and self.lookahead > 0:
            self._index_needs()
            self._read_ahead(0)

    def _index_needs(self) -> None:
        """Which blocks each batch reads (every array the stream reads, on its grid)."""
        stream = self.stream
        names = [*READ_ARRAYS, *(f"hidden/{layer}" for layer in stream.hidden_layers),
                 *(attention_name(b, part) for b in stream.attention_layers for part in ("q", "k")),
                 *([FULL_LOGPROBS] if stream.with_full else []), *stream.encoding.stored_names(),
                 *([TARGET_LOGPROB, BEHAVIOUR_LOGPROB] if stream.token_logprobs else []),
                 *([SELECTED] if stream.has_selected else [])]
        shard = stream._shard_names[next(iter(self.needed))]
        for name in dict.fromkeys(names):
            self.names_on.setdefault(self.block_rows(name, shard), []).append(name)
        ordinals, keys = [], []
        for code in self.needed:
            for grid in self.names_on:
                _, _, use_ptr, uses = self._pieces(code, grid)
                block = np.repeat(np.arange(len(use_ptr) - 1), np.diff(use_ptr))
                ordinals.append(uses)
                keys += [(code, grid, int(i)) for i in block.tolist()]
        ordinals = np.concatenate(ordinals)
        for at in np.argsort(ordinals, kind="stable").tolist():
            self.needs.setdefault(int(ordinals[at]), []).append(keys[at])

    def _read_ahead(self, ordinal: int) -> None:
        """Start reading the blocks of the next ``lookahead`` batches that are not held (while the
        blocks being read come to at most half of ``block_cache_bytes``)."""
        budget = self.stream.block_cache_bytes // 2
        for o in range(ordinal, ordinal + self.lookahead):
            for key in self.needs.get(o, ()):
                if key in self.held or key in self.pending:
                    continue
                size = self._size(key)
                if self.pending_bytes + size > budget and self.pending:
                    return
                if self.pool is None:
                    self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitcache-read")
                self.pending[key] = self.pool.submit(self._fetch, key, self.names_on[key[1]])
                self.pending_bytes += size

    def _size(self, key: tuple[int, int, int]) -> int:
        """About how many bytes reading a block holds (entry arrays at the shard's mean entries per token)."""
        code, grid, i = key
        p_start, p_stop = self._pieces(code, grid)[:2]
        return int(p_stop[i] - p_start[i]) * sum(self.row_bytes[n] for n in self.names_on[grid])

    def _fetch(self, key: tuple[int, int, int], names: list[str]) -> dict[str, np.ndarray]:
        code, grid, i = key
        p_start, p_stop = self._pieces(code, grid)[:2]
        shard, a, b = self.stream._shard_names[code], int(p_start[i]), int(p_stop[i])
        data = {n: self.stream._read_raw(self.cache, shard, a, b, n) for n in names if n in self.raw}
        rest = [n for n in names if n not in self.raw]
        if rest:
            data.update(self.stream._read(self.cache, shard, a, b, rest))
        return data

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.pending.clear()
        self.pending_bytes = 0

    # ---- layout --------------------------------------------------------------------------------
    def block_rows(self, name: str, shard: str) -> int:
        """Token rows per block of array ``name``: the whole shard, or one chunk of a wide array."""
        if name not in self.grid:
            spec = self.cache.manifest.arrays[name]
            arr = self.cache.array(shard, name)
            tokens = max(self.cache.record(shard).tokens, 1)
            if spec.per_entry:
                row_bytes, chunk = max(arr.shape[0] / tokens, 1.0) * arr.dtype.itemsize, 0
            else:
                row_bytes = arr.dtype.itemsize * max(int(np.prod(spec.row_shape, dtype=np.int64)), 1)
                chunk = int(arr.chunks[0])
            self.row_bytes[name] = row_bytes
            if row_bytes * self.largest_shard <= self.stream.block_bytes:
                self.grid[name] = MAX_BLOCK_ROWS
            else:   # a chunk's rows (entry arrays: about a chunk of entries), a power of two
                rows = chunk or 1 << max(int(arr.chunks[0] * arr.dtype.itemsize // row_bytes).bit_length() - 1, 0)
                self.grid[name] = int(rows)
        return self.grid[name]

    def _pieces(self, code: int, rows_per_block: int) -> tuple[np.ndarray, ...]:
        """(starts, stops, use_ptr, uses) of the blocks of a shard on a grid of ``rows_per_block``: the
        needed runs (merged across gaps up to merge_gap_rows) cut at its multiples; block p is read by
        the batches (ordinals, ascending) ``uses[use_ptr[p]:use_ptr[p + 1]]``."""
        key = (code, rows_per_block)
        if key not in self.pieces:
            start, stop, ordinal = self.needed[code]
            reach = np.maximum.accumulate(stop)
            new = np.ones(len(start), dtype=bool)
            gap = self.stream.merge_gap_rows if self.cache.cfs.is_local else self.stream.remote_merge_gap_rows
            new[1:] = start[1:] > reach[:-1] + gap
            run_start = start[new]
            run_stop = reach[np.append(np.flatnonzero(new)[1:] - 1, len(start) - 1)]
            k0, k1 = run_start // rows_per_block, (run_stop - 1) // rows_per_block
            n = k1 - k0 + 1
            k = np.repeat(k0, n) + np.arange(int(n.sum())) - np.repeat(_starts(n), n)
            p_start = np.maximum(np.repeat(run_start, n), k * rows_per_block)
            p_stop = np.minimum(np.repeat(run_stop, n), (k + 1) * rows_per_block)
            # the batches that read each block: those of the samples overlapping it
            first = np.searchsorted(p_start, start, side="right") - 1
            m = np.searchsorted(p_start, stop - 1, side="right") - first
            covered = np.repeat(first, m) + np.arange(int(m.sum())) - np.repeat(_starts(m), m)
            pairs = np.unique(covered * (1 << 32) + np.repeat(ordinal, m))
            block, uses = pairs >> 32, pairs & ((1 << 32) - 1)
            use_ptr = np.searchsorted(block, np.arange(len(p_start) + 1))
            self.pieces[key] = (p_start, p_stop, use_ptr, uses)
        return self.pieces[key]

    def _piece(self, code: int, rows_per_block: int, i: int, names: list[str]) -> dict[str, np.ndarray]:
        key = (code, rows_per_block, i)
        held = self.held.get(key)
        self.touched.add(key)
        self.next_use[key] = self.now
        if held is not None and all(n in held for n in names):
            return held
        future = self.pending.pop(key, None)
        if future is not None:
            self.pending_bytes -= self._size(key)
        data = future.result() if future is not None else {}     # a failed read raises here, where it is used
        data = {n: a for n, a in data.items() if held is None or n not in held}
        missing = [n for n in names if (held is None or n not in held) and n not in data]
        if missing:
            data.update(self._fetch(key, missing))
        held = self.held.setdefault(key, {})
        held.update(data)
        self.held_bytes += sum(x.nbytes for x in data.values())
        while self.held_bytes > self.stream.block_cache_bytes:
            later = [k for k in self.held if k not in self.touched]
            if not later:
                break       # the batch being built needs every held block
            self._drop(max(later, key=self.next_use.__getitem__))
        return held

    def _drop(self, key) -> None:
        held = self.held.pop(key, None)
        self.next_use.pop(key, None)
        if held is not None:
            self.held_bytes -= sum(a.nbytes for a in held.values())

    def start(self, batch: int) -> None:
        """Batch ``batch`` is being built (blocks it reads are kept until ``done``)."""
        self.now = self.ordinal.get(batch, 0)

    def done(self, batch: int) -> None:
        """Batch ``batch`` is built: each block it read is kept for the next batch that reads it, or
        dropped when none does."""
        for key in self.touched:
            code, grid, i = key
            _, _, use_ptr, uses = self._pieces(code, grid)
            later = uses[use_ptr[i]:use_ptr[i + 1]]
            at = int(np.searchsorted(later, self.now, side="right"))
            if at < len(later):
                self.next_use[key] = int(later[at])
            else:
                self._drop(key)
        self.touched.clear()
        if self.needs:
            self._read_ahead(self.now + 1)

    # ---- gathering -----------------------------------------------------------------------------
    # Rows are gathered in ``_Rows`` order (by shard, then row), so each block serves one contiguous
    # range of them; callers put the results at their destinations taken in the same order.
    def _groups(self, name: str, sel: "_Rows") -> list[tuple[int, int, int, int, int]]:
        """``sel``'s rows (in its order) by the block of ``name`` they fall in: (shard code, grid, piece
        index, first, stop), ``first:stop`` a range of ``sel``'s order."""
        grid = self.block_rows(name, self.stream._shard_names[int(sel.shards[0])])
        if grid not in sel.groups:
            groups = []
            for a, b in sel.shard_ranges():
                code = int(sel.sorted_shards[a])
                piece = np.searchsorted(self._pieces(code, grid)[0], sel.sorted_rows[a:b], side="right") - 1
                edges = np.concatenate([[0], np.flatnonzero(piece[1:] != piece[:-1]) + 1, [b - a]]).tolist()
                groups += [(code, grid, int(piece[e0]), a + e0, a + e1) for e0, e1 in zip(edges[:-1], edges[1:])]
            sel.groups[grid] = groups
        return sel.groups[grid]

    def _block(self, name: str, code: int, grid: int, i: int) -> tuple[np.ndarray, int]:
        """Block ``i`` of array ``name`` and its first token row."""
        return self._piece(code, grid, i, [name])[name], int(self._pieces(code, grid)[0][i])

    def take(self, name: str, sel: "_Rows") -> np.ndarray:
        """The rows of ``sel`` of a token-major array, in ``sel``'s order (bfloat16 widened to float32)."""
        out = None
        for code, grid, i, a, b in self._groups(name, sel):
            block, first = self._block(name, code, grid, i)
            values = block[sel.sorted_rows[a:b] - first]
            if name in self.raw:
                values = bf16_bits_to_float32(values)
            if out is None:
                out = np.empty((len(sel.rows), *values.shape[1:]), dtype=values.dtype)
            out[a:b] = values
        return out

    def take_into(self, name: str, sel: "_Rows", target: np.ndarray, dest: np.ndarray) -> None:
        """``target[dest] = take(name, sel)`` (``dest`` in ``sel``'s order), copying runs of rows that
        are consecutive in both (a sample's tokens): for wide rows (hidden states, full distributions)."""
        widen = name in self.raw
        bits = target.view(np.uint32) if widen else None
        for code, grid, i, a, b in self._groups(name, sel):
            block, first = self._block(name, code, grid, i)
            for r0, d0, n in sel.runs(a, b, dest):
                values = block[r0 - first:r0 - first + n]
                if widen:   # bf16_bits_to_float32, written in place: the 16 bits become the float32's high half
                    np.left_shift(values, 16, out=bits[d0:d0 + n], dtype=np.uint32)
                else:
                    target[d0:d0 + n] = values

    def stored_rows(self, sel: "_Rows") -> dict[str, np.ndarray]:
        """The encoding's stored arrays at the rows of ``sel``, in its order (entry arrays: those rows'
        entries laid end to end), as ``Cache.read_rows`` gives them for consecutive rows."""
        manifest = self.cache.manifest
        out = {}
        for name in self.stream.encoding.stored_names():
            spec = manifest.arrays[name]
            if not spec.per_entry:
                out[name] = self.take(name, sel)
                continue
            parts = []
            for code, grid, i, a, b in self._groups(name, sel):
                off = self.cache.entry_offsets(self.stream._shard_names[code], spec.index)
                block, first = self._block(name, code, grid, i)
                base = off[first]                                       # the block's first entry
                parts += [block[off[r0] - base:off[r0 + n] - base] for r0, _, n in sel.runs(a, b)]
            out[name] = np.concatenate(parts) if len(parts) != 1 else parts[0]
        return out


class _Rows:
    """Token rows to gather for a batch (shard codes and rows, in the batch's order), sorted once by
    shard and row; grouped once per block grid (several arrays share one)."""

    def __init__(self, shards: np.ndarray, rows: np.ndarray, order: np.ndarray | None = None):
        self.shards, self.rows = shards, rows
        self.order = np.argsort(shards * (1 << 40) + rows, kind="stable") if order is None else order
        self.sorted_shards, self.sorted_rows = shards[self.order], rows[self.order]
        self.groups: dict[int, list] = {}
        self._runs: dict = {}

    def shard_ranges(self) -> list[tuple[int, int]]:
        cut = np.flatnonzero(self.sorted_shards[1:] != self.sorted_shards[:-1]) + 1
        bounds = [0, *cut.tolist(), len(self.rows)]
        return list(zip(bounds[:-1], bounds[1:]))

    def runs(self, a: int, b: int, dest: np.ndarray | None = None) -> list[tuple[int, int, int]]:
        """Runs of rows ``a:b`` of the sorted order that are consecutive (and, with ``dest``, go to
        consecutive places): (first row, first place or -1, length)."""
        key = (a, b, dest is not None)
        if key not in self._runs:
            rows = self.sorted_rows[a:b]
            step = rows[1:] != rows[:-1] + 1
            if dest is not None:
                d = dest[a:b]
                step |= d[1:] != d[:-1] + 1
            starts = np.concatenate([[0], np.flatnonzero(step) + 1])
            lengths = np.diff(np.append(starts, b - a))
            places = dest[a:b][starts] if dest is not None else np.full(len(starts), -1)
            self._runs[key] = list(zip(rows[starts].tolist(), places.tolist(), lengths.tolist()))
        return self._runs[key]


# ---- loader and helpers ------------------------------------------------------------------------

class CacheLoader:
    """A DataLoader over a ``CacheStream`` that counts each batch it hands out as consumed, so its
    ``state_dict()`` is the exact resume point. Workers are re-created at every ``iter`` (not
    persistent), so each epoch's workers see the stream's current epoch and position."""

    def __init__(self, stream: CacheStream, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None):
        self.stream = stream
        self.kwargs = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                           persistent_workers=False, multiprocessing_context=multiprocessing_context)
        if num_workers > 0 and prefetch_factor is not None:
            self.kwargs["prefetch_factor"] = prefetch_factor

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            for batch in DataLoader(self.stream, **self.kwargs):
                self.stream.mark_consumed(batch["input_ids"].shape[0])
                yield batch
        except LogitcacheError as e:
            raise _unwrap_worker_error(e) from None

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def _unwrap_worker_error(e: LogitcacheError) -> LogitcacheError:
    """torch's DataLoader re-raises a worker's error as ``type(e)(<its whole traceback as text>)``; give
    the user the original one-line message back (the traceback of a user-facing error is noise)."""
    text = str(e)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return e
    last = text.strip().splitlines()[-1]                 # "package.module.Class: message"
    message = last.split(": ", 1)[1] if ": " in last else last
    return type(e)(message)


def make_dataloader(stream: CacheStream, num_workers: int = 0, pin_memory: bool = False,
                    prefetch_factor: int | None = None) -> CacheLoader:
    """The loader a trainer should use (``batch_size=None``: the stream yields whole batches)."""
    return CacheLoader(stream, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)


def concat_batches(batches: list[dict]) -> dict:
    """Batches of the stream joined along the batch dimension (for accumulation or checks)."""
    return {name: (torch.cat([b[name] for b in batches]) if isinstance(first, torch.Tensor)
                   else type(first).cat([b[name] for b in batches]))
            for name, first in batches[0].items()}


def stores_full_distribution(cache: Cache) -> bool:
    """Whether the cache holds every value of the teacher's distribution (``--encoding full``)."""
    return FULL_LOGPROBS in cache.manifest.arrays
