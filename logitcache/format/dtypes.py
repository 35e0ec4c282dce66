"""The dtype rules of the format, shared by the array specs and every encoding. Imports nothing else
of logitcache (numpy only), so anything may use it without an import circle."""

from __future__ import annotations

import numpy as np


def id_dtype(vocab_size: int) -> str:
    """Narrowest unsigned integer type that holds every token id of the vocabulary."""
    if vocab_size <= 1 << 8:
        return "uint8"
    if vocab_size <= 1 << 16:
        return "uint16"
    return "uint32"


def count_dtype(max_count: int) -> str:
    """Narrowest unsigned integer type for a count of at most ``max_count`` (entries per token, draws
    per id)."""
    return "uint8" if max_count <= 0xFF else "uint16" if max_count <= 0xFFFF else "uint32"


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
