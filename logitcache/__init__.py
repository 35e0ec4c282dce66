"""logitcache: offline LLM distillation caches (teacher top-k, exact entropy, hidden states)."""

__version__ = "0.1.0"


def open_cache(url, verify=False, allow_partial=False, storage_options=None):
    """Open a cache (local path or fsspec URL); see ``logitcache.store.reader.open_cache``."""
    from .store.reader import open_cache as _open

    return _open(url, verify=verify, allow_partial=allow_partial, storage_options=storage_options)


__all__ = ["open_cache", "__version__"]
