"""Training checkpoints: written atomically, checksummed, and tied to the data they were trained on.

A checkpoint is a directory ``<run>/checkpoint/``:

    state.pt      model, projector, optimizer, scheduler, loader position, RNG states (torch.save)
    dcp/          --parallel fsdp only: model and optimizer shards, every rank's part, written with
                  torch.distributed.checkpoint (state.pt then holds the rest)
    config.json   the TrainConfig of the run
    meta.json     {"files": {"state.pt": "sha256:...", "config.json": "sha256:...", "dcp/...": ...},
                   "data": {"cache": <fingerprint>, "eval_cache": ..., "teachers": [...]}}

It is written to ``checkpoint.tmp/`` and swapped in with two renames, so a crash leaves the previous
checkpoint whole (``checkpoint.old/`` covers the moment between the renames). Resuming refuses a
checkpoint whose files do not match their checksums (a damaged or truncated ``state.pt`` is never
loaded), whose settings differ from the run's (except ``RESUMABLE_CHANGES``), or whose data
fingerprints differ from the caches' now: a cache replaced under a run (same paths, same sample ids,
another teacher) would otherwise resume and mix two teachers in one student.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil

import numpy as np
import torch

from logitcache.format.errors import LogitcacheError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE, CONFIG, META, SHARDS = "state.pt", "config.json", "meta.json", "dcp"
# settings that may change between a run and its resumption (they do not change the numbers)
RESUMABLE_CHANGES = {"resume", "eval_every", "eval_batches", "log_every", "save_every", "num_workers",
                     "activation_checkpointing", "storage_options"}


def file_sha256(path: str, block: int = 1 << 24) -> str:
    """``"sha256:<hex>"`` of a file, read a block at a time (checkpoints can be tens of GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def save_checkpoint(out: str, state: dict, config: dict, data: dict, sharded: dict | None = None,
                    rank: int = 0, world: int = 1) -> None:
    """Write ``state`` (torch.save), ``config`` and the checksums and data fingerprints ``data``
    (see the module docstring) as ``out/checkpoint``, replacing the previous one atomically.

    Every rank calls it; rank 0 writes ``state``. ``sharded`` (FSDP: ``parallel.sharded_state``) is
    written by every rank into ``dcp/`` with torch.distributed.checkpoint before rank 0 checksums
    all the files and swaps the checkpoint in."""
    final, tmp, old = (os.path.join(out, CHECKPOINT + suffix) for suffix in ("", ".tmp", ".old"))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if sharded is not None:
        import torch.distributed.checkpoint as dcp

        if world > 1:
            torch.distributed.barrier()
        dcp.save(sharded, checkpoint_id=os.path.join(tmp, SHARDS))      # collective: every rank writes its part
    if rank != 0:
        return
    torch.save(state, os.path.join(tmp, STATE))
    with open(os.path.join(tmp, CONFIG), "w") as f:
        json.dump(config, f, indent=1)
    names = [STATE, CONFIG] + ([os.path.join(SHARDS, n) for n in sorted(os.listdir(os.path.join(tmp, SHARDS)))]
                               if sharded is not None else [])
    meta = {"files": {name: file_sha256(os.path.join(tmp, name)) for name in names}, "data": data}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: str) -> str | None:
    """The checkpoint directory to resume from, or None."""
    path = os.path.join(out, CHECKPOINT)
    if os.path.exists(os.path.join(path, STATE)):
        return path
    old = os.path.join(out, CHECKPOINT + ".old")     # a crash between the two renames
    return old if os.path.exists(os.path.join(old, STATE)) else None


def load_checkpoint(out: str, config: dict, data: dict) -> dict | None:
    """The state saved in ``out``'s checkpoint, after checking its files against their checksums,
    its settings against ``config`` and its data fingerprints against ``data``; None if there is none.
    Every refusal is a LogitcacheError naming what differs."""
    path = find_checkpoint(out)
    if path is None:
        return None
    where = os.path.join(out, CHECKPOINT)
    meta_path = os.path.join(path, META)
    if os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            files = meta["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise LogitcacheError(f"{where}/{META} is damaged ({e}); --no-resume starts over") from None
        for name, want in files.items():
            got = file_sha256(os.path.join(path, name)) if os.path.exists(os.path.join(path, name)) else "missing"
            if got != want:
                raise LogitcacheError(f"{where}/{name} does not match its checksum ({got[:19]}, recorded {want[:19]}): "
                                      "the checkpoint is damaged; --no-resume starts over")
        for key, value in data.items():
            saved = meta.get("data", {}).get(key)
            if saved != value:
                raise LogitcacheError(
                    f"{out} holds a checkpoint trained on {key.replace('_', ' ')} with fingerprint {str(saved)[:19]}..., "
                    f"but it now has {str(value)[:19]}... (another teacher, other settings or other shards): resuming "
                    "would mix two teachers in one student; use another --out, or --no-resume to start over")
    else:
        log.warning("%s has no %s (written before checkpoints were checksummed): resuming without checking it",
                    where, META)
    try:
        with open(os.path.join(path, CONFIG)) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise LogitcacheError(f"{where}/{CONFIG} cannot be read ({e}); --no-resume starts over") from None
    changed = sorted(k for k in config if k not in RESUMABLE_CHANGES and saved.get(k) != config[k])
    if changed:
        k = changed[0]
        raise LogitcacheError(f"{out} holds a checkpoint made with {k} = {saved.get(k)!r}, but this run has "
                              f"{config[k]!r}; use another --out, or --no-resume to start over")
    try:
        state = torch.load(os.path.join(path, STATE), weights_only=False)
        if os.path.isdir(os.path.join(path, SHARDS)):
            state["sharded_at"] = os.path.join(path, SHARDS)      # parallel.load_sharded_state reads it
        return state
    except Exception as e:     # a checkpoint of an earlier release without checksums, damaged
        raise LogitcacheError(f"{where}/{STATE} cannot be loaded ({type(e).__name__}: {e}); --no-resume starts "
                              "over") from None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
