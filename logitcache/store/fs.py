"""A cache root on any filesystem fsspec knows (local path, memory://, s3://, gs://, ...).

Two primitives carry the format's safety: ``write_atomic`` (a file is either old or new, never half
written; a failed write leaves no temporary file) and ``publish_dir`` (a finished temporary directory
takes its final name in one step on local disks; on object stores the manifest written afterwards is
what commits it).

Paths are literal: a cache at ``runs/g[1]`` is that directory, never a glob pattern matching
``runs/g1`` (fsspec's ``rm`` expands patterns, so removal goes through ``remove`` here). Every
relative path must stay inside the root: ``path`` refuses ``..`` components and absolute paths.

A chained URL (``simplecache::s3://bucket/cache``: a local cache layer over the store; ``chain``) is
read-only: every write primitive here refuses it with one line naming the URL to write to instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import time
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..format.errors import FormatError, LogitcacheError
from . import chain

TMP_MARK = ".tmp-"          # write_atomic's temporary files: <target>.tmp-<uuid>
_GLOB_CHARS = set("*?[")


class CacheFS:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url)
        self.storage_options = storage_options or {}     # as given (workers reopen the URL with them)
        self.writable = not chain.is_chained(self.url)
        try:
            self.fs_options = chain.layer_options(self.url, self.storage_options)   # what each layer gets
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.fs_options)
        except ImportError as e:      # fsspec names the package: s3fs, gcsfs, adlfs, ...
            raise LogitcacheError(f"{self.url}: {e} (the extras: pip install 'logitcache[s3]' or "
                                  "'logitcache[gcs]')") from None
        except (TypeError, ValueError) as e:
            raise LogitcacheError(f"{self.url}: the storage options do not fit this file system ({e})") from None
        self.root = self.root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"CacheFS({self.url!r})"

    def require_writable(self) -> None:
        """Refuse to write through a chained URL (``chain``): its cache layer would serve stale copies."""
        if not self.writable:
            raise chain.refuse_write(self.url)

    def path(self, rel: str = "") -> str:
        """The full path of ``rel`` (relative to the root); a path that would leave the root is refused."""
        if not rel:
            return self.root
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "" in parts[:-1]:
            raise FormatError(f"{self.url}: the path {rel!r} does not stay inside the cache")
        return posixpath.join(self.root, rel)

    def check_directory(self) -> None:
        """Refuse a root that is a file (a cache is a directory, or a prefix on an object store), and
        a store that cannot be reached: missing credentials, a wrong endpoint, no such bucket."""
        try:
            is_file = self.fs.isfile(self.root)
            if not self.is_local:   # isfile may swallow errors; a listing raises them (a new prefix: not found)
                try:
                    self.fs.ls(self.root, detail=False)
                except FileNotFoundError:
                    pass
                finally:        # the listing must not answer later questions: other workers write here
                    self.fs.invalidate_cache(self.root)
        except Exception as e:  # the store's own error (botocore, gcsfs, aiohttp, ...), named
            if self.is_local:
                raise
            raise LogitcacheError(f"{self.url}: cannot reach the storage ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[-1] if str(e).strip() else 'no message'}); check the "
                                  "credentials and endpoint (--storage-options, or the file system's own environment "
                                  "variables)") from None
        if is_file:
            raise LogitcacheError(f"{self.url} is a file, not a cache directory")

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def _read_lock(self, rel: str):
        """What a read of ``rel`` holds: the file's lock through a cache layer (``chain.first_read_lock``),
        nothing on a plain store."""
        return contextlib.nullcontext() if self.writable else chain.first_read_lock(self.path(rel), self.fs)

    def read_bytes(self, rel: str) -> bytes:
        with self._read_lock(rel):
            return self.fs.cat_file(self.path(rel))

    def sha256(self, rel: str, block: int = 1 << 22) -> str:
        """``"sha256:<hex>"`` of a file, read a block at a time (derived tables can be large)."""
        h = hashlib.sha256()
        with self._read_lock(rel), self.fs.open(self.path(rel), "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
        return "sha256:" + h.hexdigest()

    def write_atomic(self, rel: str, data: bytes) -> None:
        self.require_writable()
        target = self.path(rel)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self.is_local:
            tmp = f"{target}{TMP_MARK}{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                try:
                    os.remove(tmp)     # a full disk or a kill leaves no half-written temporary file
                except OSError:
                    pass
                raise
        else:
            self.fs.pipe_file(target, data)  # one PUT: atomic on object stores

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        if not self.exists(rel):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False))

    def find(self, rel: str) -> list[str]:
        """Every file under ``rel``, as paths relative to ``rel``, sorted."""
        return sorted(self.find_sizes(rel))

    def find_sizes(self, rel: str) -> dict[str, int]:
        """{path relative to ``rel``: size} of every file under ``rel``, from one listing (no reads)."""
        base = self.path(rel)
        found = self.fs.find(base, detail=True)
        return {posixpath.relpath(p, base): int(info.get("size") or 0) for p, info in found.items()}

    def total_size(self, rel: str) -> int:
        """Bytes of every file under ``rel``, from one listing (no reads)."""
        return sum(self.find_sizes(rel).values())

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def remove(self, rel: str) -> None:
        """Delete a file or a directory tree, literally (no pattern expansion)."""
        self.require_writable()
        target = self.path(rel)
        if self.is_local:
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)
            return
        if not self.fs.exists(target):
            return
        if not _GLOB_CHARS & set(target):
            self.fs.rm(target, recursive=True)
            return
        for p in sorted(self.fs.find(target), reverse=True):   # fsspec would read the path as a pattern
            self.fs.rm_file(p)
        try:
            self.fs.rmdir(target)
        except (OSError, NotImplementedError):
            pass

    def remove_stale_temporaries(self, rel: str, older_than: float) -> list[str]:
        """Delete ``write_atomic`` temporaries (``*.tmp-*``) under ``rel`` last modified more than
        ``older_than`` seconds ago (left by crashes and full disks; a younger one may be in use)."""
        self.require_writable()
        removed = []
        now = time.time()
        base = self.path(rel)
        if not self.exists(rel):
            return removed
        for p, info in self.fs.find(base, detail=True).items():
            if TMP_MARK not in posixpath.basename(p):
                continue
            mtime = info.get("mtime") or info.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            if mtime is None or now - float(mtime) < older_than:
                continue
            sub = posixpath.relpath(p, self.root)
            self.remove(sub)
            removed.append(sub)
        return removed

    def publish_dir(self, tmp_rel: str, final_rel: str) -> None:
        """Give a finished temporary directory its final name, replacing a stale one."""
        self.require_writable()
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
        self.remove(tmp_rel)

    def zarr_store(self, rel: str, read_only: bool = False):
        """A zarr v3 store rooted at ``rel``: LocalStore on disk, FsspecStore elsewhere. A file system
        with an async API (s3fs, gcsfs, ...) is reopened from its URL in async mode; any other (memory://,
        a chained URL's cache layer) is wrapped as it is: the same instance, so one cache layer serves
        every read of this cache (a URL rebuilt from the layer's protocol would lose the layers under it)."""
        import zarr.storage
        from fsspec.asyn import AsyncFileSystem
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        if not read_only:
            self.require_writable()
        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel), read_only=read_only)
        if not isinstance(self.fs, AsyncFileSystem):
            wrapped = AsyncFileSystemWrapper(self.fs, asynchronous=True)
            if not self.writable:      # a cache layer: one read of a file at a time (chain.first_read_lock)
                wrapped._cat_file = chain.locked_cat_file(self.fs)
            return zarr.storage.FsspecStore(wrapped, path=self.path(rel), read_only=read_only)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        url = f"{protocol}://{self.path(rel).lstrip('/')}"
        return zarr.storage.FsspecStore.from_url(url, storage_options=self.fs_options or None,
                                                 read_only=read_only)
