"""Hidden states out of vLLM through its ``extract_hidden_states`` speculative method.

With that method vLLM keeps the chosen layers' hidden states of every token in an extra KV-cache
group, and a KV connector copies a finished request's rows out. vLLM's example connector does the
copy with CUDA streams and pinned memory; ``HiddenStatesToFiles`` does the same copy synchronously
when the cache lives in CPU memory (vLLM's CPU build) and defers to the example otherwise. The
backend reads each request's file straight into the shard's arrays and deletes it, so the cache
holds Zarr arrays, not one safetensors file per request.

Numbering: vLLM's auxiliary layer id ``L`` is the residual stream after ``L`` decoder blocks, which
is Hugging Face's ``hidden_states[L]`` for ``L < num_layers``. For ``L = num_layers`` vLLM gives the
stream *before* the final norm; ``final_norm`` applies the norm so that layer means what it means in
the cache format (what the LM head reads).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    extract_from_kv_cache,
)

CONNECTOR = "HiddenStatesToFiles"
MODULE = __name__

# Architectures whose final norm is RMSNorm(x) * weight (checked by the cross-engine test on Llama).
RMS_FINAL_NORM = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class HiddenStatesToFiles(ExampleHiddenStatesConnector):
    """The example connector, with a synchronous copy when the KV cache is in host memory."""

    def _submit_async_write(self, pending) -> None:
        if self._kv_cache is None or self._kv_cache.is_cuda:
            return super()._submit_async_write(pending)
        if not self._is_tp_rank_zero:
            return
        from safetensors.torch import save_file

        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        slots = (torch.arange(self._block_size)[None, :] + blocks[:, None] * self._block_size).flatten()
        hidden = extract_from_kv_cache(self._kv_cache, slots, pending.token_ids.shape[0])
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        try:
            save_file({"hidden_states": hidden.contiguous(), "token_ids": pending.token_ids.clone()}, pending.filename)
        finally:
            lock_fd = self._lock_fds.pop(pending.req_id, None)
            if lock_fd is not None:
                os.close(lock_fd)   # releases the reader waiting in load_hidden_states


def engine_config(layers: list[int], directory: str) -> dict:
    """The ``LLM`` keyword arguments that turn hidden-state extraction on for ``layers``."""
    return dict(
        speculative_config={"method": "extract_hidden_states", "num_speculative_tokens": 1,
                            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layers)}}},
        kv_transfer_config={"kv_connector": CONNECTOR, "kv_role": "kv_producer", "kv_connector_module_path": MODULE,
                            "kv_connector_extra_config": {"shared_storage_path": directory,
                                                          "use_synchronization_lock": True}})


class FinalNorm:
    """The teacher's final RMSNorm, read from its safetensors without loading the model."""

    def __init__(self, model_dir: str, config: dict):
        from safetensors import safe_open

        arch = (config.get("architectures") or ["?"])[0]
        if arch not in RMS_FINAL_NORM:
            raise ValueError(f"the final hidden layer (after the norm) under --backend vllm is supported for "
                             f"{', '.join(RMS_FINAL_NORM)}, not {arch}; ask for layer {config['num_hidden_layers'] - 1} "
                             f"or lower, or use --backend hf")
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = [json.load(f)["weight_map"]["model.norm.weight"]]
        else:
            files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
        for name in files:
            with safe_open(os.path.join(model_dir, name), framework="pt") as f:
                if "model.norm.weight" in f.keys():
                    self.weight = f.get_tensor("model.norm.weight").float()
                    return
        raise ValueError(f"{model_dir}: no tensor 'model.norm.weight' in the safetensors files")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:     # (n, d) pre-norm -> (n, d)
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def read_hidden(path: str, expected_tokens: np.ndarray, where: str) -> torch.Tensor:
    """(tokens, layers, d) from one request's file, checked against the tokens we sent; file removed."""
    from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
        cleanup_hidden_states,
        load_hidden_states,
    )

    data = load_hidden_states(path)    # waits on the writer's file lock
    cleanup_hidden_states(path)
    got = data["token_ids"].numpy()
    n = min(len(got), len(expected_tokens))
    if len(got) > len(expected_tokens) or not np.array_equal(got[:n], expected_tokens[:n]):
        raise RuntimeError(f"vLLM hidden states for {where} belong to other tokens than the sequence captured")
    return data["hidden_states"]
