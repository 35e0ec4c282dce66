"""Which teacher ids are student ids: a teacher token maps to the student token that stands for the
same bytes (``TokenBytes``: byte-level and sentencepiece markers undone), and to nothing otherwise.

The map is injective: a student id takes at most one teacher id (when two teacher ids stand for the
same bytes, the smaller maps and the other does not), so mapped entries of a top-k row stay
distinct. Ids that stand for no bytes never map. Built once per tokenizer pair; ``save``/``load``
keep it beside a training run with both vocabularies' digests, so a run resumes with the same map.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .token_bytes import TokenBytes


def table_digest(table: TokenBytes) -> str:
    """sha256 of a token-bytes table (offsets and buffer): equal digests, equal tables."""
    h = hashlib.sha256(table.offsets.tobytes())
    h.update(table.buffer.tobytes())
    return h.hexdigest()


@dataclass
class VocabMap:
    """``to_student`` (V_teacher,) int64: the student id of each teacher id, -1 where none."""

    to_student: np.ndarray
    student_vocab_size: int
    teacher_digest: str = ""
    student_digest: str = ""

    @classmethod
    def build(cls, teacher: TokenBytes, student: TokenBytes) -> "VocabMap":
        index: dict[bytes, int] = {}
        for i in range(len(student)):
            piece = student.piece(i)
            if piece and piece not in index:
                index[piece] = i
        out = np.full(len(teacher), -1, np.int64)
        taken: set[int] = set()
        for i in range(len(teacher)):
            j = index.get(teacher.piece(i), -1)
            if j >= 0 and j not in taken:
                out[i] = j
                taken.add(j)
        return cls(out, len(student), table_digest(teacher), table_digest(student))

    @property
    def mapped_share(self) -> float:
        """Share of teacher ids with a student id."""
        return float((self.to_student >= 0).mean()) if len(self.to_student) else 0.0

    def map_ids(self, ids: np.ndarray) -> np.ndarray:
        """Teacher ids (any shape; -1 padding stays -1) -> student ids, -1 where unmapped."""
        ids = np.asarray(ids, np.int64)
        ok = (ids >= 0) & (ids < len(self.to_student))
        return np.where(ok, self.to_student[np.where(ok, ids, 0)], -1)

    def save(self, path: str) -> None:
        np.savez(path, to_student=self.to_student, student_vocab_size=self.student_vocab_size,
                 teacher_digest=self.teacher_digest, student_digest=self.student_digest)

    @classmethod
    def load(cls, path: str) -> "VocabMap":
        with np.load(path) as z:
            return cls(z["to_student"].astype(np.int64), int(z["student_vocab_size"]), str(z["teacher_digest"]),
                       str(z["student_digest"]))
