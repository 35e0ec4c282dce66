"""axolotl's knowledge-distillation plugin: its pre-tokenized offline-KD dataset (export only).

Layout read from axolotl 0.18.0 (github.com/axolotl-ai-cloud/axolotl 067b021):
``src/axolotl/integrations/kd/{chat_template,collator,trainer}.py``, ``kernels/liger.py`` and
``utils/data/wrappers.py``. A dataset that already has ``input_ids``, ``attention_mask`` and ``labels``
is used as it is (no chat template, no re-tokenisation: ``_is_dataset_already_tokenized``), and the KD
trainer reads its ``target_token_ids``, ``target_logprobs`` and ``target_mask`` (the columns its
``chat_template`` strategies make from vLLM log-probs). Its loss compares the student's logits at
position ``j`` with target row ``j`` (no shift: our row ``j``) and computes its cross-entropy against
``labels`` shifted by one (the label at ``j + 1``). So one row per sample here:

    input_ids        (T,)    our tokens, verbatim
    attention_mask   (T,)    1
    position_ids     (T,)    0..T-1 (what axolotl's sample packing reads)
    labels           (T,)    input_ids[j] where row j - 1 is scored, else -100: the cross-entropy trains
                             exactly the tokens whose distribution is distilled
    target_token_ids (T, k)  row j's ids in rank order, then 0
    target_logprobs  (T, k)  row j's log-probs renormalised over its k ids at --kd-temperature T_kd
                             (log softmax(logprob / T_kd) over the ids), then -1e9: what the
                             chat_template strategy feeds the loss, which expects targets already
                             "temperature-scaled and normalized"
    target_mask      (T, k)  1 on a scored row's entries, else 0 (the last row: no next token)

``-1e9`` and 0 are the collator's own padding. Rows of fewer than k entries (adaptive, compact) keep
their entries and are masked after them. With ``skip_prepare_dataset: true`` axolotl does not cut or
pack-check the rows: ``sequence_len`` must be at least the longest sample (the report gives it).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..format.errors import LogitcacheError
from .base import TOP_K_OPTION, ExportReport, ForeignFormat, Option, check_exportable, default_top_k, list_array, \
    parquet_bytes, register, selected, windows, write_record

FOLLOWS = ("axolotl 0.18.0 (github.com/axolotl-ai-cloud/axolotl 067b021): the KD plugin's pre-tokenized "
           "dataset (input_ids, attention_mask, labels, target_token_ids, target_logprobs, target_mask)")
IGNORE = -100
PAD_LOGPROB = -1e9                  # axolotl's KD collator pads target_logprobs with this, ids with 0


def normalised(lp: np.ndarray, valid: np.ndarray, temperature: float) -> np.ndarray:
    """(n, k) log softmax(lp / T) over each row's valid entries (float64), PAD_LOGPROB elsewhere."""
    z = np.where(valid, lp.astype(np.float64) / temperature, -np.inf)
    top = np.max(z, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):          # rows without entries: all padding
        lse = top + np.log(np.exp(z - top).sum(axis=1, keepdims=True))
        return np.where(valid, z - lse, PAD_LOGPROB)


@register
class AxolotlKDFormat(ForeignFormat):
    name = "axolotl"
    summary = "axolotl's KD plugin dataset (pre-tokenized top-k targets), export"
    follows = FOLLOWS
    export_options = (
        TOP_K_OPTION,
        Option("kd_temperature", "--kd-temperature", float,
               "axolotl's kd_temperature: the targets are renormalised at it (default 1).", "T"),
    )

    def export(self, cache, out, *, sample_ids=None, selection="", storage_options=None, top_k=None,
               kd_temperature=None) -> ExportReport:
        from ..format.fingerprint import cache_fingerprint
        from ..store.target import new_output

        width = check_exportable(cache, "axolotl's KD targets")
        k = top_k if top_k is not None else default_top_k(width)
        if k < 1 or k > width:
            raise LogitcacheError(f"--top-k must be in 1..{width} (the entries a row of {cache.url} holds), got {k}")
        temperature = 1.0 if kd_temperature is None else float(kd_temperature)
        if not temperature > 0:
            raise LogitcacheError(f"--kd-temperature must be above 0, got {kd_temperature}")
        files, record, n_samples, n_tokens, n_rows, longest = [], [], 0, 0, 0, 0
        mass = [0.0, np.inf]                 # the largest |sum p - 1| of a written row, the smallest kept mass
        with new_output(out, storage_options, "this export's destination") as (dst, lock):
            for shard, samples in selected(cache, sample_ids):
                lock.heartbeat()
                tables, recs = [], []
                for w in windows(cache, shard, samples, width):
                    tables.append(self._window(w, k, temperature, mass))
                    recs.append(w.samples)
                    n_tokens += int(w.lengths.sum())
                    n_rows += int(w.scored.sum())
                    longest = max(longest, int(w.lengths.max()))
                table = pa.concat_tables(tables)
                rel = f"data_{len(files)}.parquet"
                data = parquet_bytes(table)
                dst.write_atomic(rel, data)
                files.append({"path": rel, "samples": table.num_rows, "bytes": len(data)})
                rec = pa.concat_tables(recs)
                record.append(rec.append_column("file", pa.array([rel] * rec.num_rows))
                              .append_column("file_row", pa.array(np.arange(rec.num_rows, dtype=np.int64))))
                n_samples += table.num_rows
            if not files:
                raise LogitcacheError("no samples to export (the selection matches none of the cache)")
            report = ExportReport(
                out=dst.url, to=self.name, source=cache.url, source_fingerprint=cache_fingerprint(cache.manifest),
                selection=selection, samples=n_samples, tokens=n_tokens, rows=n_rows, files=files,
                bytes=sum(f["bytes"] for f in files), options={"top_k": k, "kd_temperature": temperature},
                checks={"longest_sample_tokens": longest, "max_abs_target_mass_minus_1": mass[0],
                        "min_kept_mass": None if not np.isfinite(mass[1]) else mass[1], "follows": FOLLOWS})
            write_record(dst, report, record, cache)
        return report

    @staticmethod
    def _window(w, k: int, temperature: float, mass: list) -> pa.Table:
        n = len(w.tokens)
        valid = (w.ids[:, :k] >= 0) & w.scored[:, None]
        ids = np.where(valid, w.ids[:, :k], 0)
        lp = normalised(w.logprobs[:, :k], valid, temperature)
        rows = valid.any(axis=1)
        if rows.any():
            total = np.where(valid, np.exp(lp), 0.0).sum(axis=1)[rows]
            mass[0] = max(mass[0], float(np.abs(total - 1).max()))
            kept = np.where(valid, np.exp(w.logprobs[:, :k].astype(np.float64)), 0.0).sum(axis=1)[rows]
            mass[1] = min(mass[1], float(kept.min()))
        prev_scored = np.concatenate([[False], w.scored[:-1]]) & (w.position > 0)
        labels = np.where(prev_scored, w.tokens, IGNORE)
        return pa.table({
            "input_ids": list_array(w.tokens.astype(np.int64), w.lengths),
            "attention_mask": list_array(np.ones(n, dtype=np.int8), w.lengths),
            "position_ids": list_array(w.position.astype(np.int64), w.lengths),
            "labels": list_array(labels.astype(np.int64), w.lengths),
            "target_token_ids": list_array(ids.astype(np.int64), w.lengths),
            "target_logprobs": list_array(lp.astype(np.float32), w.lengths),
            "target_mask": list_array(valid.astype(np.int8), w.lengths),
        })
