"""The alignments of a cross-tokenizer run, computed once per sample and kept beside the run.

Putting a sample into the student's tokens (``cross_tokenizer``) retokenizes its text and aligns the
two tokenizations by bytes: tens of milliseconds a batch, the same every epoch. What that gives
depends only on the sample's teacher tokens as a row holds them (its first ``seq_len``), the two
tokenizers (with the student's chat template and the system prompt) and ``seq_len``, so it is kept:

- ``OUT/alignments/<key>/``: one directory per *key*, 16 hex digits of the sha256 of ``alignment_key``
  (the cache's fingerprint, both tokenizers' byte-table digests, the retokenizer's fingerprint,
  ``seq_len`` and ``FORMAT``); ``key.json`` there says what it was made for. A run with another
  cache, tokenizer or ``seq_len`` gets another directory, so nothing made for other settings is read
  (the run logs which directories it leaves alone and why); a file whose recorded key is not its
  directory's is refused.
- ``<shard>.npz`` there: the alignments of the samples of one cache shard, by sample id: the
  student's ids (cut at ``seq_len``) and whether they were cut, ``row`` and ``cover`` of the positions
  with a next token, and the count and hash of the teacher tokens they were made from, checked on
  every use. The first sample of a shard that is missing makes the whole shard (the stream's samples
  of it, their tokens read in one go): the loader walks the cache shard by shard. Written in one
  step (``CacheFS.write_atomic``) by the main process only; other ranks keep what they make in memory
  until the file is there.
- Memory: the last ``keep`` shards used, nothing more.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from logitcache.format.errors import LogitcacheError
from logitcache.store.fs import CacheFS

log = logging.getLogger(__name__)

ALIGNMENTS_DIR = "alignments"
KEY_FILE = "key.json"
FORMAT = 1      # raise when retokenizing or aligning gives something else for the same inputs
_LABELS = {"format": "alignment format", "cache": "cache (fingerprint)", "teacher_tokens": "teacher tokenizer",
           "student_tokens": "student tokenizer", "retokenizer": "student tokenizer setting, chat template or system prompt"}


def alignment_key(cache_fingerprint: str, teacher_digest: str, student_digest: str, retokenizer: str,
                  seq_len: int) -> dict:
    """What a sample's alignment depends on besides the sample (``Retokenizer.fingerprint``, the byte
    tables' ``table_digest``)."""
    return {"format": FORMAT, "cache": cache_fingerprint, "teacher_tokens": teacher_digest,
            "student_tokens": student_digest, "retokenizer": retokenizer, "seq_len": int(seq_len)}


def differences(made: dict, wanted: dict) -> list[str]:
    """What in ``made`` (a stored key) is not ``wanted``, in words."""
    out = []
    for name in [*wanted, *(k for k in made if k not in wanted)]:
        if made.get(name) == wanted.get(name) or (name == "retokenizer" and "another student tokenizer" in out):
            continue
        out.append(f"seq_len {made.get(name)} (this run: {wanted.get(name)})" if name == "seq_len"
                   else f"another {_LABELS.get(name, name)}")
    return out


def tokens_hash(ids: np.ndarray) -> int:
    """64 bits of blake2b over teacher ids (as int64)."""
    digest = hashlib.blake2b(np.ascontiguousarray(ids, np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class SampleAlignment:
    """One sample in the student's tokens: ``student_ids`` (m,) int64, cut at seq_len (``truncated``: they
    were longer); ``row`` and ``cover`` (max(m - 1, 0),) int64: ``Alignment.row`` / ``.cover`` of the
    student positions that have a next token."""

    student_ids: np.ndarray
    truncated: bool
    row: np.ndarray
    cover: np.ndarray


_ARRAYS = ("sample_ids", "teacher_len", "teacher_hash", "truncated", "student_ptr", "student_ids", "align_ptr",
           "row", "cover")


class ShardAlignments:
    """The alignments of some samples of one shard, as flat arrays (``_ARRAYS``): per sample its id,
    its teacher tokens' count and hash, ``truncated``; the student ids of sample i at
    ``student_ids[student_ptr[i]:student_ptr[i + 1]]``, its ``row`` and ``cover`` likewise at ``align_ptr``."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self._index = {sid: i for i, sid in enumerate(arrays["sample_ids"].tolist())}

    @classmethod
    def build(cls, entries: Iterable[tuple[str, np.ndarray, SampleAlignment]]) -> "ShardAlignments":
        """From (sample id, its teacher tokens, its alignment) triples."""
        return cls.from_entries((sid, len(t), tokens_hash(t), a) for sid, t, a in entries)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, int, int, SampleAlignment]]) -> "ShardAlignments":
        """From (sample id, count and hash of its teacher tokens, its alignment)."""
        entries = list(entries)

        def flat(name: str) -> np.ndarray:
            parts = [getattr(a, name) for *_, a in entries]
            return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

        def ptr(name: str) -> np.ndarray:
            return np.concatenate([[0], np.cumsum([len(getattr(a, name)) for *_, a in entries])]).astype(np.int64)

        return cls({"sample_ids": np.array([e[0] for e in entries], dtype=np.str_),
                    "teacher_len": np.array([e[1] for e in entries], np.int64),
                    "teacher_hash": np.array([e[2] for e in entries], np.uint64),
                    "truncated": np.array([a.truncated for *_, a in entries], bool),
                    "student_ptr": ptr("student_ids"), "student_ids": flat("student_ids"),
                    "align_ptr": ptr("row"), "row": flat("row"), "cover": flat("cover")})

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._index

    def _entry(self, i: int) -> tuple[np.ndarray, SampleAlignment]:
        a = self.arrays
        teacher = (int(a["teacher_len"][i]), int(a["teacher_hash"][i]))
        s0, s1, r0, r1 = (int(a["student_ptr"][i]), int(a["student_ptr"][i + 1]), int(a["align_ptr"][i]),
                          int(a["align_ptr"][i + 1]))
        return teacher, SampleAlignment(a["student_ids"][s0:s1].astype(np.int64), bool(a["truncated"][i]),
                                        a["row"][r0:r1].astype(np.int64), a["cover"][r0:r1].astype(np.int64))

    def get(self, sample_id: str, teacher_ids: np.ndarray) -> SampleAlignment | None:
        """The alignment of ``sample_id``, None when it is not here; refused when it was made from other
        teacher tokens than ``teacher_ids``."""
        i = self._index.get(sample_id)
        if i is None:
            return None
        (n, digest), found = self._entry(i)
        if n != len(teacher_ids) or digest != tokens_hash(teacher_ids):
            raise ValueError(f"sample {sample_id!r} was aligned from {n} other teacher tokens than the "
                             f"{len(teacher_ids)} it has now")
        return found

    def merged(self, other: "ShardAlignments") -> "ShardAlignments":
        """These entries plus ``other``'s for samples not here."""
        new = [i for i, sid in enumerate(other.arrays["sample_ids"].tolist()) if sid not in self._index]
        if not new:
            return self

        def entries():
            for source, rows in ((self, range(len(self))), (other, new)):
                for i in rows:
                    (n, digest), found = source._entry(i)
                    yield str(source.arrays["sample_ids"][i]), n, digest, found

        return ShardAlignments.from_entries(entries())

    def to_bytes(self, key: dict) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, key=np.array(json.dumps(key, sort_keys=True)), **self.arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[dict, "ShardAlignments"]:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return json.loads(str(z["key"])), cls({name: z[name] for name in _ARRAYS})


class AlignmentCache:
    """The alignments of one key under ``out/alignments/<key digest>/`` (module doc): ``lookup`` a sample,
    ``add`` a shard's. ``write``: keep them on disk (the main process); otherwise in memory only,
    reading what the main process wrote. ``keep``: shards held in memory."""

    def __init__(self, out: str, key: dict, write: bool = True, keep: int = 8):
        self.key, self.write, self.keep = key, bool(write), max(int(keep), 1)
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.root = os.path.join(out, ALIGNMENTS_DIR)
        self.directory = os.path.join(self.root, self.digest)
        self.fs = CacheFS(self.directory)
        self._held: OrderedDict[str, ShardAlignments] = OrderedDict()
        if self.write:
            for other, why in self.others():
                log.info("%s was made for %s: not used; this run's alignments are in %s", other, ", ".join(why),
                         self.directory)
            if not self.fs.exists(KEY_FILE):
                self.fs.write_atomic(KEY_FILE, (json.dumps(self.key, indent=1, sort_keys=True) + "\n").encode())

    def others(self) -> list[tuple[str, list[str]]]:
        """The other key directories beside this one, each with what it was made for that differs."""
        out = []
        if not os.path.isdir(self.root):
            return out
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if name == self.digest or not os.path.isfile(os.path.join(path, KEY_FILE)):
                continue
            try:
                with open(os.path.join(path, KEY_FILE)) as f:
                    made = json.load(f)
            except (OSError, ValueError):
                made = {}
            out.append((path, differences(made, self.key) or ["other settings"]))
        return out

    def _file(self, shard: str) -> str:
        return f"{shard}.npz"

    def _read(self, shard: str) -> ShardAlignments | None:
        name = self._file(shard)
        if not self.fs.exists(name):
            return None
        path = os.path.join(self.directory, name)
        try:
            made, entries = ShardAlignments.from_bytes(self.fs.read_bytes(name))
        except (OSError, ValueError, KeyError) as e:
            raise LogitcacheError(f"{path}: not a readable alignments file ({type(e).__name__}: {e}); "
                                  "remove it (it is made again)") from None
        if made != self.key:
            raise LogitcacheError(f"{path} was made for {', '.join(differences(made, self.key))}, not for this "
                                  f"run's key {self.digest}; remove it (it is made again)")
        return entries

    def _hold(self, shard: str, entries: ShardAlignments) -> ShardAlignments:
        self._held[shard] = entries
        self._held.move_to_end(shard)
        while len(self._held) > self.keep:
            self._held.popitem(last=False)
        return entries

    def shard(self, shard: str) -> ShardAlignments | None:
        """What is known of ``shard``: held in memory, else its file (then held), else None."""
        if shard in self._held:
            self._held.move_to_end(shard)
            return self._held[shard]
        entries = self._read(shard)
        return None if entries is None else self._hold(shard, entries)

    def lookup(self, shard: str, sample_id: str, teacher_ids: np.ndarray) -> SampleAlignment | None:
        """The alignment of sample ``sample_id`` of ``shard`` whose teacher tokens are ``teacher_ids``;
        None when it was not made yet."""
        entries = self.shard(shard)
        if entries is None:
            return None
        try:
            return entries.get(sample_id, teacher_ids)
        except ValueError as e:
            raise LogitcacheError(f"{os.path.join(self.directory, self._file(shard))}: {e}; remove "
                                  f"{self.directory} (it is made again)") from None

    def add(self, shard: str, new: ShardAlignments) -> ShardAlignments:
        """Add ``new`` alignments of ``shard`` to what is known of it (its file read afresh: another
        converter of this run may have added to it), written back when ``write``."""
        known = self._held.get(shard) if not self.write else None
        if known is None:
            known = self._read(shard)
        entries = new if known is None else known.merged(new)
        if self.write and entries is not known:
            self.fs.write_atomic(self._file(shard), entries.to_bytes(self.key))
        return self._hold(shard, entries)
