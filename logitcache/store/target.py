"""A new output directory (local path or fsspec URL) that a command fills and that a failure leaves empty.

``logitcache export`` writes a new cache into one, ``logitcache import`` too, and an export to another
tool's layout writes that tool's files into one. Each refuses a directory that already holds anything,
holds the directory's manifest lock while it writes (two commands cannot interleave into one target),
and on any failure removes what it wrote (the directory itself when it made it): an interrupted command
leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from ..format.errors import LogitcacheError
from .fs import CacheFS
from .lock import MANIFEST_LOCK, CacheLock

log = logging.getLogger(__name__)


def check_target(out: CacheFS) -> bool:
    """Refuse to write into anything but a new or empty directory; True when it does not exist yet."""
    if not out.exists(""):
        return True
    out.check_directory()
    if [n for n in out.listdir("") if n != MANIFEST_LOCK]:
        raise LogitcacheError(f"{out.url} already exists and is not empty; export into a new directory")
    return False


@contextlib.contextmanager
def new_output(out: str, storage_options: dict | None, what: str) -> Iterator[tuple[CacheFS, CacheLock]]:
    """``(directory, its held lock)`` for writing into ``out`` (``what`` names the writer in the lock's
    message); on an exception everything under it is removed before the exception goes on."""
    dst = CacheFS(out, storage_options)
    dst.require_writable()
    created = check_target(dst)
    lock = CacheLock(dst, MANIFEST_LOCK, what, stale_after=600).acquire(0)
    try:
        yield dst, lock
    except BaseException:
        lock.release()
        # the directory held nothing but (maybe) the lock file when we started: remove everything else
        for rel in ([""] if created else [n for n in dst.listdir("") if n != MANIFEST_LOCK]):
            try:
                dst.remove(rel)
            except OSError:  # pragma: no cover - best effort
                log.warning("could not remove %s/%s", dst.url, rel)
        raise
    lock.release()
