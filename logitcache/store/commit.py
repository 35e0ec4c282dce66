"""Part manifests, their merge, and ``finalize``.

Each worker rewrites only its own part after every shard it commits, so workers never contend for a
file. ``manifest.json`` is the merge of all parts, written when every planned shard is committed
(by whichever worker finishes last, or by ``logitcache finalize``). Every rewrite of
``manifest.json`` (finalize, ``update_manifest``) happens under the cache's manifest lock
(``lock.manifest_lock``) and reads the current state inside it, so no writer's update is lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

from ..format import layout
from ..format.errors import ConfigMismatchError, FormatError, LogitcacheError
from ..format.manifest import Manifest, check_same_header, manifest_checksum
from ..format.version import at_least
from .fs import CacheFS
from .lock import manifest_lock

# write_atomic temporaries older than this are leftovers of a crash or a full disk (a live writer
# replaces its temporary within seconds)
STALE_TEMPORARY_SECONDS = 3600.0
# Test hook (LOGITCACHE_FAULT=slow-manifest-update:<seconds>): hold the manifest lock that long
# between reading manifest.json and writing it back, to race other writers against the window.
FAULT_ENV = "LOGITCACHE_FAULT"

log = logging.getLogger(__name__)


def save_part(cfs: CacheFS, part: Manifest) -> None:
    assert part.part is not None
    cfs.write_atomic(layout.part_path(part.part.worker_index), part.to_json().encode())


def load_parts(cfs: CacheFS) -> list[Manifest]:
    parts = []
    for name in cfs.listdir(layout.PARTS_DIR):
        if name.startswith("worker-") and name.endswith(".json"):
            rel = f"{layout.PARTS_DIR}/{name}"
            parts.append(Manifest.from_json(cfs.read_bytes(rel), f"{cfs.url}/{rel}"))
    return parts


def load_manifest(cfs: CacheFS) -> Manifest | None:
    if not cfs.exists(layout.MANIFEST):
        return None
    return Manifest.from_json(cfs.read_bytes(layout.MANIFEST), f"{cfs.url}/{layout.MANIFEST}")


def planned_shards(manifest: Manifest) -> list[str]:
    return [layout.shard_name(i.key, j) for i in manifest.inputs for j in range(i.num_shards)]


def merge(manifests: list[Manifest], where: str) -> Manifest:
    """Union of committed shards, skipped rows and inputs; headers must agree."""
    if not manifests:
        raise FormatError(f"{where}: no manifest and no part manifests: not a logitcache cache")
    first = manifests[0]
    for m in manifests[1:]:
        check_same_header(first, m, where)
    inputs = {}
    for m in manifests:
        for i in m.inputs:
            known = inputs.get(i.key)
            if known is not None and known.content and i.content and known.content != i.content:
                raise ConfigMismatchError(
                    f"{where}: input {i.key} ({i.source_name}) was read with different rows by two writers "
                    f"({known.content[:19]} vs {i.content[:19]}): the input changed while it was being captured")
            if known is None or (i.content and not known.content):
                inputs[i.key] = i
    order = {key: n for n, key in enumerate(inputs)}
    shards = {s.name: s for m in manifests for s in m.shards}
    skipped = {(s.input_key, s.row, s.sample_id): s for m in manifests for s in m.skipped}
    merged = Manifest(
        teacher=first.teacher, tokenizer=first.tokenizer, capture=first.capture, arrays=first.arrays,
        codecs=first.codecs, inputs=list(inputs.values()),
        shards=sorted(shards.values(), key=lambda s: (order.get(s.input_key, 0), s.index)),
        skipped=sorted(skipped.values(), key=lambda s: (order.get(s.input_key, 0), s.row, s.sample_id)),
        created_by=first.created_by,
        # kept as they are: a derived table records the fingerprint it was computed for, so one made
        # stale by new shards is recognised and recomputed by whoever needs it
        derived=first.derived, provenance=first.provenance, rollout=first.rollout,
        positions=first.positions,
    )
    merged.complete = set(planned_shards(merged)) <= set(shards)
    return merged


def current_state(cfs: CacheFS) -> Manifest | None:
    """Everything committed so far: manifest.json merged with any newer parts."""
    found = load_parts(cfs)
    top = load_manifest(cfs)
    if top is not None:
        found.insert(0, top)
    return merge(found, cfs.url) if found else None


def finalize(cfs: CacheFS, allow_incomplete: bool = False) -> Manifest:
    """Merge the parts into manifest.json (under the manifest lock) and remove leftovers of crashed
    writers: unlisted shard directories, ``_tmp/`` and stale temporary files."""
    cfs.check_directory()
    if not cfs.exists(""):
        raise FormatError(f"{cfs.url}: no such directory: not a logitcache cache")
    with manifest_lock(cfs):
        merged = current_state(cfs)
        if merged is None:
            raise FormatError(f"{cfs.url}: no manifest and no part manifests: not a logitcache cache")
        if not merged.complete and not allow_incomplete:
            committed = {s.name for s in merged.shards}
            missing = [n for n in planned_shards(merged) if n not in committed]
            raise LogitcacheError(
                f"{cfs.url}: {len(missing)} planned shard(s) not committed yet (first: {', '.join(missing[:5])}); "
                "re-run the capture (it resumes) or finalize with --allow-incomplete"
            )
        _fault_window()
        cfs.write_atomic(layout.MANIFEST, merged.to_json().encode())
        remove_stale_temporaries(cfs, manifest_too=True)
    if merged.complete:
        remove_orphans(cfs, merged)
    return merged


def remove_stale_temporaries(cfs: CacheFS, manifest_too: bool = False) -> list[str]:
    """Temporary files of ``write_atomic`` left by crashes and full disks: part manifests' and derived
    tables' when older than an hour; manifest.json's at once when the caller holds the manifest lock
    (only lock holders write them)."""
    removed = []
    if manifest_too:
        for name in cfs.listdir(""):
            if name.startswith(layout.MANIFEST + ".tmp-"):
                cfs.remove(name)
                removed.append(name)
    for rel in (layout.PARTS_DIR, layout.DERIVED_DIR):
        removed += cfs.remove_stale_temporaries(rel, STALE_TEMPORARY_SECONDS)
    if removed:
        log.info("removed %d stale temporary file(s): %s", len(removed), ", ".join(removed[:5]))
    return removed


def _fault_window() -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault.startswith("slow-manifest-update:"):
        time.sleep(float(fault.split(":", 1)[1]))


def remove_orphans(cfs: CacheFS, manifest: Manifest, only: set[str] | None = None) -> list[str]:
    """Delete shard directories no manifest lists and temporary directories (of ``only`` shards if
    given: other workers may be writing theirs right now)."""
    committed = {s.name for s in manifest.shards} if manifest else set()
    removed = []
    for name in cfs.listdir(layout.SHARDS_DIR):
        if name not in committed and (only is None or name in only):
            cfs.remove(layout.shard_dir(name))
            removed.append(layout.shard_dir(name))
    for name in cfs.listdir(layout.TMP_DIR):
        if only is None or name.rsplit("-", 1)[0] in only:
            cfs.remove(f"{layout.TMP_DIR}/{name}")
            removed.append(f"{layout.TMP_DIR}/{name}")
    if removed:
        log.info("removed %d leftover(s) of an interrupted capture: %s", len(removed), ", ".join(removed[:5]))
    return removed


def update_manifest(cfs: CacheFS, check: Callable[[Manifest], None], edit: Callable[[dict], None],
                    needs_version: str) -> Manifest:
    """Rewrite manifest.json with ``edit`` applied to its JSON, in one atomic write under the manifest
    lock (the manifest is read inside it: an update made meanwhile by another writer is kept).

    Works on the raw JSON so that fields of a newer minor version survive; ``check`` sees the
    manifest as it is now and raises to refuse (e.g. when shards changed since a derived table was
    computed). The version becomes at least ``needs_version``, the version that defines what the
    edit adds (never more: the shards are what they were). The checksum is recomputed.
    """
    where = f"{cfs.url}/{layout.MANIFEST}"
    with manifest_lock(cfs):
        try:
            d = json.loads(cfs.read_bytes(layout.MANIFEST))
        except ValueError as e:
            raise FormatError(f"{where}: not valid JSON ({e})") from None
        check(Manifest.from_dict(d, where))
        _fault_window()
        edit(d)
        d["format_version"] = at_least(d["format_version"], needs_version)
        d["checksum"] = manifest_checksum(d)
        cfs.write_atomic(layout.MANIFEST, (json.dumps(d, indent=1, allow_nan=False) + "\n").encode())
    return Manifest.from_dict(d, where)
