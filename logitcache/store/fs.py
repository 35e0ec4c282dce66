"""A cache root on any filesystem fsspec knows (local path, memory://, s3://, gs://, ...).

Two primitives carry the format's safety: ``write_atomic`` (a file is either old or new, never half
written) and ``publish_dir`` (a finished temporary directory takes its final name in one step on
local disks; on object stores the manifest written afterwards is what commits it).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class CacheFS:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url)
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"CacheFS({self.url!r})"

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_atomic(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self.is_local:
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)  # one PUT: atomic on object stores

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        if not self.exists(rel):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False))

    def find(self, rel: str) -> list[str]:
        """Every file under ``rel``, as paths relative to ``rel``, sorted."""
        base = self.path(rel)
        return sorted(posixpath.relpath(p, base) for p in self.fs.find(base))

    def total_size(self, rel: str) -> int:
        """Bytes of every file under ``rel``, from one listing (no reads)."""
        return int(sum(info.get("size", 0) for info in self.fs.find(self.path(rel), detail=True).values()))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)

    def publish_dir(self, tmp_rel: str, final_rel: str) -> None:
        """Give a finished temporary directory its final name, replacing a stale one."""
        self.remove(final_rel)
        src, dst = self.path(tmp_rel), self.path(final_rel)
        self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        if self.is_local:
            os.rename(src, dst)
            return
        # Object stores have no directories and no rename: copy file by file (server-side where the
        # store can), then delete. Not atomic, which is why the manifest, not the files, commits.
        for rel in self.find(tmp_rel):
            self.fs.cp_file(f"{src}/{rel}", f"{dst}/{rel}")
        self.fs.rm(src, recursive=True)

    def zarr_store(self, rel: str, read_only: bool = False):
        """A zarr v3 store rooted at ``rel``: LocalStore on disk, FsspecStore elsewhere."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel), read_only=read_only)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        url = f"{protocol}://{self.path(rel).lstrip('/')}" if protocol != "memory" else f"memory://{self.path(rel)}"
        return zarr.storage.FsspecStore.from_url(url, storage_options=self.storage_options or None,
                                                 read_only=read_only)
