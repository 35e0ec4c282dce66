"""Distil into a student whose tokenizer is not the teacher's, from the same cache.

The cache holds the teacher's tokens, so their text, and the teacher's distribution after each of
them. Each training row (one sample per row: the loader runs with ``packing=False``) is turned into
the student's own tokens:

1. *Text.* A plain-text sample is the teacher's text (its special tokens left out; the student's
   tokenizer adds its own). A chat sample (its prompt was rendered with the teacher's chat template)
   is rendered again with the *student's* chat template: the stored messages, the capture's system
   prompt, and the teacher's response as the assistant turn.
2. *Alignment* (``logitcache.align``): a student position is aligned to the teacher position whose
   context ends at the same byte of the shared text. The student's hard-label CE covers the student
   positions whose next token is text the teacher scored (its loss rows); distillation covers those
   of them that are aligned.
3. *Targets over the student's vocabulary.* At an aligned position the teacher's stored entries are
   carried over by ``VocabMap`` (same bytes, same token); entries with no student token leave their
   mass to the tail bucket (stored tail + unmapped mass, or ``1 - sum`` of the mapped entries). The
   teacher's entries in rank order are kept as well (``ranked_logprobs``) for Universal Logit
   Distillation (``losses.uld_loss``), which needs no mapping.

``--cross-tokenizer-loss`` says which loss each aligned position gets: ``map`` (the chosen divergence
over the mapped entries; a position none of whose entries maps is left out), ``uld`` (ULD everywhere),
``map+uld`` (the default: ``map`` where at least one entry maps, ULD where none does).

Steps 1 and 2 depend only on the sample's teacher tokens, the tokenizers and ``seq_len``: given a run
directory (``alignments=OUT``, as ``student-train`` does), each sample's student tokens and alignment
are made once and kept in ``OUT/alignments/`` (``alignment_cache``), read back in later epochs and after
a resume; the rows are the same as when made afresh.

With the student's tokenizer equal to the teacher's, every position aligns 1:1 and every id maps to
itself: the targets are the cache's, and the loss equals the direct one (tests/student/test_cross_tokenizer.py).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from logitcache.align import Retokenizer, TokenBytes, VocabMap, align_tokens, load_tokenizer
from logitcache.align.vocab_map import table_digest
from logitcache.format.errors import LogitcacheError
from logitcache.format.fingerprint import cache_fingerprint

from .alignment_cache import AlignmentCache, SampleAlignment, ShardAlignments, alignment_key
from .targets import CrossTokenizerTargets, SparseTargets

log = logging.getLogger(__name__)

CROSS_TOKENIZER_LOSSES = ("map+uld", "map", "uld")
VOCAB_MAP_FILE = "vocab_map.npz"


def load_vocab_map(out: str | None, teacher: TokenBytes, student: TokenBytes) -> VocabMap:
    """The run's vocabulary map: ``out/vocab_map.npz`` when it exists (it must have been built for these
    two tokenizers), else built now and saved there (when ``out`` is given)."""
    path = os.path.join(out, VOCAB_MAP_FILE) if out else None
    if path and os.path.exists(path):
        saved = VocabMap.load(path)
        if (saved.teacher_digest, saved.student_digest) != (table_digest(teacher), table_digest(student)):
            raise LogitcacheError(f"{path} was built for other tokenizers than this run's teacher and student; "
                                  "remove it or use another --out")
        return saved
    built = VocabMap.build(teacher, student)
    if path:
        os.makedirs(out, exist_ok=True)
        built.save(path)
    return built


class CrossTokenizer:
    """Turns the loader's teacher-token rows (``packing=False``) into student-token rows: the same keys,
    the student's ``input_ids``/``labels``/positions, ``loss_mask`` on aligned positions and
    ``teacher`` = ``CrossTokenizerTargets``.

    stream: the ``CacheStream`` the rows come from (its samples table gives each sample's prompt).
    teacher_tokenizer / student_tokenizer: Hugging Face tokenizers. loss: one of ``CROSS_TOKENIZER_LOSSES``.
    tables: their ``TokenBytes`` (teacher's, student's) when already built (a run builds them once).
    alignments: a run directory: each sample's student ids and alignment are made once and kept under
    ``alignments/`` there (``alignment_cache``), written when ``write_alignments`` (the main process);
    None: made again at every use.
    """

    def __init__(self, stream, teacher_tokenizer, student_tokenizer, loss: str = "map+uld",
                 vocab_map: VocabMap | None = None, system_prompt: str | None = None,
                 tables: tuple[TokenBytes, TokenBytes] | None = None, alignments: str | None = None,
                 write_alignments: bool = True):
        if loss not in CROSS_TOKENIZER_LOSSES:
            raise LogitcacheError(f"--cross-tokenizer-loss must be one of {', '.join(CROSS_TOKENIZER_LOSSES)}, "
                                  f"got {loss!r}")
        if stream.packing:
            raise LogitcacheError("cross-tokenizer rows need a stream with packing=False (one sample per row)")
        if stream.encoding.estimated or stream.dense_targets or stream.token_logprobs:
            raise LogitcacheError(f"{stream.url}: a student with another tokenizer trains from exact sparse rows "
                                  f"(--encoding topk, compact, adaptive or full), not {stream.encoding.name}"
                                  + (" with --full-targets" if stream.dense_targets else ""))
        manifest = stream.cache.manifest
        self.loss = loss
        self.seq_len = stream.seq_len
        self.teacher_bytes, self.student_bytes = tables or (
            TokenBytes.from_tokenizer(teacher_tokenizer, manifest.teacher.vocab_size),
            TokenBytes.from_tokenizer(student_tokenizer))
        self.vocab_map = vocab_map or VocabMap.build(self.teacher_bytes, self.student_bytes)
        self.retokenizer = Retokenizer(teacher_tokenizer, student_tokenizer, self.teacher_bytes,
                                       system_prompt if system_prompt is not None else manifest.capture.system_prompt)
        table = stream.cache.samples.select(["sample_id", "prompt", "prompt_tokens"])
        index = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
        self._sample_ids = stream.sample_ids
        order = np.array([index[s] for s in self._sample_ids], np.int64)
        self._prompt = table.column("prompt").take(pa.array(order)).to_pylist()
        self._prompt_tokens = table.column("prompt_tokens").to_numpy()[order].astype(np.int64)
        self.counts = {"student_positions": 0, "aligned": 0, "mapped": 0, "uld": 0, "mapped_mass": 0.0,
                       "truncated_samples": 0}
        self.stream = stream
        self.alignments = None if alignments is None else AlignmentCache(alignments, alignment_key(
            cache_fingerprint(manifest), table_digest(self.teacher_bytes), table_digest(self.student_bytes),
            self.retokenizer.fingerprint(), self.seq_len), write=write_alignments)

    def student_ids(self, sample: int, teacher_ids: np.ndarray) -> list[int]:
        """The student's tokens of sample ``sample`` (its index in the stream), whose teacher tokens (as
        loaded, possibly cut at seq_len) are ``teacher_ids``."""
        return self.retokenizer.student_ids(teacher_ids, self._prompt[sample], int(self._prompt_tokens[sample]))

    def align(self, sample: int, teacher_ids: np.ndarray) -> SampleAlignment:
        """Sample ``sample`` in the student's tokens (cut at seq_len) and aligned to ``teacher_ids``, made now."""
        s_tokens = np.asarray(self.student_ids(sample, teacher_ids), np.int64)
        truncated = len(s_tokens) > self.seq_len
        s_tokens = s_tokens[:self.seq_len]
        m = len(s_tokens)
        t_text, t_ends = self.teacher_bytes.join(teacher_ids)
        s_text, s_ends = self.student_bytes.join(s_tokens)
        al = align_tokens(t_text, t_ends, s_text, s_ends)
        return SampleAlignment(s_tokens, truncated, al.row[:m - 1], al.cover[:m - 1])   # positions with a next token

    def aligned(self, sample: int, teacher_ids: np.ndarray) -> SampleAlignment:
        """``align(sample, teacher_ids)``, from the alignments kept beside the run when there are; the first
        sample of a shard not made yet makes the stream's samples of that shard."""
        if self.alignments is None:
            return self.align(sample, teacher_ids)
        shard, sample_id = self.stream.shard_of(sample), self._sample_ids[sample]
        found = self.alignments.lookup(shard, sample_id, teacher_ids)
        if found is None:
            known = self.alignments.shard(shard)
            members, tokens = self.stream.shard_samples(shard)
            self.alignments.add(shard, ShardAlignments.build(
                (self._sample_ids[i], t, self.align(i, t)) for i, t in zip(members.tolist(), tokens)
                if known is None or self._sample_ids[i] not in known))
            found = self.alignments.lookup(shard, sample_id, teacher_ids)
            if found is None:
                raise LogitcacheError(f"sample {sample_id!r} is not one of the stream's samples of shard {shard!r}")
        return found

    # ---- one batch ----------------------------------------------------------------------------------
    def convert(self, batch: dict) -> dict:
        """A teacher-token batch (B, T) -> the same batch in the student's tokens (B, T)."""
        B, T = batch["input_ids"].shape
        if T != self.seq_len:
            raise LogitcacheError(f"a batch of rows of {T} tokens, but this converter's stream has seq_len {self.seq_len}")
        teacher = batch["teacher"]
        if not isinstance(teacher, SparseTargets):
            raise LogitcacheError(f"cross-tokenizer rows need sparse teacher targets, got {type(teacher).__name__}")
        W = teacher.ids.shape[-1]
        out = {name: torch.zeros((B, T), dtype=batch[name].dtype)
               for name in ("position_ids", "document_ids", "teacher_entropy")}
        out["input_ids"] = torch.zeros((B, T), dtype=torch.int64)
        out["labels"] = torch.full((B, T), -100, dtype=torch.int64)
        out["loss_mask"] = torch.zeros((B, T), dtype=torch.bool)
        out["sample_index"] = torch.full((B, T), -1, dtype=torch.int64)
        ids = np.full((B, T, W), -1, np.int64)
        lp = np.full((B, T, W), -np.inf, np.float32)
        ranked = np.full((B, T, W), -np.inf, np.float32)
        tail = np.zeros((B, T), np.float32)
        ranked_tail = np.zeros((B, T), np.float32) if teacher.tail is not None else None
        use_uld = np.zeros((B, T), bool)
        t_ids_all, t_lp_all = teacher.ids.numpy(), teacher.logprobs.numpy()
        t_tail_all = None if teacher.tail is None else teacher.tail.numpy()
        for b in range(B):
            n = int((batch["document_ids"][b] != 0).sum())
            if n == 0:
                continue                                             # a padding row stays padding
            t_tokens = batch["input_ids"][b, :n].numpy()
            t_loss = batch["loss_mask"][b, :n].numpy()
            sample = int(batch["sample_index"][b, 0])
            al = self.aligned(sample, t_tokens)
            s_tokens, row, cover = al.student_ids, al.row, al.cover
            self.counts["truncated_samples"] += int(al.truncated)
            m = len(s_tokens)
            ce = (cover >= 0) & t_loss[np.maximum(cover, 0)]
            kd = ce & (row >= 0) & t_loss[np.maximum(row, 0)]
            out["input_ids"][b, :m] = torch.from_numpy(s_tokens)
            out["position_ids"][b, :m] = torch.arange(m)
            out["document_ids"][b, :m] = 1
            out["sample_index"][b, :m] = sample
            labels = np.where(ce, s_tokens[1:], -100)
            out["labels"][b, :m - 1] = torch.from_numpy(labels)
            out["loss_mask"][b, :m - 1] = torch.from_numpy(kd)
            pos, rows = np.flatnonzero(kd), row[kd]
            out["teacher_entropy"][b, pos] = batch["teacher_entropy"][b, torch.from_numpy(rows)]
            t_id, t_lp = t_ids_all[b, rows], t_lp_all[b, rows]                  # (n_kd, W) in rank order
            present = (t_id >= 0) & np.isfinite(t_lp)
            mapped = np.where(present, self.vocab_map.map_ids(t_id), -1)
            ok = mapped >= 0
            order = np.argsort(~ok, axis=-1, kind="stable")                    # mapped entries first, in rank order
            ids[b, pos] = np.where(np.take_along_axis(ok, order, -1), np.take_along_axis(mapped, order, -1), -1)
            lp[b, pos] = np.where(np.take_along_axis(ok, order, -1), np.take_along_axis(t_lp, order, -1), -np.inf)
            ranked[b, pos] = np.where(present, t_lp, -np.inf)
            p = np.where(present, np.exp(t_lp.astype(np.float64)), 0.0)
            lost = np.where(ok, 0.0, p).sum(-1)                                   # mass with no student token
            if t_tail_all is not None:
                tail[b, pos] = np.minimum(t_tail_all[b, rows] + lost, 1.0)      # stored values are rounded
                ranked_tail[b, pos] = t_tail_all[b, rows]
            has_map = ok.any(-1)
            use_uld[b, pos] = True if self.loss == "uld" else (~has_map if self.loss == "map+uld" else False)
            self.counts["student_positions"] += int(ce.sum())
            self.counts["aligned"] += int(kd.sum())
            self.counts["mapped"] += int(has_map.sum())
            self.counts["uld"] += int(use_uld[b, pos].sum())
            self.counts["mapped_mass"] += float(np.where(ok, p, 0.0).sum())
        if self.loss == "map":                          # a position without a mapped entry is left out
            out["loss_mask"] &= torch.from_numpy((ids >= 0).any(-1))
        out["teacher"] = CrossTokenizerTargets(
            torch.from_numpy(ids), torch.from_numpy(lp), torch.from_numpy(tail) if t_tail_all is not None else None,
            torch.from_numpy(ranked), None if ranked_tail is None else torch.from_numpy(ranked_tail),
            torch.from_numpy(use_uld))
        return out

    def stats(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """Counts so far: student loss positions, aligned ones and their share, those with a mapped entry,
        those trained by ULD, the mean teacher mass carried by mapped entries at aligned positions. Under a
        process group of several ranks the counts are summed over all of them (every rank must call;
        ``device``: where the group's backend reduces, the rank's GPU under NCCL)."""
        c = dict(self.counts)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            keys = sorted(c)
            total = torch.tensor([float(c[k]) for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            c = {k: float(v) if k == "mapped_mass" else int(round(v)) for k, v in zip(keys, total.tolist())}
        c["aligned_share"] = c["aligned"] / c["student_positions"] if c["student_positions"] else 0.0
        c["mapped_mass"] = c["mapped_mass"] / c["aligned"] if c["aligned"] else 0.0
        c["vocab_mapped_share"] = self.vocab_map.mapped_share
        return c


class ConvertedBatches:
    """A loader or stream whose batches go through ``CrossTokenizer.convert``; everything else
    (``set_epoch``, ``state_dict``, ``stream``, ``__len__``...) is the wrapped object's."""

    with_full = False          # no exact full-vocabulary metrics across tokenizers

    def __init__(self, inner, converter: CrossTokenizer):
        self._inner, self.converter = inner, converter

    def __iter__(self) -> Iterator[dict]:
        for batch in self._inner:
            yield self.converter.convert(batch)

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)


# ---- the training run's side ---------------------------------------------------------------------------

def check_cross_tokenizer_supported(cfg) -> None:
    """What a student with another tokenizer cannot combine with, refused naming the flag: settings that
    compare the two models position by position in one vocabulary or one token sequence."""
    refused = [("--teacher", bool(cfg.teachers)), ("--layer-map", bool(cfg.layer_map)),
               ("--attention-transfer", bool(cfg.attention_transfer)), ("--offpolicy-cache", bool(cfg.offpolicy_cache)),
               ("--full-targets", cfg.full_targets), ("--loss policy_gradient", cfg.loss == "policy_gradient"),
               ("--fused-loss on", cfg.fused_loss == "on")]
    for flag, given in refused:
        if given:
            raise LogitcacheError(f"{flag}: not supported with a student whose tokenizer differs from the teacher's "
                                  f"(--student {cfg.student}); use a student with the teacher's tokenizer")


def teacher_tokenizer(cfg, manifest):
    """The teacher's tokenizer (``--teacher-tokenizer`` or the teacher's directory), checked against the
    cache's vocabulary digest: the text of the cached tokens must be read with the tokenizer that wrote them."""
    from .model import teacher_directory

    where = cfg.teacher_tokenizer or teacher_directory(
        manifest, "a student with another tokenizer", "pass --teacher-tokenizer DIR (the teacher's tokenizer files)")
    return load_tokenizer(where, "--teacher-tokenizer", manifest.tokenizer.vocab_sha256)


def cross_tokenizer_rows(cfg, manifest, tokenizer, loader, stream, eval_stream, main_process: bool):
    """(loader, eval stream, converter) yielding rows in the student's tokens; the vocabulary map is
    built once and kept beside the run (``out/vocab_map.npz``), and so is each sample's alignment
    (``out/alignments/``, written by the main process)."""
    teacher = teacher_tokenizer(cfg, manifest)
    tables = (TokenBytes.from_tokenizer(teacher, manifest.teacher.vocab_size), TokenBytes.from_tokenizer(tokenizer))
    vocab_map = load_vocab_map(cfg.out if main_process else None, *tables)
    converter = CrossTokenizer(stream, teacher, tokenizer, cfg.cross_tokenizer_loss, vocab_map, tables=tables,
                               alignments=cfg.out, write_alignments=main_process)
    if main_process:
        log.warning("student tokenizer differs from the teacher's: %d of %d teacher ids have a student token "
                    "(%.1f%%); loss %s", int((converter.vocab_map.to_student >= 0).sum()),
                    len(converter.vocab_map.to_student), 100 * converter.vocab_map.mapped_share,
                    cfg.cross_tokenizer_loss)
    if eval_stream is not None:      # one measure whatever the training loss: forward KL over the mapped entries
        eval_stream = ConvertedBatches(eval_stream, CrossTokenizer(
            eval_stream, teacher, tokenizer, "map", converter.vocab_map, tables=tables, alignments=cfg.out,
            write_alignments=main_process))
    return ConvertedBatches(loader, converter), eval_stream, converter
