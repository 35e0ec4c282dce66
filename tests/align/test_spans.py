from __future__ import annotations

import numpy as np

from logitcache.align import align_tokens, matching_blocks
from logitcache.align.spans import map_boundaries


def ends_of(pieces: list[bytes]) -> tuple[bytes, np.ndarray]:
    return b"".join(pieces), np.cumsum([len(p) for p in pieces]).astype(np.int64)


def test_identical_tokenizations_align_one_to_one():
    text, ends = ends_of([b"the", b" cat", b" sat"])
    al = align_tokens(text, ends, text, ends)
    assert al.row.tolist() == [0, 1, 2]
    assert al.cover.tolist() == [0, 1, -1]          # the last boundary is the end of the text
    assert al.aligned_share == 1.0


def test_splits_and_merges():
    t_text, t_ends = ends_of([b"ab", b"cd", b"ef", b"gh"])
    s_text, s_ends = ends_of([b"a", b"b", b"c", b"def", b"gh"])   # splits "ab", merges "cd"+"ef" around a split
    al = align_tokens(t_text, t_ends, s_text, s_ends)
    # student boundaries 1 2 3 6 8; teacher boundaries 2 4 6 8
    assert al.row.tolist() == [-1, 0, -1, 2, 3]
    # the teacher token holding the next byte: "ab" (no row predicts it), then "cd", "cd", "gh"
    assert al.cover.tolist() == [-1, 0, 0, 2, -1]


def test_a_student_token_spanning_teacher_tokens_aligns_to_the_last():
    t_text, t_ends = ends_of([b"un", b"believ", b"able", b"!"])
    s_text, s_ends = ends_of([b"unbelievable", b"!"])
    al = align_tokens(t_text, t_ends, s_text, s_ends)
    assert al.row.tolist() == [2, 3]             # the ends of the texts meet too
    assert al.cover.tolist() == [2, -1]


def test_different_texts_align_through_shared_bytes():
    # the student adds a BOS and renders the turn with another template; the content is shared
    t_text, t_ends = ends_of([b"<|im_start|>", b"user", b"\n", b"Hi", b" there", b"<|im_end|>"])
    s_text, s_ends = ends_of([b"<s>", b"[INST]", b" ", b"Hi", b" there", b" [/INST]"])
    al = align_tokens(t_text, t_ends, s_text, s_ends)
    blocks = matching_blocks(t_text, s_text)
    for a0, b0, n in blocks:
        assert t_text[a0:a0 + n] == s_text[b0:b0 + n]
    # "Hi" ends where the teacher's "Hi" ends, " there" too; the template tokens meet nothing
    assert al.row[3] == 3 and al.row[4] == 4
    assert al.row[0] == -1


def test_byte_fallback_pieces_align_at_character_ends():
    # é as two byte-fallback tokens on the student side, one token on the teacher side
    t_text, t_ends = ends_of([b"caf", "é".encode(), b"!"])
    s_text, s_ends = ends_of([b"ca", b"f", b"\xc3", b"\xa9", b"!"])
    al = align_tokens(t_text, t_ends, s_text, s_ends)
    assert al.row.tolist() == [-1, 0, -1, 1, 2]


def test_map_boundaries_between_blocks_takes_the_later_block():
    blocks = np.array([[0, 0, 3], [5, 3, 2]])      # a = "abcXYde", b = "abcde"
    assert map_boundaries(blocks, np.array([0, 2, 3, 4, 5, 6])).tolist() == [0, 2, 5, 6, 7, -1]


def test_matching_blocks_of_long_nearly_equal_texts():
    rng = np.random.default_rng(0)
    body = bytes(rng.integers(97, 107, 20000, dtype=np.uint8))
    a = b"<|im_start|>user\n" + body[:9000] + b"<|im_end|>" + body[9000:]
    b = b"<s>[INST] " + body[:9000] + b" [/INST]" + body[9000:] + b"</s>"
    blocks = matching_blocks(a, b)
    assert sum(int(n) for _, _, n in blocks) >= len(body)
    assert all(a[x:x + n] == b[y:y + n] for x, y, n in blocks)
    assert np.all(np.diff(blocks[:, 0]) > 0) and np.all(np.diff(blocks[:, 1]) > 0)
    assert matching_blocks(b"", b"abc").shape == (0, 3)
