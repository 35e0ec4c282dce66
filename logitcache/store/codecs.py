"""Compression of each array, chosen from measurements (benchmarks/results/capture_hf.md, "Codecs on
the real arrays", SmolLM2 generate mode, top-64):

- top-k log-probs: Blosc(zstd) with byte shuffle 72 B/scored token vs plain zstd 87 (fp16 exponent
  and mantissa bytes compress very differently once separated); top-k ids: 109 vs 113.
- hidden states (bfloat16 bits): plain zstd 1405 vs shuffled 1464, and 3x faster to write: their
  low bytes are noise that shuffling cannot help.
- scalars (entropy, target log-prob, tokens): within 2%, either way.

``auto`` (the default) applies those choices per array; the others force one codec everywhere.

Every chain ends with ``crc32c`` (format 1.3): a checksum of each compressed chunk, checked by
zarr-python on every decode, so a damaged chunk is an error at read time for any reader, not a
silently different value. Its cost is 4 bytes per chunk and one hardware CRC per read
(benchmarks/results/loader.md).
"""

from __future__ import annotations

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..format.arrays import HIDDEN_GROUP, ArraySpec, chunk_rows

CODEC_CHOICES = ("auto", "blosc-zstd-shuffle", "blosc-zstd-bitshuffle", "zstd")
DEFAULT_CODEC = "auto"
LEVEL = 5


def resolve(spec: ArraySpec, choice: str = DEFAULT_CODEC) -> str:
    if choice != "auto":
        return choice
    return "zstd" if spec.name.startswith(HIDDEN_GROUP + "/") else "blosc-zstd-shuffle"


def compressors(spec: ArraySpec, choice: str = DEFAULT_CODEC, level: int = LEVEL, checksum: bool = True):
    """The bytes-to-bytes codecs of an array inside the sharding codec: the compressor, then crc32c
    (``checksum=False`` writes the layout of format 1.2, for benchmarks that measure its cost)."""
    choice = resolve(spec, choice)
    tail = [Crc32cCodec()] if checksum else []
    if choice == "zstd":
        return [ZstdCodec(level=level), *tail]
    shuffle = {"blosc-zstd-shuffle": "shuffle", "blosc-zstd-bitshuffle": "bitshuffle"}[choice]
    return [BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=np.dtype(spec.storage_dtype).itemsize),
            *tail]


def describe(specs: dict[str, ArraySpec], choice: str = DEFAULT_CODEC, level: int = LEVEL) -> dict:
    """What the manifest records per array: the codec inside each zarr shard and the chunking."""
    return {
        name: {"codec": resolve(spec, choice), "level": level, "chunk_rows": chunk_rows(spec),
               "zarr_codecs": [c.to_dict() for c in compressors(spec, choice, level)]}
        for name, spec in specs.items()
    }
