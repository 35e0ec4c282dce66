"""How one logical array is stored (``ArraySpec``), the names of the arrays, and their chunking.

Row ``j`` of every token-major array describes the teacher *after reading* ``tokens[j]`` of a sample
(position-aligned): the distribution arrays, ``entropy`` and ``target_logprob`` are about the
*next* token, ``hidden/<layer>`` is the hidden state at position ``j``; ``behaviour_logprob`` (1.4,
on-policy rounds) is about the next token too, under the policy that sampled it. Rows whose next-token
distribution was not captured hold the fill value, so every token-major array has exactly one row
per token and one ``token_offset`` serves all.

Format 1.2 adds *entry* arrays (``dist/``) of ragged rows: an entry array names its ``index``, a
token-major count array, and token ``j``'s entries are rows ``[c[j], c[j+1])`` of it,
``c = [0, cumsum(index)]`` over the shard. Imports nothing else of logitcache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOKENS = "tokens"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
ENTROPY = "entropy"
TARGET_LOGPROB = "target_logprob"
BEHAVIOUR_LOGPROB = "behaviour_logprob"   # 1.4: log q_b(tokens[j+1]) of the policy that sampled the response
SELECTED = "selected"   # 1.6: 1 where the teacher's distribution is stored (capture --positions-from), else 0
FULL_LOGPROBS = "dist/full_logprobs"
HIDDEN_GROUP = "hidden"
DIST_GROUP = "dist"
ATTENTION_GROUP = "attn"                  # 1.5: attn/<block>_q and attn/<block>_k, post-rotary (heads, head_dim)

LOGPROB_DTYPES = ("float16", "float32")
HIDDEN_DTYPES = ("bfloat16", "float16", "float32")

# Raw bytes aimed at per compressed chunk: big enough for good compression and few requests,
# small enough that reading one sample does not decode megabytes it does not need.
TARGET_CHUNK_BYTES = 1 << 20
MIN_CHUNK_ROWS = 1024
MAX_CHUNK_ROWS = 1 << 16
# wide rows (a full-vocabulary distribution is ~100 KB) get fewer rows than MIN_CHUNK_ROWS instead
MAX_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class ArraySpec:
    """How one logical array is stored. ``dtype`` is the logical dtype a reader gets back;
    ``storage_dtype`` is what zarr holds (they differ only for bfloat16, kept as uint16 bits)."""

    name: str
    dtype: str
    storage_dtype: str
    row_shape: tuple[int, ...]
    fill: float | int
    exact: bool
    meaning: str
    index: str | None = None   # entry arrays (1.2): the token-major count array that locates each token's rows

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.storage_dtype).itemsize * np.prod(self.row_shape, dtype=np.int64))

    def to_dict(self) -> dict:
        d = {
            "dtype": self.dtype,
            "storage_dtype": self.storage_dtype,
            "row_shape": list(self.row_shape),
            "fill": None if isinstance(self.fill, float) and np.isnan(self.fill) else self.fill,
            "exact": self.exact,
            "meaning": self.meaning,
        }
        if self.index is not None:   # only entry arrays carry it: token-major specs read as 1.0 ones
            d["index"] = self.index
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "ArraySpec":
        fill = float("nan") if d["fill"] is None else d["fill"]
        return cls(name, d["dtype"], d["storage_dtype"], tuple(d["row_shape"]), fill, d["exact"], d["meaning"],
                   d.get("index"))

    @property
    def per_entry(self) -> bool:
        return self.index is not None

    @property
    def dimension_names(self) -> tuple[str, ...]:
        rows = "entry" if self.per_entry else "token"
        if self.name.startswith(ATTENTION_GROUP + "/"):
            return (rows, "head", "head_dim")
        extra = {TOPK_IDS: "k", TOPK_LOGPROBS: "k", FULL_LOGPROBS: "vocab"}.get(self.name, "d")
        return (rows, *([extra] if self.row_shape else []))


def token_spec(name: str, dtype: str, exact: bool, meaning: str, fill: float | int = 0,
               row_shape: tuple[int, ...] = ()) -> ArraySpec:
    """A token-major array: one row per token."""
    return ArraySpec(name, dtype, dtype, row_shape, fill, exact, meaning)


def entry_spec(name: str, dtype: str, exact: bool, meaning: str, index: str, fill: float | int = 0) -> ArraySpec:
    """An entry array: the entries of all tokens end to end, located by the count array ``index``."""
    return ArraySpec(name, dtype, dtype, (), fill, exact, meaning, index)


def chunk_rows(spec: ArraySpec) -> int:
    """Rows per compressed chunk: a power of two near TARGET_CHUNK_BYTES of raw data (at least
    MIN_CHUNK_ROWS unless that exceeds MAX_CHUNK_BYTES)."""
    row_bytes = max(spec.row_bytes, 1)
    rows = 1 << max(int(TARGET_CHUNK_BYTES // row_bytes).bit_length() - 1, 0)
    cap = 1 << max(int(MAX_CHUNK_BYTES // row_bytes).bit_length() - 1, 0)
    return int(min(max(rows, min(MIN_CHUNK_ROWS, cap)), MAX_CHUNK_ROWS))
