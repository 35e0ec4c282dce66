"""The arrays of a shard: names, dtypes, fill values, chunking.

Row ``j`` of every array describes the teacher *after reading* ``tokens[j]`` of a sample
(position-aligned): ``topk_*``, ``entropy`` and ``target_logprob`` are about the distribution of the
*next* token, ``hidden/<layer>`` is the hidden state at position ``j``. Rows whose next-token
distribution was not captured (prompt rows without ``--with-prompt``, the last row of a sample) hold
the fill value, so every array has exactly one row per token and one ``token_offset`` serves all.

Format 1.2 adds the ``dist/`` group for encodings other than ``topk`` (docs/format.md, "Encodings"):
token-major arrays there too, plus *entry* arrays of ragged rows. An entry array names its ``index``,
a token-major count array: token ``j``'s entries are rows ``[c[j], c[j+1])`` of the entry array,
``c = [0, cumsum(index)]`` over the shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOKENS = "tokens"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
ENTROPY = "entropy"
TARGET_LOGPROB = "target_logprob"
FULL_LOGPROBS = "dist/full_logprobs"
HIDDEN_GROUP = "hidden"
DIST_GROUP = "dist"

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
        extra = {TOPK_IDS: "k", TOPK_LOGPROBS: "k", FULL_LOGPROBS: "vocab"}.get(self.name, "d")
        return (rows, *([extra] if self.row_shape else []))


def id_dtype(vocab_size: int) -> str:
    """Narrowest unsigned integer type that holds every token id of the vocabulary."""
    if vocab_size <= 1 << 8:
        return "uint8"
    if vocab_size <= 1 << 16:
        return "uint16"
    return "uint32"


def absolute_layer(layer: int, num_layers: int) -> int:
    """Hidden-state numbering (Hugging Face ``hidden_states``): -1 is layer ``num_layers``, the final
    hidden state after the norm; negative layers count back from it. Not range-checked."""
    return layer + num_layers + 1 if layer < 0 else layer


def hidden_name(layer: int) -> str:
    return f"{HIDDEN_GROUP}/{layer}"


def array_specs(vocab_size: int, top_k: int, logprob_dtype: str, hidden_layers: list[int],
                hidden_size: int, hidden_dtype: str, encoding: dict | None = None) -> dict[str, ArraySpec]:
    """The arrays a capture with these settings writes, in storage order. ``encoding`` (resolved,
    see ``encodings.resolve_encoding``; None = topk) decides the distribution arrays."""
    from .dist_arrays import dist_specs

    ids = id_dtype(vocab_size)
    nan = float("nan")
    name = (encoding or {}).get("name", "topk")
    specs = [ArraySpec(TOKENS, ids, ids, (), 0, True, "token id at this position")]
    if name in ("topk", "full"):
        specs += [
            ArraySpec(TOPK_IDS, ids, ids, (top_k,), 0, True,
                      "ids of the k most probable next tokens, by descending log-probability"),
            ArraySpec(TOPK_LOGPROBS, logprob_dtype, logprob_dtype, (top_k,), nan, logprob_dtype == "float32",
                      "log-softmax (T=1, full vocabulary) of those ids"),
        ]
    specs += dist_specs(encoding or {"name": "topk"}, vocab_size, logprob_dtype, top_k)
    specs += [
        ArraySpec(ENTROPY, "float32", "float32", (), nan, True,
                  "exact entropy in nats of the full-vocabulary next-token distribution"),
        ArraySpec(TARGET_LOGPROB, "float32", "float32", (), nan, True,
                  "log-probability of the actual next token tokens[j+1]"),
    ]
    for layer in hidden_layers:
        storage = "uint16" if hidden_dtype == "bfloat16" else hidden_dtype
        specs.append(ArraySpec(hidden_name(layer), hidden_dtype, storage, (hidden_size,), 0, hidden_dtype == "float32",
                               f"hidden state at this position, layer index {layer} (0 = embeddings)"))
    return {s.name: s for s in specs}


def chunk_rows(spec: ArraySpec) -> int:
    """Rows per compressed chunk: a power of two near TARGET_CHUNK_BYTES of raw data (at least
    MIN_CHUNK_ROWS unless that exceeds MAX_CHUNK_BYTES)."""
    row_bytes = max(spec.row_bytes, 1)
    rows = 1 << max(int(TARGET_CHUNK_BYTES // row_bytes).bit_length() - 1, 0)
    cap = 1 << max(int(MAX_CHUNK_BYTES // row_bytes).bit_length() - 1, 0)
    return int(min(max(rows, min(MIN_CHUNK_ROWS, cap)), MAX_CHUNK_ROWS))


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as their uint16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(values)
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0
    return out
