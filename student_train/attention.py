"""How the documents packed into one row are kept apart in attention, and which kernel does it.

A packed row holds several documents end to end (``data.CacheStream``): ``position_ids`` restart at 0
at every document and ``document_ids`` number them (0 = padding). A document may attend only to its
own earlier tokens. Four ways to get that, in the order ``auto`` tries them:

============  ====================================  ================================================
``--attention``  what the model gets                   memory for the mask, where it runs
============  ====================================  ================================================
``flash``     ``position_ids`` only;                none: transformers turns the position restarts into
              ``attn_implementation="flash_attention_2"``  the varlen kernel's ``cu_seqlens``. CUDA, with the
                                                    ``flash-attn`` package installed.
``flex``      our ``BlockMask`` of the documents;     block-sparse, O((T/128)^2), built by a compiled kernel.
              ``flex_attention``                    CUDA (torch's FlexAttention has no backward on the CPU).
``sdpa``      ``position_ids`` only; ``sdpa``        transformers derives the document boundaries from the
                                                    position restarts and builds the boolean mask inside
                                                    the forward pass: O(T^2) bits per row, transient.
``dense``     our own (B, 1, T, T) boolean mask     O(T^2) per row, built by the loader's batch; any model
                                                    that takes a 4-D mask (the fallback).
============  ====================================  ================================================

``flash`` and ``sdpa`` rely on transformers spotting the restarts in ``position_ids`` (it does so only
with no attention mask and no KV cache: we pass ``use_cache=False``); its flex path does not (seen with
transformers 5.17 on an H200: the probe below caught documents attending to each other), hence our own
``BlockMask`` there. A model whose code ignores them would silently attend across documents, so every
choice is *probed* before training: two
documents packed in one row must give the same logits as the second document run alone. A mode that
fails its probe is skipped under ``auto`` (the reason is reported) and refused when asked for by name.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from logitcache.format.errors import LogitcacheError

MODES = ("auto", "flash", "flex", "sdpa", "dense")
IMPLEMENTATION = {"flash": "flash_attention_2", "flex": "flex_attention", "sdpa": "sdpa"}


@dataclass(frozen=True)
class Attention:
    """The chosen way: ``mode`` (flash, flex, sdpa or dense), the model's ``implementation`` and why
    (``reason``: what ``auto`` skipped and why; reported in the run's report.json)."""

    mode: str
    implementation: str
    reason: str = ""

    def model_kwargs(self, batch: dict) -> dict:
        """Keyword arguments of ``model(...)`` for a packed batch (``position_ids``, ``document_ids`` (B, T))."""
        kw = {"position_ids": batch["position_ids"], "use_cache": False}
        if self.mode == "dense":
            kw["attention_mask"] = block_causal_mask(batch["document_ids"])[:, None]     # (B, 1, T, T) bool
        elif self.mode == "flex":
            kw["attention_mask"] = document_block_mask(batch["document_ids"])
        return kw

    def to_dict(self) -> dict:
        return {"mode": self.mode, "implementation": self.implementation, "reason": self.reason}


DENSE = Attention("dense", "as loaded")


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T, T) bool, True where query i may attend to key j: j <= i in the
    same document; a padding position (id 0) attends to itself only, so no softmax row is empty."""
    T = document_ids.shape[-1]
    same = document_ids[:, :, None] == document_ids[:, None, :]                  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()  # (T, T)
    real = (document_ids != 0)[:, :, None]                                          # (B, T, 1)
    eye = torch.eye(T, dtype=torch.bool, device=document_ids.device)
    return (same & causal & real) | eye


def document_block_mask(document_ids: torch.Tensor):
    """FlexAttention's ``BlockMask`` of ``block_causal_mask`` (the same rule), built by a compiled kernel
    without the (B, T, T) tensor: per 128 x 128 block whether it is empty, full or partial."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids

    def same_document_causal(b, h, q, kv):
        return ((docs[b, q] == docs[b, kv]) & (kv <= q) & (docs[b, q] != 0)) | (q == kv)

    B, T = docs.shape
    return create_block_mask(same_document_causal, B, None, T, T, device=docs.device, _compile=docs.is_cuda)


def candidates(requested: str, device: torch.device) -> list[str]:
    """The modes ``requested`` stands for on ``device``, best first."""
    if requested not in MODES:
        raise LogitcacheError(f"--attention {requested!r}: choose one of {', '.join(MODES)}")
    if requested != "auto":
        return [requested]
    if device.type == "cuda":
        flash = ["flash"] if importable("flash_attn") else []
        return flash + ["flex", "sdpa", "dense"]
    return ["sdpa", "dense"]


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def choose_attention(model, requested: str, device: torch.device, amp_dtype: torch.dtype | None = None) -> Attention:
    """Set the model's attention implementation to the first of ``candidates(requested, device)``
    that passes ``probe`` and return it. The model must be on ``device`` and not yet wrapped (DDP,
    FSDP). Asked for by name, a mode that fails is a ``LogitcacheError`` saying why."""
    skipped = []
    loaded = getattr(model.config, "_attn_implementation", None) or "eager"
    for mode in candidates(requested, device):
        if mode == "dense":
            set_implementation(model, loaded)
            return Attention("dense", loaded, "; ".join(skipped))
        impl = IMPLEMENTATION[mode]
        error = unavailable(mode, device)
        if error is None:
            try:
                set_implementation(model, impl)
                error = probe(model, Attention(mode, impl), device, amp_dtype)
            except (ImportError, ValueError, RuntimeError, NotImplementedError, TypeError) as e:
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if error is None:
            return Attention(mode, impl, "; ".join(skipped))
        skipped.append(f"{mode}: {error}")
        set_implementation(model, loaded)
        if requested != "auto":
            raise LogitcacheError(f"--attention {mode}: not usable with this student ({error}); --attention auto "
                                  "picks one that is")
    raise AssertionError("unreachable: dense ends every candidate list")


def unavailable(mode: str, device: torch.device) -> str | None:
    """Why ``mode`` cannot train on ``device`` before trying it, or None."""
    if mode in ("flash", "flex") and device.type != "cuda":
        return f"needs a CUDA device (this run is on {device.type}: use sdpa)"
    if mode == "flash" and not importable("flash_attn"):
        return "the flash-attn package is not installed"
    return None


def set_implementation(model, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


@torch.no_grad()
def probe(model, attention: Attention, device: torch.device, amp_dtype: torch.dtype | None,
          lengths: tuple[int, int] = (5, 7)) -> str | None:
    """None when ``attention`` keeps packed documents apart on this model, else what went wrong:
    documents of ``lengths`` packed in one row against the second one alone, logits compared with a
    tolerance of 1e-3 + 1e-2 x their largest magnitude (bf16 noise passes; attending across documents,
    an O(1) change, does not)."""
    a, b = lengths
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, a + b), generator=g).to(device)
    pos = torch.cat([torch.arange(a), torch.arange(b)])[None].to(device)
    docs = torch.cat([torch.full((a,), 1), torch.full((b,), 2)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            packed = model(input_ids=ids, **attention.model_kwargs({"position_ids": pos, "document_ids": docs})).logits
            alone = model(input_ids=ids[:, a:], **attention.model_kwargs(
                {"position_ids": pos[:, a:], "document_ids": docs[:, a:]})).logits
    finally:
        model.train(was_training)
    packed, alone = packed[:, a:].float(), alone.float()
    err = float((packed - alone).abs().max())
    tol = 1e-3 + 1e-2 * float(alone.abs().max())
    if not err <= tol:
        return f"packed documents attended to each other (logits differ by {err:.3g} > {tol:.3g})"
    return None
