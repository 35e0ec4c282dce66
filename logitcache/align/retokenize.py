"""A cached sample in another tokenizer's tokens: the same text, and for chat samples the same
conversation under that tokenizer's own chat template."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..format.errors import LogitcacheError
from .token_bytes import TokenBytes


def load_tokenizer(where: str, flag: str, vocab_sha256: str | None = None):
    """A Hugging Face tokenizer from ``where``, or a one-line error naming ``flag``; with ``vocab_sha256``
    (a cache's ``tokenizer.vocab_sha256``) it must be the tokenizer that wrote that cache."""
    from transformers import AutoTokenizer

    from ..format.fingerprint import vocab_sha256 as digest

    try:
        tok = AutoTokenizer.from_pretrained(where)
    except Exception as e:
        raise LogitcacheError(f"{flag} {where}: could not load a tokenizer ({type(e).__name__}: {e})") from None
    if vocab_sha256 is not None and digest(tok) != vocab_sha256:
        raise LogitcacheError(f"{flag} {where}: not the tokenizer the cache was written with (vocab_sha256 "
                              f"{digest(tok)[:12]}... != {vocab_sha256[:12]}...)")
    return tok


def messages_of(prompt: str | None) -> list[dict] | None:
    """The conversation a samples-table ``prompt`` holds: chat messages as JSON, or a prompt text (one
    user message); None for plain text."""
    if prompt is None:
        return None
    try:
        value = json.loads(prompt)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return [{"role": "user", "content": prompt}]


class Retokenizer:
    """The student's tokens of a sample whose teacher tokens are known.

    - Plain text (no prompt tokens, or a prompt the teacher took verbatim): the teacher's text, its
      special tokens left out, tokenized by the student with its own special tokens.
    - Chat (the prompt was rendered with the teacher's template): the stored messages (plus
      ``system_prompt`` where they have none) and the teacher's response up to its first special token
      (its end of turn) as the assistant turn, rendered with the student's template.
    """

    def __init__(self, teacher_tokenizer, student_tokenizer, teacher: TokenBytes, system_prompt: str | None = None):
        self.teacher = teacher
        self.student = student_tokenizer
        self.system_prompt = system_prompt
        special = np.zeros(len(teacher), bool)
        special[[i for i in teacher_tokenizer.all_special_ids if 0 <= i < len(special)]] = True
        self._special = special
        self._has_template = bool(getattr(student_tokenizer, "chat_template", None))

    def fingerprint(self) -> str:
        """sha256 of everything ``student_ids`` depends on besides the sample: the teacher's byte table and
        special ids, the student tokenizer (its whole definition for a fast tokenizer: normalizer,
        pre-tokenizer, merges, added tokens, post-processor; its class and vocabulary otherwise), its chat
        template and the system prompt. Equal fingerprints, equal student ids for every sample."""
        h = hashlib.sha256(self.teacher.offsets.tobytes())
        h.update(self.teacher.buffer.tobytes())
        h.update(np.packbits(self._special).tobytes())
        backend = getattr(self.student, "backend_tokenizer", None)
        parts = [type(self.student).__name__, backend.to_str() if backend is not None else "",
                 sorted(self.student.get_vocab().items(), key=lambda kv: kv[1]),
                 sorted(map(str, self.student.all_special_tokens)), getattr(self.student, "chat_template", None),
                 self.system_prompt]
        h.update(json.dumps(parts, ensure_ascii=False, default=str).encode())
        return h.hexdigest()

    def _is_special(self, ids: np.ndarray) -> np.ndarray:
        return self._special[np.clip(ids, 0, len(self._special) - 1)]

    def plain_text(self, ids: np.ndarray) -> str:
        """The text of teacher tokens without the teacher's special tokens."""
        text, _ = self.teacher.join(ids[~self._is_special(ids)])
        return text.decode("utf-8", errors="replace")

    def student_ids(self, teacher_ids: np.ndarray, prompt: str | None, prompt_tokens: int) -> list[int]:
        """teacher_ids: the sample's teacher tokens (possibly cut); prompt, prompt_tokens: its samples-table
        ``prompt`` and ``prompt_tokens``."""
        teacher_ids = np.asarray(teacher_ids, np.int64)
        messages = messages_of(prompt) if prompt_tokens > 0 else None
        if messages is not None and self._has_template:
            prompt_text, _ = self.teacher.join(teacher_ids[:prompt_tokens])
            if prompt_text.decode("utf-8", errors="replace") != prompt:          # the teacher's template
                if self.system_prompt is not None and messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": self.system_prompt}] + messages
                response = teacher_ids[prompt_tokens:]
                ends = np.flatnonzero(self._is_special(response))
                if len(ends):                  # the teacher's end of turn and what its template puts after it
                    response = response[:ends[0]]
                turn = {"role": "assistant", "content": self.plain_text(response)}
                text = self.student.apply_chat_template(messages + [turn], tokenize=False)
                return list(self.student(text, add_special_tokens=False)["input_ids"])
        return list(self.student(self.plain_text(teacher_ids), add_special_tokens=True)["input_ids"])
