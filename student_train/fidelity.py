"""How closely a model follows the teacher, on an evaluation cache: every scored token of every sample.

On a cache captured with ``--encoding full`` (every value of the teacher's distribution):

* ``kl_forward_exact``: exact KL(p_teacher || q_model) over the whole vocabulary, mean per scored token;
* ``kl_reverse_exact``: exact KL(q_model || p_teacher), likewise;
* ``top1_agreement``: share of scored tokens where the model's most likely next token is the teacher's;
* ``perplexity``: exp of the model's mean negative log-likelihood of the cached tokens (the teacher's
  responses in a generate-mode cache);
* ``kl_forward``: forward KL as the cache's encoding gives it (stored entries and tail bucket).

On any other encoding the exact KLs are absent and ``kl_forward`` is the encoding's estimate. The model
must use the cache's tokenizer (checked, ``check_student_vocab``).
"""

from __future__ import annotations

from logitcache.format.errors import LogitcacheError


def fidelity(model_dir: str, cache_url: str, *, device: str = "cpu", dtype: str = "float32", seq_len: int = 512,
             batch_size: int = 4, storage_options: dict | None = None, model=None) -> dict:
    """The measures of the module docstring for the model in ``model_dir`` (or an already loaded
    ``model``) on every sample of the cache at ``cache_url``; plus ``tokens`` (scored tokens counted),
    ``samples`` and ``exact`` (whether the cache holds full distributions)."""
    import torch

    from logitcache.store.reader import open_cache

    from .data import CacheStream, stores_full_distribution
    from .evaluation import evaluate
    from .rollout import load_student

    cache = open_cache(cache_url, storage_options=storage_options)
    samples = cache.samples.to_pylist()
    if not samples:
        raise LogitcacheError(f"evaluation cache {cache_url}: it holds no samples")
    exact = stores_full_distribution(cache)
    check_tokenizer(model_dir, cache)
    if model is None:
        model, _ = load_student(model_dir, device, dtype)
    longest = max(s["num_tokens"] for s in samples)
    stream = CacheStream(cache, max(seq_len, longest), batch_size, packing=False, shuffle=False, rank=0, world_size=1,
                         with_full=exact)
    metrics = evaluate(model, stream, torch.device(device), None)
    if not metrics.get("tokens"):
        raise LogitcacheError(f"evaluation cache {cache_url}: no scored token to measure")
    return {**metrics, "samples": len(samples), "exact": exact}


def check_tokenizer(model_dir: str, cache) -> None:
    """Refuse a model whose tokenizer is not the one the (opened) evaluation cache was written with,
    naming both; a model directory without a tokenizer is refused too (nothing to check)."""
    from transformers import AutoTokenizer

    from .data import check_student_vocab

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise LogitcacheError(f"model {model_dir}: no tokenizer to check against the evaluation cache's "
                              f"({str(e).splitlines()[0]})") from None
    try:
        check_student_vocab(cache, tokenizer)
    except LogitcacheError as e:
        raise LogitcacheError(f"model {model_dir} on evaluation cache {cache.url}: {e}") from None
