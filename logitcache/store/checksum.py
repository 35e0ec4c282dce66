"""One checksum per shard, over exactly the bytes a reader will read.

sha256 over the shard directory's files in sorted relative-path order; for each file the digest
takes ``path``, a NUL byte, the size as 8 little-endian bytes, then the content. Anyone can
recompute it with hashlib alone (docs/format.md gives the ten lines).
"""

from __future__ import annotations

import hashlib

from .fs import CacheFS


def shard_checksum(cfs: CacheFS, rel_dir: str) -> tuple[str, int]:
    """Return ("sha256:<hex>", total bytes) of the files under ``rel_dir``."""
    digest = hashlib.sha256()
    total = 0
    for name in cfs.find(rel_dir):
        data = cfs.read_bytes(f"{rel_dir}/{name}")
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
        total += len(data)
    return f"sha256:{digest.hexdigest()}", total
