"""`logitcache export`: a new cache holding only the selected samples, in the same format.

Each source shard with selected samples becomes one shard of the new cache, written by the same
shard writer a capture uses (temporary directory, checksum from the bytes on storage, publish), and
``manifest.json`` is written last, atomically: an interrupted export leaves no manifest, so nothing
that looks like a cache. Arrays are copied as stored (bfloat16 bits stay bits), so the exported rows
equal the source rows bit for bit; every byte copied is verified as it is read (``Cache.read_raw``,
``Cache.shard_samples``), so a damaged source is an error, never a new cache with fresh checksums
over damaged values. The destination's manifest lock is held for the whole export (two exports into
one directory cannot interleave). The manifest's ``provenance`` section (format 1.1) names the
source cache, its fingerprint and the selection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import __version__
from ..format import layout
from ..format.errors import LogitcacheError
from ..format.fingerprint import cache_fingerprint
from ..format.manifest import InputSpec, Manifest, Provenance, ShardRecord
from ..store.reader import Cache
from ..store.shard_writer import write_shard
from ..store.target import new_output
from .selection import check_selection, load_selection

log = logging.getLogger(__name__)


@dataclass
class ExportSummary:
    cache: str
    source: str
    selection: str
    samples: int
    shards: int
    tokens: int
    bytes: int
    fingerprint: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _runs(offsets: np.ndarray, lengths: np.ndarray) -> list[tuple[int, int]]:
    """Merge the row ranges of consecutive selected samples: [(start, stop), ...]."""
    runs: list[list[int]] = []
    for a, n in zip(offsets.tolist(), lengths.tolist()):
        if runs and runs[-1][1] == a:
            runs[-1][1] = a + n
        else:
            runs.append([a, a + n])
    return [(a, b) for a, b in runs]


def export_selection(cache: Cache, selection_path: str, out: str, storage_options: dict | None = None) -> ExportSummary:
    """Copy the samples of ``selection_path`` (checked against ``cache``) into a new cache at ``out``."""
    table, info = load_selection(selection_path)
    check_selection(table, info, cache, str(selection_path))
    wanted = table.column("sample_id").combine_chunks()
    if len(wanted) == 0:
        raise LogitcacheError(f"{selection_path}: the selection is empty; there is nothing to export")
    m = cache.manifest
    codecs = {k: v["codec"] for k, v in m.codecs.items()}
    shards: list[ShardRecord] = []
    mapping: dict[str, str] = {}
    per_input: dict[str, int] = {}
    with new_output(out, storage_options, "this export's destination") as (dst, lock):
        for src in m.shards:
            lock.heartbeat()
            samples = cache.shard_samples(src.name)
            keep = samples.filter(pc.is_in(samples.column("sample_id"), value_set=wanted))
            if keep.num_rows == 0:
                continue
            offsets = keep.column("token_offset").to_numpy()
            lengths = keep.column("num_tokens").to_numpy().astype(np.int64)
            arrays = {}
            for name, spec in m.arrays.items():   # as stored: no decode / re-encode
                runs = _runs(offsets, lengths)
                if spec.per_entry:                  # the entries of those tokens (format 1.2)
                    off = cache.entry_offsets(src.name, spec.index)
                    runs = [(int(off[a]), int(off[b])) for a, b in runs]
                arrays[name] = np.concatenate([cache.read_raw(src.name, name, a, b) for a, b in runs])
            index = per_input.get(src.input_key, 0)
            per_input[src.input_key] = index + 1
            name = layout.shard_name(src.input_key, index)
            new_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            keep = keep.set_column(keep.schema.get_field_index("shard"), "shard", pa.array([name] * keep.num_rows))
            keep = keep.set_column(keep.schema.get_field_index("token_offset"), "token_offset", pa.array(new_offsets))
            written = write_shard(dst, name, arrays, m.arrays, keep, codec=codecs)
            shards.append(written.record(src.input_key, index, worker=0))
            mapping[name] = src.name
            log.info("exported %d sample(s) of %s as %s", keep.num_rows, src.name, name)
        inputs = [InputSpec(key=i.key, source=i.source, source_name=i.source_name, split=i.split, columns=i.columns,
                            limit=i.limit, num_rows=i.num_rows, num_shards=per_input[i.key], content=i.content)
                  for i in m.inputs if i.key in per_input]
        manifest = Manifest(
            teacher=m.teacher, tokenizer=m.tokenizer, capture=m.capture, arrays=m.arrays, codecs=m.codecs,
            inputs=inputs, shards=shards, skipped=[], complete=True, created_by=f"logitcache {__version__} (export)",
            provenance=Provenance(source_cache=cache.url, source_fingerprint=cache_fingerprint(m),
                                  selection_query=info.query, selection_count=info.count,
                                  selection_file=str(selection_path), source_shards=mapping),
            rollout=m.rollout, positions=m.positions)
        dst.write_atomic(layout.MANIFEST, manifest.to_json().encode())
    return ExportSummary(cache=dst.url, source=cache.url, selection=str(selection_path), samples=manifest.num_samples,
                         shards=len(shards), tokens=manifest.num_tokens, bytes=sum(s.bytes for s in shards),
                         fingerprint=cache_fingerprint(manifest))
