"""How well a cache's samples align with another tokenizer (``logitcache inspect --student-tokenizer``):
the same counts a cross-tokenizer training run reports, over the scored rows of the first samples."""

from __future__ import annotations

import numpy as np

from .retokenize import Retokenizer
from .spans import align_tokens
from .token_bytes import TokenBytes
from .vocab_map import VocabMap


def alignment_stats(cache, teacher_tokenizer, student_tokenizer, max_samples: int = 256) -> dict:
    """Over the first ``max_samples`` samples of ``cache``: ``student_positions`` (student positions whose
    next token is text the teacher scored), ``aligned`` and ``aligned_share`` (those meeting a teacher
    position at the same byte), ``mapped`` (aligned ones with a stored teacher entry that has a student
    token), ``mapped_mass`` (the mean teacher mass of those entries at aligned positions), and
    ``vocab_mapped_share`` (teacher ids with a student token)."""
    m = cache.manifest
    teacher = TokenBytes.from_tokenizer(teacher_tokenizer, m.teacher.vocab_size)
    student = TokenBytes.from_tokenizer(student_tokenizer)
    vocab_map = VocabMap.build(teacher, student)
    retok = Retokenizer(teacher_tokenizer, student_tokenizer, teacher, m.capture.system_prompt)
    table = cache.samples.slice(0, max_samples).select(["sample_id", "prompt", "prompt_tokens"]).to_pylist()
    positions = aligned = mapped = 0
    mass = 0.0
    for row in table:
        view = cache.sample_view(row["sample_id"])
        t_ids = view["tokens"].astype(np.int64)
        scored = (view["ids"] >= 0).any(-1)                                   # rows with teacher entries
        s_ids = np.asarray(retok.student_ids(t_ids, row["prompt"], int(row["prompt_tokens"])), np.int64)
        t_text, t_ends = teacher.join(t_ids)
        s_text, s_ends = student.join(s_ids)
        al = align_tokens(t_text, t_ends, s_text, s_ends)
        row_, cover = al.row[:len(s_ids) - 1], al.cover[:len(s_ids) - 1]
        ce = (cover >= 0) & scored[np.maximum(cover, 0)]
        kd = ce & (row_ >= 0) & scored[np.maximum(row_, 0)]
        ids, probs = view["ids"][row_[kd]], view["probs"][row_[kd]]
        ok = vocab_map.map_ids(ids) >= 0
        positions, aligned = positions + int(ce.sum()), aligned + int(kd.sum())
        mapped += int(ok.any(-1).sum())
        mass += float(np.where(ok, probs, 0.0).sum())
    return {"samples": len(table), "student_positions": positions, "aligned": aligned,
            "aligned_share": aligned / positions if positions else 0.0, "mapped": mapped,
            "mapped_mass": mass / aligned if aligned else 0.0, "vocab_mapped_share": vocab_map.mapped_share}
