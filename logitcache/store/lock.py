"""Mutual exclusion between the processes that rewrite one file of a cache.

``manifest.json`` has several writers: the capture worker that finishes last (or ``logitcache
finalize``) merges the parts into it, and ``query`` records derived tables in it. Each rewrite is a
read-modify-write; without coordination, one writer's update silently replaces another's (a
finalize's new shards lost under a query's older copy). Every writer therefore holds the cache's
manifest lock around its read-modify-write, so each sees the result of the one before (a
compare-and-swap by exclusion). A capture worker holds the lock of its own part manifest for its
whole run, so two captures with one worker index cannot interleave their parts.

Where the lock lives:

- **local disks**: ``fcntl.flock`` on a small file beside what it protects (``.manifest.lock``,
  ``parts/worker-IIIII.lock``). The kernel releases it when the holder dies, however it dies: no
  stale locks, no timeouts to tune.
- **object stores** (and other fsspec filesystems): a lock object ``<name>`` created with an
  exclusive create (``open(..., "xb")``: If-None-Match on stores that support it), holding the
  holder's host, pid and the time of its last heartbeat. A lock whose heartbeat is older than
  ``stale_after`` seconds is taken to belong to a dead process and is broken.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from typing import Iterator

from ..format.errors import LogitcacheError
from .fs import CacheFS

MANIFEST_LOCK = ".manifest.lock"
MANIFEST_STALE_AFTER = 120.0        # a manifest rewrite takes well under a second
POLL = 0.05


class CacheBusyError(LogitcacheError):
    """Another process holds a lock of the cache for longer than we are willing to wait."""


def part_lock_name(worker_index: int) -> str:
    return f"parts/worker-{worker_index:05d}.lock"


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": uuid.uuid4().hex}


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on {h['host']} (since {time.strftime('%H:%M:%S', time.localtime(h['since']))})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class CacheLock:
    """An exclusive lock named ``name`` (a path relative to the cache root). ``acquire(timeout)``
    waits up to ``timeout`` seconds (0: try once) and raises ``CacheBusyError`` naming the holder."""

    def __init__(self, cfs: CacheFS, name: str, what: str, stale_after: float = MANIFEST_STALE_AFTER):
        self.cfs, self.name, self.what, self.stale_after = cfs, name, what, stale_after
        self._fd: int | None = None
        self._token: str | None = None

    # ---- local: flock -------------------------------------------------------------------------
    def _acquire_local(self, deadline: float) -> None:
        import fcntl

        path = self.cfs.path(self.name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _describe(os.pread(fd, 4096, 0))
                    os.close(fd)
                    raise CacheBusyError(f"{self.cfs.url}: {self.what} is being written by {holder}; "
                                         "try again when it has finished") from None
                time.sleep(POLL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self._fd = fd

    # ---- elsewhere: an exclusively created object with a heartbeat ---------------------------
    def _acquire_object(self, deadline: float) -> None:
        fs, path = self.cfs.fs, self.cfs.path(self.name)
        holder = _holder()
        while True:
            try:
                with fs.open(path, "xb") as f:
                    f.write(json.dumps(holder).encode())
                self._token = holder["token"]
                return
            except FileExistsError:
                pass
            try:
                raw = fs.cat_file(path)
                since = json.loads(raw)["since"]
            except FileNotFoundError:
                continue                                  # released between our two calls
            except (ValueError, KeyError, TypeError):
                raw, since = b"", 0.0                     # unreadable: treat as stale
            if time.time() - float(since) > self.stale_after:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)                      # a dead holder's lock
                continue
            if time.monotonic() >= deadline:
                raise CacheBusyError(f"{self.cfs.url}: {self.what} is being written by {_describe(raw)}; try again "
                                     f"when it has finished (a lock older than {self.stale_after:.0f} s without a "
                                     f"heartbeat is broken: {self.cfs.url}/{self.name})")
            time.sleep(POLL)

    def heartbeat(self) -> None:
        """Tell other processes the holder is alive (object stores; a no-op on local disks)."""
        if self._token is not None:
            self.cfs.fs.pipe_file(self.cfs.path(self.name),
                                  json.dumps({**_holder(), "token": self._token}).encode())

    def acquire(self, timeout: float) -> "CacheLock":
        self.cfs.require_writable()     # only writers lock, and a chained URL is read-only
        deadline = time.monotonic() + max(timeout, 0.0)
        if self.cfs.is_local:
            self._acquire_local(deadline)
        else:
            self._acquire_object(deadline)
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._token is not None:
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
                if json.loads(self.cfs.fs.cat_file(self.cfs.path(self.name)))["token"] == self._token:
                    self.cfs.fs.rm_file(self.cfs.path(self.name))   # never a lock another process took over
            self._token = None


@contextlib.contextmanager
def manifest_lock(cfs: CacheFS, timeout: float = 60.0) -> Iterator[CacheLock]:
    """Hold the cache's manifest lock for one read-modify-write of ``manifest.json``."""
    lock = CacheLock(cfs, MANIFEST_LOCK, "manifest.json").acquire(timeout)
    try:
        yield lock
    finally:
        lock.release()
