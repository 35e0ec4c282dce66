"""Which student positions meet a teacher position: two tokenizations of (nearly) the same text,
aligned through byte offsets.

Position ``j`` of a sequence predicts token ``j + 1``; its context ends at the byte boundary where
token ``j`` ends. A student position and a teacher position are *aligned* when their boundaries are
the same place in the text: both then predict what comes after the same prefix. This covers 1:1
tokens, a student token spanning several teacher tokens (aligned to the last of them) and the
reverse (the student's inner boundaries meet no teacher boundary and stay unaligned).

The texts may differ (each side's chat template, a BOS, a byte the other could not write): the
boundaries are carried over through the blocks of bytes both texts share (``matching_blocks``), and
a boundary outside every shared block aligns with nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.frombuffer(a, np.uint8, n), np.frombuffer(b, np.uint8, n)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


MIN_BLOCK = 4    # bytes: a shorter shared run inside a difference is chance ("<" of "<s>" and "<|im_start|>")


def matching_blocks(a: bytes, b: bytes, min_block: int = MIN_BLOCK) -> np.ndarray:
    """(M, 3) int64 rows ``(start in a, start in b, length)``, increasing in both, of bytes the two
    texts share in order (an edit script's equal runs: rapidfuzz's Indel opcodes, exact and
    bit-parallel in C++; the common prefix and suffix are split off first, so equal or nearly equal
    texts cost one comparison). Runs found inside the differing middle shorter than ``min_block``
    bytes are dropped: there two texts share single characters by chance, not a context."""
    if a == b:
        return np.array([[0, 0, len(a)]] if a else np.zeros((0, 3)), np.int64).reshape(-1, 3)
    p = _common_prefix(a, b)
    s = _common_prefix(a[p:][::-1], b[p:][::-1])
    blocks = [(0, 0, p)] if p else []
    mid_a, mid_b = a[p:len(a) - s], b[p:len(b) - s]
    if mid_a and mid_b:
        from rapidfuzz.distance import Indel

        blocks += [(p + o.src_start, p + o.dest_start, o.src_end - o.src_start)
                   for o in Indel.opcodes(mid_a, mid_b) if o.tag == "equal" and o.src_end - o.src_start >= min_block]
    if s:
        blocks.append((len(a) - s, len(b) - s, s))
    return np.array(blocks, np.int64).reshape(-1, 3)


@dataclass
class Alignment:
    """Per student position ``j`` (n_student,) int64:

    - ``row[j]``: the teacher position whose context ends where ``j``'s does (aligned), else -1;
    - ``cover[j]``: the teacher position that predicts the teacher token holding the first byte after
      ``j``'s boundary (the teacher's view of the text ``j`` predicts), else -1: it says whether the
      teacher scored that text (its loss rows)."""

    row: np.ndarray
    cover: np.ndarray

    @property
    def aligned_share(self) -> float:
        return float((self.row >= 0).mean()) if len(self.row) else 0.0


def map_boundaries(blocks: np.ndarray, b_pos: np.ndarray) -> np.ndarray:
    """Byte boundaries of text b -> the same places in text a, -1 outside every shared block. A
    boundary between two shared blocks maps to the start of the later one (the text that follows)."""
    b_pos = np.asarray(b_pos, np.int64)
    if len(blocks) == 0:
        return np.full(len(b_pos), -1, np.int64)
    a0, b0, n = blocks[:, 0], blocks[:, 1], blocks[:, 2]
    i = np.searchsorted(b0, b_pos, side="right") - 1
    ok = i >= 0
    i = np.maximum(i, 0)
    ok &= b_pos <= b0[i] + n[i]
    return np.where(ok, a0[i] + b_pos - b0[i], -1)


def align_tokens(teacher_text: bytes, teacher_ends: np.ndarray, student_text: bytes,
                 student_ends: np.ndarray) -> Alignment:
    """Align student positions to teacher positions (``TokenBytes.join`` gives each side's text and
    token ends). Vectorised: one diff of the texts, then searches over the boundaries."""
    t_ends = np.asarray(teacher_ends, np.int64)
    a = map_boundaries(matching_blocks(teacher_text, student_text), student_ends)
    n_t = len(t_ends)
    # the last teacher token ending at a (zero-byte tokens share a boundary with the one before)
    t = np.searchsorted(t_ends, a, side="right") - 1
    hit = (a >= 0) & (t >= 0)
    hit &= t_ends[np.clip(t, 0, max(n_t - 1, 0))] == a if n_t else False
    row = np.where(hit, t, -1)
    # the teacher token holding byte a is the first ending after a; the position before it predicts it
    u = np.searchsorted(t_ends, a, side="right")
    cover = np.where((a >= 0) & (u >= 1) & (u < n_t), u - 1, -1)
    return Alignment(row.astype(np.int64), cover.astype(np.int64))
