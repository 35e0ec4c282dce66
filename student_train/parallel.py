"""Data parallelism for the student: DDP (a full copy per rank) or FSDP2 (parameters, gradients and
optimizer state sharded across ranks, ``torch.distributed.fsdp.fully_shard``), activation
checkpointing, and gradient accumulation without a gradient all-reduce on every micro-step.

``--parallel ddp`` keeps a whole student per GPU: fine up to ~1.5B parameters on 80 GB with AdamW in
fp32 (16 bytes a parameter). ``--parallel fsdp`` shards each decoder block and then the rest of the
model, so a rank holds 1/world of the 16 bytes a parameter plus one block's full weights at a time:
a 7-8B student trains on 8 x 80 GB. Under bf16 (``--precision auto`` on CUDA, or ``bf16``) FSDP
gathers parameters in bf16 and reduces gradients in fp32 (``MixedPrecisionPolicy``); the master
weights and AdamW state stay fp32. Checkpoints of an FSDP run are sharded
(``torch.distributed.checkpoint``, every rank writes its part; ``checkpoint.py``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from logitcache.format.errors import LogitcacheError

from .model import decoder_body

MODES = ("ddp", "fsdp")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The student's decoder blocks (the unit FSDP shards and checkpointing recomputes)."""
    body = decoder_body(model)
    if body is None:
        raise LogitcacheError(f"--parallel fsdp: {type(model).__name__} has no decoder .layers list to shard")
    return list(body.layers)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in backward instead of keeping them (transformers'
    own non-reentrant gradient checkpointing: numbers unchanged, activation memory ~1/layers)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LogitcacheError(f"--activation-checkpointing: {type(model).__name__} does not support gradient "
                              "checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def wrap(model: nn.Module, mode: str, world: int, device: torch.device,
         param_dtype: torch.dtype | None) -> nn.Module:
    """The model the loop calls: ``model`` itself (one process, DDP mode), DDP, or ``model`` sharded in
    place by FSDP2 (also with one process: the same code path as many). ``param_dtype``: the compute
    dtype of FSDP's gathered parameters (bf16 under mixed precision), None for fp32."""
    if mode not in MODES:
        raise LogitcacheError(f"--parallel {mode!r}: choose ddp or fsdp")
    if mode == "ddp":
        if world == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not torch.distributed.is_initialized():      # one process: a group of one, so FSDP runs as it does on many
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", world_size=1, rank=0,
                                             store=torch.distributed.HashStore())
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None \
        else MixedPrecisionPolicy()
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def gradient_sync(model: nn.Module, sync: bool):
    """Context of one micro-step's backward: with ``sync`` False the gradients only accumulate locally
    (DDP ``no_sync``; FSDP ``set_requires_gradient_sync(False)``: no reduce-scatter), the last micro-step
    of an optimizer step synchronises them all."""
    if hasattr(model, "set_requires_gradient_sync"):               # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state dict on the CPU, gathered from the shards (every rank must call it under
    FSDP; only rank 0 receives the tensors, the others an empty dict)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _trained(model: nn.Module, projector: nn.Module | None) -> nn.Module:
    """Every module the optimizer steps, under one root (its state-dict names: "student.*", "projector.*")."""
    return nn.ModuleDict({"student": model, **({"projector": projector} if projector is not None else {})})


def sharded_state(model: nn.Module, projector: nn.Module | None, optimizer) -> dict:
    """{"model", "optimizer"}: the rank's shards of the student (and projector) and of the optimizer, as
    ``torch.distributed.checkpoint`` saves and loads them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(_trained(model, projector), optimizer)
    return {"model": msd, "optimizer": osd}


def load_sharded_state(model: nn.Module, projector: nn.Module | None, optimizer, path: str) -> None:
    """Load ``sharded_state`` saved at ``path`` back into the student, projector and optimizer (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(model, projector, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(_trained(model, projector), optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def average_gradients(params, world: int) -> None:
    """All-reduce (mean) the gradients of parameters outside the DDP wrapper (the hidden-state projector)."""
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def full_value(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (FSDP's gradient norm is one), else ``x``."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
