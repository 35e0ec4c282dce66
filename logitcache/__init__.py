"""logitcache: offline LLM distillation caches (teacher top-k, exact entropy, hidden states)."""

__version__ = "0.1.0"


def open_cache(url, verify=False, allow_partial=False, storage_options=None, verify_reads=True):
    """Open a cache (local path or fsspec URL); see ``logitcache.store.reader.open_cache``. Every read
    is verified (docs/format.md, "Integrity"); ``verify=True`` also recomputes every checksum now."""
    from .store.reader import open_cache as _open

    return _open(url, verify=verify, allow_partial=allow_partial, storage_options=storage_options,
                 verify_reads=verify_reads)


def to_hf_dataset(cache, storage_options=None):
    """A cache as a Hugging Face ``datasets.IterableDataset`` of decoded samples, one ``datasets`` shard
    per cache shard; see ``logitcache.hf_dataset``."""
    from .hf_dataset import to_hf_dataset as _to

    return _to(cache, storage_options=storage_options)


__all__ = ["open_cache", "to_hf_dataset", "__version__"]
