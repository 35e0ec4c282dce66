from __future__ import annotations

import numpy as np

from logitcache.align import TokenBytes

from .conftest import byte_level_tokenizer

TEXTS = ["Héllo wörld! 你好 🙂\n\tdef f(x): return x**2", "the cat sat", "  two  spaces\r\n"]


def test_byte_level_tokens_join_to_the_text(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    table = TokenBytes.from_tokenizer(tok)
    assert table.convention == "byte-level" and len(table) == len(tok)
    for s in TEXTS:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        text, ends = table.join(ids)
        assert text == s.encode("utf-8")
        # each token's bytes are the text between its end and the one before
        assert np.array_equal(np.diff(np.concatenate([[0], ends])),
                              [len(table.piece(i)) for i in ids])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert table.piece(im_end) == b"<|im_end|>"                 # an added token stands for its content


def test_sentencepiece_markers_and_byte_fallback(sp_tokenizer):
    table = TokenBytes.from_tokenizer(sp_tokenizer)
    assert table.convention == "sentencepiece"
    ids = sp_tokenizer("the cat é", add_special_tokens=False)["input_ids"]
    tokens = sp_tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["▁the", "▁cat"] and tokens[-2:] == ["<0xC3>", "<0xA9>"]     # é by byte fallback
    text, ends = table.join(ids)
    assert text == " the cat é".encode()                         # the dummy prefix is a real space
    assert ends.tolist() == [4, 8, 9, 10, 11]
    assert table.piece(sp_tokenizer.convert_tokens_to_ids("<0xC3>")) == b"\xc3"
    assert table.piece(sp_tokenizer.convert_tokens_to_ids("</s>")) == b"</s>"


def test_ids_past_the_tokenizer_stand_for_nothing():
    tok = byte_level_tokenizer(["ab ab abc"], vocab_size=270)
    table = TokenBytes.from_tokenizer(tok, vocab_size=len(tok) + 5)
    assert len(table) == len(tok) + 5
    text, ends = table.join(np.array([len(tok) + 1, tok.convert_tokens_to_ids("a"), len(tok) + 4]))
    assert text == b"a" and ends.tolist() == [0, 1, 1]
