"""Chained fsspec URLs: local cache layers over a remote store, e.g. ``simplecache::s3://bucket/cache``
(also ``filecache::``, ``blockcache::``). The URL's layers are read outermost first; the last one, the
*storage*, is the one that holds the files.

Storage options reach the layers like this:

- a key that names one of the URL's layers and holds a JSON object (fsspec's own per-protocol form,
  ``{"s3": {"key": ...}, "simplecache": {"cache_storage": "/scratch/lc"}}``) goes to that layer;
- every other key (a flat dict, as for a plain ``s3://`` URL) goes to the storage, the innermost layer:
  ``--storage-options '{"client_kwargs": {...}}'`` means the same for ``s3://b/c`` and for
  ``simplecache::s3://b/c``. (fsspec itself would give flat keys to the outermost layer, the local
  cache, where an S3 endpoint or key means nothing.)

A cache layer writes its local copy of a file in place on the file's first read: a second reader
meanwhile would read it half written. Reads through a layer therefore take the file's lock
(``first_read_lock``): a thread lock, and a lock file in the layer's copy directory, so that threads
and processes sharing the directory (``{"simplecache": {"cache_storage": DIR}}``: DataLoader workers,
the ranks of a node) read each file one at a time.

A chained URL is for reading. Commands that write (capture, finalize, export and import destinations,
stored derived tables) refuse one: a cache layer keeps the first copy of every file it reads and would
answer later reads of files the writer replaces (the manifest, locks) from that copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from typing import Any, Iterator

try:
    import fcntl
except ImportError:       # not POSIX: processes sharing a copy directory are not coordinated
    fcntl = None

from ..format.errors import LogitcacheError

SEPARATOR = "::"
_FILE_LOCKS: dict[str, threading.Lock] = {}     # path in a cache layer -> its lock (module docstring)
LOCK_DIR = ".logitcache-locks"                  # in a layer's copy directory: one lock file per path read


def is_chained(url: str) -> bool:
    return SEPARATOR in str(url)


def _filesystem_class(url: str, protocol: str):
    from fsspec.registry import get_filesystem_class

    try:
        return get_filesystem_class(protocol)
    except ValueError:
        raise LogitcacheError(f"{url}: unknown file system {protocol!r} in the chained URL (cache layers: "
                              "simplecache::, filecache::, blockcache::, e.g. simplecache::s3://bucket/cache)") from None


def layers(url: str) -> list[str]:
    """The protocols of a URL's layers, outermost first (one for a plain URL; ``file`` for a path).
    A chain must end in a storage with a path: an empty or misplaced layer is refused, naming it."""
    from fsspec import available_protocols
    from fsspec.core import split_protocol
    from fsspec.implementations.chained import ChainedFileSystem

    bits = str(url).split(SEPARATOR)
    protocols = []
    for i, bit in enumerate(bits):
        innermost = i == len(bits) - 1
        if not bit:
            raise LogitcacheError(f"{url}: an empty layer in the chained URL; it must end in the storage that holds "
                                  "the cache, e.g. simplecache::s3://bucket/cache")
        protocol = split_protocol(bit)[0]
        if protocol is None:        # as fsspec reads it: a bare protocol name, else a local path
            protocol = bit if bit in available_protocols() or not innermost else "file"
        cls = _filesystem_class(url, protocol) if protocol != "file" else None
        if innermost and cls is not None and issubclass(cls, ChainedFileSystem) and len(bits) > 1:
            raise LogitcacheError(f"{url}: the chained URL ends in {protocol!r}, a layer over another file system; "
                                  "it must end in the storage that holds the cache, e.g. simplecache::s3://bucket/cache")
        protocols.append(protocol)
    return protocols


def storage_url(url: str) -> str:
    """The innermost layer of a chained URL (the storage itself: ``s3://bucket/cache``)."""
    return str(url).split(SEPARATOR)[-1]


def layer_options(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` in the form fsspec applies to ``url``'s layers (module docstring). Options for a
    layer the URL does not have are left out (one dict serves every cache of a command: a chained
    training cache and a plain ``--eval-cache``). Plain options for a plain URL are returned as they are."""
    from fsspec import available_protocols

    options = dict(options or {})
    known = set(available_protocols())
    named = {k for k, v in options.items() if isinstance(v, dict) and k in known}
    if not named and not is_chained(url):
        return options
    names = layers(url)
    per_layer: dict[str, dict] = {}
    for key in named:
        layer = _matching_layer(url, key, names)
        if layer is not None:
            per_layer[layer] = {**per_layer.get(layer, {}), **options[key]}
    flat = {k: v for k, v in options.items() if k not in named}
    if flat:   # a key given both flat and under the storage's name: the per-layer one
        per_layer[names[-1]] = {**flat, **per_layer.get(names[-1], {})}
    return per_layer


def _matching_layer(url: str, key: str, names: list[str]) -> str | None:
    """The layer that the options under ``key`` (a protocol name) belong to: the layer of that name, or
    of another name of the same file system (``s3`` for ``s3a://``); None if the URL has none."""
    if key in names:
        return key
    from fsspec.registry import get_filesystem_class

    def cls(protocol):
        try:
            return get_filesystem_class(protocol)
        except (ImportError, ValueError):   # a file system not installed cannot be one of the URL's
            return None

    return next((n for n in names if cls(n) is not None and cls(n) is cls(key)), None)


def refuse_write(url: str) -> LogitcacheError:
    """The error of a write through a chained URL, naming the URL to write to instead."""
    outer = SEPARATOR.join(str(url).split(SEPARATOR)[:-1])
    return LogitcacheError(f"{url}: a chained URL is read-only (its {outer}:: layer would keep serving its copies of "
                           f"files this command replaces); write to {storage_url(url)} and read it through {url}")


@contextlib.contextmanager
def first_read_lock(path: str, layer=None) -> Iterator[None]:
    """Held by every read of ``path`` through ``layer`` (a cache layer's file system; module docstring):
    the path's lock among this process's threads, then, where the layer keeps its copies in a directory
    (``storage``), an exclusive ``flock`` on the path's lock file there, among the processes sharing it."""
    with _FILE_LOCKS.setdefault(path, threading.Lock()):
        storage = getattr(layer, "storage", None)
        if not storage or fcntl is None:
            yield
            return
        where = os.path.join(storage[-1], LOCK_DIR)
        os.makedirs(where, exist_ok=True)
        name = hashlib.sha256(str(path).encode()).hexdigest()[:24]
        with open(os.path.join(where, name), "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def locked_cat_file(layer):
    """``_cat_file`` for the async wrapper of ``layer`` (a cache layer's file system) that zarr reads
    through: each read holds its file's lock, in a thread, so that the event loop never waits on it."""
    def read(path, start, end):
        with first_read_lock(path, layer):
            return layer.cat_file(path, start=start, end=end)

    async def cat_file(path, start=None, end=None, **kwargs):
        return await asyncio.to_thread(read, path, start, end)

    return cat_file
