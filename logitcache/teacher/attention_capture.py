"""The queries and keys of chosen decoder blocks (format 1.5 ``attn/<block>_q`` and ``attn/<block>_k``),
as the block's attention uses them: per head, after the query/key norm where the architecture has one,
after the rotary embedding. softmax(q k^T / sqrt(head_dim)) over a sample's earlier positions is then
the block's attention (its keys shared by the query heads of their group), rebuilt per document at
training time instead of storing T^2 attention maps.

Recorded by forward hooks on each block's ``q_proj`` / ``k_proj`` (Llama-like decoders: Llama, Mistral,
Qwen2/3); the caller gives the positions of each forward pass (the rotary embedding's input).
"""

from __future__ import annotations

import torch

from ..format.errors import LogitcacheError


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a transformers config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv, head_dim


class QKRecorder:
    """Forward hooks on the q/k projections of ``blocks`` of a transformers decoder; ``take`` turns the
    last forward pass's outputs into post-rotary (b, t, heads, head_dim) float32 tensors."""

    def __init__(self, decoder, config, blocks: list[int]):
        self.blocks = list(blocks)
        self.heads, self.kv_heads, self.head_dim = attention_shape(config)
        self.rotary = getattr(decoder, "rotary_emb", None)
        layers = getattr(decoder, "layers", None)
        if self.rotary is None or layers is None:
            raise LogitcacheError(f"--attention-layers: {type(decoder).__name__} has no rotary_emb / layers "
                                  "(Llama-like decoders only)")
        self._raw: dict[tuple[int, str], torch.Tensor] = {}
        self._attn, self._handles = {}, []
        for b in self.blocks:
            if not 0 <= b < len(layers):
                raise LogitcacheError(f"--attention-layers: block {b} is out of range (the teacher has "
                                      f"{len(layers)} decoder blocks: 0..{len(layers) - 1})")
            attn = layers[b].self_attn
            if not (hasattr(attn, "q_proj") and hasattr(attn, "k_proj")):
                raise LogitcacheError(f"--attention-layers: block {b}'s attention has no q_proj / k_proj")
            self._attn[b] = attn
            for part in ("q", "k"):
                self._handles.append(getattr(attn, f"{part}_proj").register_forward_hook(self._keep(b, part)))

    def _keep(self, block: int, part: str):
        def hook(module, args, output):
            self._raw[(block, part)] = output
        return hook

    def take(self, positions: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
        """{(block, "q" | "k"): (b, t, heads, head_dim)} of the last forward pass, whose tokens sat at
        ``positions`` (b, t)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        out = {}
        for b in self.blocks:
            attn = self._attn[b]
            q, k = self._raw.pop((b, "q")), self._raw.pop((b, "k"))
            n, t = q.shape[:2]
            q, k = q.view(n, t, self.heads, self.head_dim), k.view(n, t, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):                      # Qwen3-style per-head norms before the rotary
                q, k = attn.q_norm(q), attn.k_norm(k)
            cos, sin = self.rotary(q, positions)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            out[(b, "q")], out[(b, "k")] = q.transpose(1, 2).float(), k.transpose(1, 2).float()
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

