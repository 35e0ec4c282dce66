"""Querying a cache: SQL over the samples table and its derived views, selection files, exports.

One concept per module:

- ``engine``: DuckDB over the shards' Parquet files (views ``samples``, ``token_stats``, ``tokens``)
- ``token_stats``: per-sample token-level statistics streamed from the Zarr entropy (high-entropy
  "forking" tokens) and the per-token rows of the ``tokens`` view
- ``derived``: materialising such tables once under ``derived/`` and recording them in the manifest
- ``shortcuts``: ``select --by COLUMN --top-frac F`` and friends, as SQL
- ``selection``: the selection file (Parquet + metadata naming the cache's fingerprint)
- ``export``: a new, smaller cache holding only the selected samples

Modules import DuckDB only when used; ``read_selection`` is the entry point for trainers.
"""

from .thresholds import DEFAULT_THRESHOLD


def read_selection(path, cache):
    """The sample ids of selection file ``path``, checked against ``cache``; see ``selection.read_selection``."""
    from .selection import read_selection as _read

    return _read(path, cache)


__all__ = ["read_selection", "DEFAULT_THRESHOLD"]
