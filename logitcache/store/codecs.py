"""Compression of each array. Chosen from measurements (benchmarks/capture_hf.py, "codecs" table):
Blosc with byte-shuffle in front of zstd beats plain zstd on the float arrays (the exponent and
mantissa bytes of fp16/fp32 compress very differently once separated) and ties on ids."""

from __future__ import annotations

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

from ..format.arrays import ArraySpec

CODEC_CHOICES = ("blosc-zstd-shuffle", "blosc-zstd-bitshuffle", "zstd")
DEFAULT_CODEC = "blosc-zstd-shuffle"


def compressors(spec: ArraySpec, choice: str = DEFAULT_CODEC, level: int = 5):
    typesize = np.dtype(spec.storage_dtype).itemsize
    if choice == "zstd":
        return [ZstdCodec(level=level)]
    shuffle = {"blosc-zstd-shuffle": "shuffle", "blosc-zstd-bitshuffle": "bitshuffle"}[choice]
    return [BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=typesize)]


def describe(specs: dict[str, ArraySpec], choice: str = DEFAULT_CODEC, level: int = 5) -> dict:
    """What the manifest records per array: the codec chain inside each zarr shard and the chunking."""
    from ..format.arrays import chunk_rows

    return {
        name: {"codec": choice, "level": level, "chunk_rows": chunk_rows(spec),
               "zarr_codecs": [c.to_dict() for c in compressors(spec, choice, level)]}
        for name, spec in specs.items()
    }
