"""Input rows -> token sequences to capture (chat template, context limit, skips with reasons).

Kept apart from every backend so that all engines read exactly the same token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..format.errors import InputError
from ..format.manifest import CaptureConfig, SkipRecord
from ..format.samples import sample_id
from .backend import SequenceRequest


@dataclass
class PreparedSample:
    row: int
    sample_index: int
    sample_id: str
    request: SequenceRequest
    prompt_text: str | None
    response_text: str | None
    truncated: bool = False


class Tokenize:
    """The tokenizer calls a capture needs, in one place."""

    def __init__(self, tokenizer, system_prompt: str | None):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def text(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt is not None and not (messages and messages[0].get("role") == "system"):
            return [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation followed by the assistant turn's opening."""
        if not self.has_template:  # base models: the user text as is
            return self.text("\n".join(m["content"] for m in messages))
        rendered = self.tok.apply_chat_template(self._with_system(messages), add_generation_prompt=True, tokenize=False)
        return list(self.tok(rendered, add_special_tokens=False)["input_ids"])

    def chat_response(self, messages: list[dict], prompt_ids: list[int], response: str) -> list[int]:
        """Token ids of ``response`` as the assistant turn after ``messages``, end-of-turn included."""
        if self.has_template:
            full = self.tok.apply_chat_template(
                self._with_system(messages + [{"role": "assistant", "content": response}]), tokenize=False)
            full_ids = list(self.tok(full, add_special_tokens=False)["input_ids"])
            if full_ids[:len(prompt_ids)] == prompt_ids:
                return full_ids[len(prompt_ids):]
        ids = list(self.tok(response, add_special_tokens=False)["input_ids"])
        return ids + ([self.tok.eos_token_id] if self.tok.eos_token_id is not None else [])


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(f"{where}: messages must be a list of {{role, content}} (or its JSON)") from None
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                              and isinstance(m.get("role"), str) for m in value):
        raise InputError(f"{where}: messages must be a list of {{role, content}} objects with string values")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(value, role: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: column for {role} holds {type(value).__name__}, expected text")
    return value


@dataclass
class ParsedRow:
    """One input row read for its role: the conversation to send (None for plain text), the texts the
    samples table records, or why the row is skipped."""

    messages: list[dict] | None = None
    prompt_text: str | None = None
    response_text: str | None = None
    skip: str = ""


def parse_row(values: dict, mode: str, where: str) -> ParsedRow:
    """Check one row (``InputError`` naming ``where`` when it cannot be captured) without tokenizing."""
    if "messages" in values:
        msgs = _messages(values["messages"], where)
        response_text = None
        if mode == "score":
            if not msgs or msgs[-1]["role"] != "assistant":
                raise InputError(f"{where}: score mode needs the conversation to end with an assistant message")
            msgs, response_text = msgs[:-1], msgs[-1]["content"]
        prompt_text = json.dumps(msgs, ensure_ascii=False)
        if not any(m["content"].strip() for m in msgs):
            return ParsedRow(skip="empty messages")
        return ParsedRow(msgs, prompt_text, response_text)
    if "text" in values:
        text = _text(values["text"], "text", where)
        if not text or not text.strip():
            return ParsedRow(skip="empty text")
        return ParsedRow(None, None, text)
    prompt_text = _text(values["prompt"], "prompt", where)
    if not prompt_text or not prompt_text.strip():
        return ParsedRow(skip="empty prompt")
    response_text = None
    if mode == "score":
        response_text = _text(values["response"], "response", where)
        if not response_text or not response_text.strip():
            return ParsedRow(skip="empty response")
    return ParsedRow([{"role": "user", "content": prompt_text}], prompt_text, response_text)


def validate_rows(table, source: str, mode: str, batch_rows: int = 1 << 16) -> None:
    """Check every row a capture will read before anything is captured, so a malformed row 8 is
    reported before shard 0 is written. Text columns (Arrow strings) need no look; other columns
    (chat messages, values of mixed kinds) are parsed row by row, ``batch_rows`` at a time."""
    import pyarrow as pa

    if all(pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_null(f.type)
           for f in table.schema):
        return
    for start in range(0, table.num_rows, batch_rows):
        for offset, values in enumerate(table.slice(start, batch_rows).to_pylist()):
            parse_row(values, mode, f"{source}, row {start + offset}")


def prepare_rows(rows: list[dict], first_row: int, input_key: str, source: str, source_name: str, split: str,
                 cfg: CaptureConfig, tk: Tokenize) -> tuple[list[PreparedSample], list[SkipRecord]]:
    out: list[PreparedSample] = []
    skipped: list[SkipRecord] = []
    n_samples = cfg.num_samples if cfg.mode == "generate" else 1
    for offset, values in enumerate(rows):
        row = first_row + offset
        where = f"{source}, row {row}"
        ids = [sample_id(source_name, split, row, s) for s in range(n_samples)]

        def skip(reason: str) -> None:
            skipped.extend(SkipRecord(input_key, row, sid, reason) for sid in ids)

        parsed = parse_row(values, cfg.mode, where)
        if parsed.skip:
            skip(parsed.skip)
            continue
        msgs, prompt_text, response_text = parsed.messages, parsed.prompt_text, parsed.response_text

        if msgs is None:                       # plain text, score mode
            prompt_ids, response_ids = [], tk.text(response_text)
        else:
            prompt_ids = tk.chat_prompt(msgs)
            response_ids = tk.chat_response(msgs, prompt_ids, response_text) if cfg.mode == "score" else None

        truncated = False
        if cfg.mode == "score":
            total = len(prompt_ids) + len(response_ids)
            if total > cfg.max_length:
                if not cfg.truncate:
                    skip(f"longer than the context ({total} > {cfg.max_length} tokens)")
                    continue
                keep = cfg.max_length - len(prompt_ids)
                if keep < 1:
                    skip(f"prompt alone fills the context ({len(prompt_ids)} >= {cfg.max_length} tokens)")
                    continue
                response_ids, truncated = response_ids[:keep], True
            max_new = 0
        else:
            room = cfg.max_length - len(prompt_ids)
            if room < 1:
                if not cfg.truncate:
                    skip(f"prompt longer than the context ({len(prompt_ids)} >= {cfg.max_length} tokens)")
                    continue
                prompt_ids, truncated = prompt_ids[:max(cfg.max_length - cfg.max_new_tokens, 1)], True
                room = cfg.max_length - len(prompt_ids)
            max_new = min(cfg.max_new_tokens, room)

        score_from = 0 if (cfg.with_prompt or not prompt_ids) else len(prompt_ids) - 1
        for s, sid in enumerate(ids):
            req = SequenceRequest(prompt_ids, response_ids, score_from, max_new)
            out.append(PreparedSample(row, s, sid, req, prompt_text, response_text, truncated))
    return out, skipped
