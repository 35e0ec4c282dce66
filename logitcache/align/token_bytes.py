"""The bytes each token id stands for, so two tokenizers can be compared on the text itself.

A Hugging Face tokenizer writes its tokens in one of two conventions, undone here:

- *byte-level* (GPT-2, Llama 3, Qwen, SmolLM): every byte is written as one printable character
  (``Ġ`` for a space, ``Ċ`` for a newline); the bytes are those characters mapped back;
- *sentencepiece-style* (Llama 2, Mistral, Gemma): ``▁`` is a space and ``<0xNN>`` is the byte NN
  (byte fallback); the rest is UTF-8.

Added tokens (``<|im_end|>``, ``</s>``) stand for their content as UTF-8. Ids past the tokenizer's
length (embedding rows a model pads its vocabulary with) stand for no bytes. The table is one
buffer plus offsets, so the bytes of a token sequence are gathered without a Python loop per token.
"""

from __future__ import annotations

import json
import re

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the others (controls, space,
    some Latin-1) for the characters 256, 257, ... in byte order; inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_kinds(tokenizer) -> set[str]:
    """The ``type`` of every decoder step of a fast tokenizer (``ByteLevel``, ``Metaspace``, ``ByteFallback``,
    ``Replace``...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {s.get("type", "") for s in steps}


class TokenBytes:
    """``buffer`` (uint8) and ``offsets`` ((V + 1,) int64): token ``i`` is ``buffer[offsets[i]:offsets[i + 1]]``."""

    def __init__(self, pieces: list[bytes], convention: str):
        self.convention = convention
        lengths = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.buffer = np.frombuffer(b"".join(pieces), np.uint8)
        self._pieces = pieces

    def __len__(self) -> int:
        return len(self._pieces)

    def piece(self, token_id: int) -> bytes:
        return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int | None = None) -> "TokenBytes":
        """The table of a Hugging Face tokenizer, for ids ``0 .. vocab_size - 1`` (default: its length)."""
        size = len(tokenizer) if vocab_size is None else int(vocab_size)
        kinds = _decoder_kinds(tokenizer)
        byte_level = "ByteLevel" in kinds
        convention = "byte-level" if byte_level else "sentencepiece" if kinds & {"Metaspace", "ByteFallback",
                                                                                  "Replace"} else "plain"
        alphabet = _byte_level_alphabet() if byte_level else None
        added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        names = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
        pieces: list[bytes] = []
        for i, name in enumerate(names):
            if name is None:
                pieces.append(b"")
            elif i in added:
                pieces.append(added[i].encode("utf-8"))
            elif byte_level:
                pieces.append(bytes(alphabet[c] for c in name) if all(c in alphabet for c in name)
                              else name.encode("utf-8"))
            elif (m := _BYTE_FALLBACK.match(name)) and convention == "sentencepiece":
                pieces.append(bytes([int(m.group(1), 16)]))
            elif convention == "sentencepiece":
                pieces.append(name.replace("\u2581", " ").encode("utf-8"))
            else:
                pieces.append(name.encode("utf-8"))
        pieces += [b""] * (size - len(pieces))
        return cls(pieces, convention)

    def join(self, ids: np.ndarray) -> tuple[bytes, np.ndarray]:
        """The bytes of a token sequence and where each token ends in them: ``(text, ends)``, ends (n,)
        int64 exclusive byte offsets. Ids outside the table stand for no bytes."""
        ids = np.asarray(ids, np.int64)
        ok = (ids >= 0) & (ids < len(self))
        safe = np.where(ok, ids, 0)
        lengths = np.where(ok, self.offsets[safe + 1] - self.offsets[safe], 0)
        ends = np.cumsum(lengths)
        starts = np.repeat(self.offsets[safe] - (ends - lengths), lengths)   # buffer index minus text index
        text = self.buffer[starts + np.arange(int(ends[-1]) if len(ends) else 0)].tobytes()
        return text, ends.astype(np.int64)
