"""Exact full-vocabulary entropy out of vLLM, which returns top-k log-probs but no entropy.

vLLM imports this module inside every worker process when the backend names ``EntropyExtension`` as
its ``worker_extension_cls``. The import wraps the one function per model runner that gathers top-k
log-probs for both sampled and prompt positions while the full (tokens, V) scores are at hand
(V1 runner: ``Sampler.gather_logprobs``; V2 GPU runner: ``compute_topk_scores``), and replaces the
*last* of the returned entries of each position with (``ENTROPY_TOKEN_ID``, H). The backend asks for
one log-prob more than it keeps and reads H from that slot; a slot without the sentinel id means the
hook is not active in this vLLM, and the backend refuses rather than store something else.

Verified against vLLM 0.32 (``SUPPORTED_VLLM``); other versions are checked at load time.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

ENTROPY_TOKEN_ID = -1
SUPPORTED_VLLM = ("0.32",)
_HOOKED: list[str] = []


def entropy_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """H in nats per row of (tokens, V) log-probs or logits (log_softmax makes both the same)."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    return -(logp.exp() * logp.clamp_min(torch.finfo(torch.float32).min)).sum(-1)


def _put_entropy(tensors, scores: torch.Tensor):
    """Overwrite the last (lowest-ranked) top-k column with the sentinel id and H."""
    ids, values = tensors[0], tensors[1]
    if ids.dim() == 2 and ids.shape[1] >= 2 and ids.shape[0] == scores.shape[0]:
        ids[:, -1] = ENTROPY_TOKEN_ID
        values[:, -1] = entropy_from_scores(scores).to(values.dtype)
    return tensors


def _hook_v1_sampler() -> None:
    from vllm.v1.sample.sampler import Sampler

    original = Sampler.__dict__["gather_logprobs"]
    if getattr(original, "_logitcache", False):
        return
    inner = original.__func__ if isinstance(original, staticmethod) else original

    def gather_logprobs(logprobs, num_logprobs, token_ids):
        return _put_entropy(inner(logprobs, num_logprobs, token_ids), logprobs)

    gather_logprobs._logitcache = True
    Sampler.gather_logprobs = staticmethod(gather_logprobs)
    _HOOKED.append("vllm.v1.sample.sampler.Sampler.gather_logprobs")


def _hook_v2_runner() -> None:
    try:
        import vllm.v1.worker.gpu.sample as sample_pkg
        from vllm.v1.worker.gpu.sample import logprob
    except Exception:  # not in this build (e.g. no triton on CPU)
        return
    original = logprob.compute_topk_scores
    if getattr(original, "_logitcache", False):
        return

    def compute_topk_scores(logits, num_logprobs, sampled_token_ids, *args, **kwargs):
        return _put_entropy(original(logits, num_logprobs, sampled_token_ids, *args, **kwargs), logits)

    compute_topk_scores._logitcache = True
    for info in pkgutil.iter_modules(sample_pkg.__path__):   # every module that imported the name
        try:
            module = importlib.import_module(f"{sample_pkg.__name__}.{info.name}")
        except Exception:
            continue
        if getattr(module, "compute_topk_scores", None) is original:
            module.compute_topk_scores = compute_topk_scores
            _HOOKED.append(f"{module.__name__}.compute_topk_scores")


_hook_v1_sampler()
_hook_v2_runner()


class EntropyExtension:
    """Mixed into vLLM's worker class; ``LLM.collective_rpc("logitcache_hooks")`` reports the hooks."""

    def logitcache_hooks(self) -> list[str]:
        return list(_HOOKED)
