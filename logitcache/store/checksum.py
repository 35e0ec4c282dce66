"""Checksums of a shard, over exactly the bytes a reader will read.

One recipe (docs/format.md, "Shard checksum"): sha256 over files in sorted relative-path order; for
each file the digest takes ``path``, a NUL byte, the size as 8 little-endian bytes, then the content.
Anyone can recompute it with hashlib alone. A shard has three (format 1.3):

- ``checksum``: the recipe over every file of the shard directory (``inspect --verify`` recomputes it);
- ``metadata_checksum``: the recipe over the shard's ``zarr.json`` documents only, checked by the reader
  every time it opens the shard (the chunk data carry their own crc32c);
- ``samples_checksum``: plain sha256 of ``samples.parquet``, checked whenever it is read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

from ..format import layout
from .fs import CacheFS

PREFIX = "sha256:"
METADATA_FILE = "zarr.json"


def is_metadata(rel: str) -> bool:
    """A Zarr metadata document of the shard (path relative to the shard directory)."""
    return rel.startswith(layout.ARRAYS + "/") and rel.rsplit("/", 1)[-1] == METADATA_FILE


def recipe_digest(files: Iterable[tuple[str, bytes]]) -> str:
    """The recipe over ``(relative path, content)`` pairs, in sorted path order."""
    digest = hashlib.sha256()
    for rel, data in sorted(files, key=lambda f: f[0]):
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return PREFIX + digest.hexdigest()


def sha256(data: bytes) -> str:
    return PREFIX + hashlib.sha256(data).hexdigest()


@dataclass
class ShardDigests:
    checksum: str
    bytes: int
    metadata_checksum: str
    samples_checksum: str


def shard_digests(cfs: CacheFS, rel_dir: str) -> ShardDigests:
    """All three checksums of the shard under ``rel_dir`` and its size, from one read of its files."""
    whole = hashlib.sha256()
    total, metadata, samples = 0, [], ""
    for name in cfs.find(rel_dir):
        data = cfs.read_bytes(f"{rel_dir}/{name}")
        whole.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        whole.update(data)
        total += len(data)
        if is_metadata(name):
            metadata.append((name, data))
        elif name == layout.SAMPLES:
            samples = sha256(data)
    return ShardDigests(PREFIX + whole.hexdigest(), total, recipe_digest(metadata), samples)
