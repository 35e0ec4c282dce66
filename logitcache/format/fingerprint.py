"""The cache fingerprint: one string that names *what a cache holds*.

Two caches have the same fingerprint when they were made by the same teacher (weights, not where
they were loaded from), tokenizer and capture settings, store their values the same way, and hold
the same committed shards, byte for byte. Selection files, exported caches, derived tables and
training checkpoints record it, so none of them is ever applied to a cache it was not made from; a
capture that adds shards changes it, which marks derived tables stale.

Recipe (docs/format.md, "Cache fingerprint"): sha256 over the canonical JSON (sorted keys, no
spaces, ASCII) of ``{"teacher": ..., "tokenizer": ..., "capture": ..., "shards": [[name, checksum],
...]}`` (the fields listed below; ``teacher`` without ``name`` and ``source``; shards sorted by name)
plus, in recipe 2 (logitcache 1.3 on), ``"encoding"`` (``capture.encoding``) and ``"arrays"`` (each
array's spec without its prose ``meaning``): everything that decides a decoded value; from format 1.4,
``"rollout"`` (the manifest's on-policy round record) when the manifest has one. Recipe 1 is
what releases up to format 1.2 wrote into selection files; ``check_selection`` still accepts it for
those. The field lists are fixed, so a later version that adds manifest fields does not change the
fingerprint of an existing cache.
"""

from __future__ import annotations

import hashlib
import json
import os

from .manifest import NOT_IDENTITY, Manifest, TokenizerInfo

PREFIX = "sha256:"
RECIPE = 2          # what this release writes; 1 = releases up to format 1.2
FIELDS = {
    "teacher": ("revision", "fingerprint", "architecture", "num_layers", "hidden_size", "vocab_size", "max_length",
                "dtype", "backend"),
    "tokenizer": ("vocab_size", "vocab_sha256", "bos_token_id", "eos_token_ids", "pad_token_id",
                  "chat_template_sha256"),
    "capture": ("mode", "top_k", "logprob_dtype", "with_prompt", "hidden_layers", "hidden_dtype", "max_length",
                "truncate", "samples_per_shard", "system_prompt", "max_new_tokens", "temperature", "top_p", "seed",
                "num_samples"),
}
ARRAY_FIELDS = ("dtype", "storage_dtype", "row_shape", "fill", "index")
assert not {f"teacher.{k}" for k in FIELDS["teacher"]} & NOT_IDENTITY


def identity(manifest: Manifest, recipe: int = RECIPE) -> dict:
    """The part of the manifest the fingerprint covers."""
    out = {section: {k: getattr(getattr(manifest, section), k) for k in keys} for section, keys in FIELDS.items()}
    out["shards"] = sorted([s.name, s.checksum] for s in manifest.shards)
    if recipe >= 2:
        out["encoding"] = manifest.capture.encoding
        out["arrays"] = {name: {k: spec.to_dict().get(k) for k in ARRAY_FIELDS}
                         for name, spec in manifest.arrays.items()}
    if manifest.rollout is not None:     # 1.4, only when present: caches without one keep their fingerprint
        out["rollout"] = manifest.rollout
    if manifest.positions is not None:   # 1.6, likewise
        out["positions"] = manifest.positions
    return out


def cache_fingerprint(manifest: Manifest, recipe: int = RECIPE) -> str:
    """``"sha256:<hex>"`` over the canonical JSON of ``identity(manifest, recipe)``."""
    text = json.dumps(identity(manifest, recipe), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return PREFIX + hashlib.sha256(text.encode()).hexdigest()


def vocab_sha256(tokenizer) -> str:
    """The manifest's ``tokenizer.vocab_sha256`` of a tokenizer (anything with ``get_vocab()``, e.g. a
    Hugging Face tokenizer): sha256 of the JSON list of ``[token, id]`` pairs sorted by id
    (docs/format.md). A student trained from a cache must have the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def generation_eos_ids(model_dir) -> list[int]:
    """The end-of-sequence ids of a model directory's ``generation_config.json`` (none without one)."""
    cfg = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(cfg):
        return []
    with open(cfg) as f:
        eos = json.load(f).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def tokenizer_info(tokenizer, extra_eos: list[int] | None = None) -> TokenizerInfo:
    """The manifest's ``tokenizer`` section of a Hugging Face tokenizer; ``extra_eos``: end-of-sequence ids
    beside the tokenizer's own (a model's ``generation_eos_ids``)."""
    vocab_hash = vocab_sha256(tokenizer)
    template = getattr(tokenizer, "chat_template", None) or ""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for t in extra_eos or []:
        if t not in eos:
            eos.append(int(t))
    return TokenizerInfo(
        vocab_size=len(tokenizer.get_vocab()), vocab_sha256=vocab_hash, bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id,
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest() if template else "",
    )
