from __future__ import annotations

import numpy as np

from logitcache.align import TokenBytes, VocabMap

from .conftest import byte_level_tokenizer


def test_identical_tokenizers_map_every_id_to_itself(smollm2_dir):
    from transformers import AutoTokenizer

    table = TokenBytes.from_tokenizer(AutoTokenizer.from_pretrained(smollm2_dir))
    vm = VocabMap.build(table, table)
    assert np.array_equal(vm.to_student, np.arange(len(table)))
    assert vm.mapped_share == 1.0 and vm.teacher_digest == vm.student_digest


def test_equal_strings_map_across_conventions(sp_tokenizer, tmp_path):
    bl = byte_level_tokenizer(["the cat sat on the mat", "the cats"], vocab_size=280)
    t, s = TokenBytes.from_tokenizer(bl), TokenBytes.from_tokenizer(sp_tokenizer)
    vm = VocabMap.build(t, s)
    for i in range(len(t)):
        j = int(vm.to_student[i])
        if j >= 0:
            assert s.piece(j) == t.piece(i) and t.piece(i)
        else:
            assert t.piece(i) not in {s.piece(x) for x in range(len(s))}
    # "Ġcat" (byte-level) is "▁cat" (sentencepiece): both are b" cat"
    assert vm.to_student[bl.convert_tokens_to_ids("Ġcat")] == sp_tokenizer.convert_tokens_to_ids("▁cat")
    mapped = vm.to_student[vm.to_student >= 0]
    assert len(np.unique(mapped)) == len(mapped)                      # injective
    assert vm.map_ids(np.array([[-1, bl.convert_tokens_to_ids("Ġcat")]])).tolist() == \
        [[-1, sp_tokenizer.convert_tokens_to_ids("▁cat")]]
    vm.save(tmp_path / "m.npz")
    back = VocabMap.load(tmp_path / "m.npz")
    assert np.array_equal(back.to_student, vm.to_student) and back.student_digest == vm.student_digest


def test_two_teacher_ids_with_the_same_bytes_map_once():
    t = TokenBytes([b"a", b"b", b"a", b""], "plain")
    s = TokenBytes([b"", b"a", b"b"], "plain")
    assert VocabMap.build(t, s).to_student.tolist() == [1, 2, -1, -1]
