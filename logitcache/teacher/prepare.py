"""Input rows -> token sequences to capture (chat template, context limit, skips with reasons).

Kept apart from every backend so that all engines read exactly the same token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np

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
    # 1.4, token-id inputs with ``behaviour_logprobs``: (len(request.response_ids),) float32, the sampling
    # policy's log-probability of each kept response token; None otherwise
    behaviour: np.ndarray | None = None


class Tokenize:
    """The tokenizer calls a capture needs, in one place."""

    def __init__(self, tokenizer, system_prompt: str | None):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    @cached_property
    def vocab_size(self) -> int:
        """Entries of the tokenizer's vocabulary, added tokens included: token ids must be below it."""
        return len(self.tok)

    def text(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        """Text of token ids as the samples table records it (special tokens kept, as generate mode)."""
        return self.tok.decode(ids, skip_special_tokens=False)

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


# behaviour log-probabilities above this are not log-probabilities (a little above 0: rounding)
MAX_LOGPROB = 1e-6


def _as_array(value) -> np.ndarray:
    """``value`` as one numpy array (one conversion, no Python loop); nested lists of different lengths,
    which numpy refuses, as an object array (refused by its dtype by the callers)."""
    if not len(value):
        return np.zeros(0, np.int64)
    try:
        return np.asarray(value)
    except ValueError:
        return np.asarray([None], dtype=object)


def _first_not(value, kinds) -> str:
    """For an error message only: the first element of ``value`` that is not one of ``kinds`` (bools
    are not numbers here), shortened."""
    for v in value:
        if not isinstance(v, kinds) or isinstance(v, (bool, np.bool_)):
            return repr(v)[:40]
    return "an int beyond 64 bits"


def _token_ids(value, role: str, where: str, vocab_size: int | None) -> list[int]:
    """A list of token ids, checked as a whole (numpy, not per token): ints in [0, vocab_size). Whole
    floats count as ints: one row's 9.5 makes a JSON file's whole column floats, and the rows whose
    ids are whole must not be blamed for it."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise InputError(f"{where}: {role} must be a list of token ids (ints), got {type(value).__name__}")
    ids = _as_array(value)
    if ids.ndim == 1 and ids.dtype.kind == "f":
        whole = np.isfinite(ids) & (ids == np.floor(ids))
        if not whole.all():
            i = int(np.argmin(whole))
            raise InputError(f"{where}: {role}[{i}] = {float(ids[i])!r} is not a token id (an int)")
        ids = ids.astype(np.int64)
        value = ids
    if ids.ndim != 1 or ids.dtype.kind not in "iu":   # bools, strings, nulls, nested lists, ints beyond 64 bits
        raise InputError(f"{where}: {role} must be a list of token ids (ints); it holds "
                         f"{_first_not(value, (int, np.integer))}")
    out = (ids < 0) | (ids >= vocab_size) if vocab_size is not None else ids < 0
    if out.any():
        i = int(np.argmax(out))
        where_ok = f"the tokenizer's vocabulary [0, {vocab_size})" if vocab_size is not None else "ids >= 0"
        raise InputError(f"{where}: {role}[{i}] = {int(ids[i])} is outside {where_ok}")
    return ids.tolist() if isinstance(value, np.ndarray) else list(value)


def _behaviour(value, n: int, where: str) -> np.ndarray:
    """(n,) float32 behaviour log-probabilities, one per response token: finite and <= MAX_LOGPROB."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise InputError(f"{where}: behaviour_logprobs must be a list of floats, got {type(value).__name__}")
    lp = _as_array(value)
    if lp.ndim != 1 or lp.dtype.kind not in "fiu":    # nulls, bools, strings, nested lists
        raise InputError(f"{where}: behaviour_logprobs must be a list of floats; it holds "
                         f"{_first_not(value, (int, float, np.number))}")
    lp = lp.astype(np.float64)
    if len(lp) != n:
        raise InputError(f"{where}: behaviour_logprobs has {len(lp)} values for {n} response_ids (one per "
                         "response token)")
    bad = ~np.isfinite(lp) | (lp > MAX_LOGPROB)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"{where}: behaviour_logprobs[{i}] = {float(lp[i])!r} is not a log-probability "
                         f"(finite and <= {MAX_LOGPROB:g})")
    return lp.astype(np.float32)


@dataclass
class ParsedRow:
    """One input row read for its role: the conversation to send (None for plain text), the texts the
    samples table records, or why the row is skipped; for token-id rows (1.4) the ids themselves and
    the behaviour log-probabilities ((len(response_ids),) float32, or None)."""

    messages: list[dict] | None = None
    prompt_text: str | None = None
    response_text: str | None = None
    skip: str = ""
    prompt_ids: list[int] | None = None
    response_ids: list[int] | None = None
    behaviour: np.ndarray | None = None


def parse_row(values: dict, mode: str, where: str, vocab_size: int | None = None) -> ParsedRow:
    """Check one row (``InputError`` naming ``where`` when it cannot be captured) without tokenizing.
    ``vocab_size``: the tokenizer's, when known, to range-check token ids."""
    if "response_ids" in values:            # score mode, token ids used verbatim (1.4)
        prompt_ids = _token_ids(values.get("prompt_ids", []), "prompt_ids", where, vocab_size)
        response_ids = _token_ids(values["response_ids"], "response_ids", where, vocab_size)
        if not response_ids:
            raise InputError(f"{where}: response_ids is empty: score mode needs at least one response token")
        behaviour = (_behaviour(values["behaviour_logprobs"], len(response_ids), where)
                     if "behaviour_logprobs" in values else None)
        return ParsedRow(prompt_ids=prompt_ids, response_ids=response_ids, behaviour=behaviour)
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


def validate_rows(table, source: str, mode: str, batch_rows: int = 1 << 16, vocab_size: int | None = None) -> None:
    """Check every row a capture will read before anything is captured, so a malformed row 8 is
    reported before shard 0 is written. Text columns (Arrow strings) need no look; token-id columns of
    list-of-number types are checked column-wise (``bad_id_rows``) and only a flagged row is parsed, for
    its message; other columns (chat messages, values of mixed kinds) are parsed row by row,
    ``batch_rows`` at a time. ``vocab_size``: the tokenizer's, to range-check token ids."""
    import pyarrow as pa

    bad = bad_id_rows(table, vocab_size) if "response_ids" in table.column_names else None
    if bad is not None:
        for row in np.flatnonzero(bad)[:1].tolist():   # raises with the row's own message
            parse_row(table.slice(row, 1).to_pylist()[0], mode, f"{source}, row {row}", vocab_size)
        return
    if "response_ids" not in table.column_names and all(
            pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_null(f.type)
            for f in table.schema):
        return
    for start in range(0, table.num_rows, batch_rows):
        for offset, values in enumerate(table.slice(start, batch_rows).to_pylist()):
            parse_row(values, mode, f"{source}, row {start + offset}", vocab_size)


def bad_id_rows(table, vocab_size: int | None) -> np.ndarray | None:
    """(num_rows,) bool: rows of a token-id table (``prompt_ids``, ``response_ids``, optional
    ``behaviour_logprobs``) that ``parse_row`` would refuse, found with Arrow / numpy over whole columns
    (no Python loop per token). None when a column is not a list of numbers (text, all null, nested
    lists): then only the row-by-row parse can tell which row is wrong, and say why."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def lists(name: str, kinds) -> tuple[np.ndarray, np.ndarray, pa.Array] | None:
        col = table.column(name)
        t = col.type
        if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and any(k(t.value_type) for k in kinds)):
            return None
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        lengths = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False)   # (rows,), -1 = null
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)              # (values,) row of each
        return lengths, parents, pc.list_flatten(arr)

    n = table.num_rows
    bad = np.zeros(n, dtype=bool)
    response_lengths = None
    for role in ("prompt_ids", "response_ids"):
        if role not in table.column_names:
            continue
        got = lists(role, (pa.types.is_integer, pa.types.is_floating, pa.types.is_null))  # list<null>: empty lists
        if got is None:
            return None
        lengths, parents, values = got
        if pa.types.is_floating(values.type):   # whole floats are ids (see _token_ids); others, NaN, nulls are not
            ids = values.cast(pa.float64()).fill_null(float("nan")).to_numpy(zero_copy_only=False)   # (values,)
            out = ~(np.isfinite(ids) & (ids == np.floor(ids)))
        else:
            ids = values.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)      # (values,) int64
            out = np.zeros(len(ids), dtype=bool)
        out |= (ids < 0) | (ids >= vocab_size) if vocab_size is not None else ids < 0
        bad[parents[out]] = True
        bad |= lengths < 0
        if role == "response_ids":
            bad |= lengths == 0
            response_lengths = lengths
    if "behaviour_logprobs" in table.column_names:
        got = lists("behaviour_logprobs", (pa.types.is_floating, pa.types.is_integer, pa.types.is_null))
        if got is None:
            return None
        lengths, parents, values = got
        lp = values.cast(pa.float64()).fill_null(float("nan")).to_numpy(zero_copy_only=False)   # (values,)
        bad[parents[~np.isfinite(lp) | (lp > MAX_LOGPROB)]] = True
        bad |= lengths != response_lengths
    return bad


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

        parsed = parse_row(values, cfg.mode, where, tk.vocab_size)
        if parsed.skip:
            skip(parsed.skip)
            continue
        msgs, prompt_text, response_text = parsed.messages, parsed.prompt_text, parsed.response_text
        behaviour = parsed.behaviour

        if parsed.response_ids is not None:    # token ids (1.4), verbatim
            prompt_ids, response_ids = parsed.prompt_ids, parsed.response_ids
        elif msgs is None:                     # plain text, score mode
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
                behaviour = behaviour[:keep] if behaviour is not None else None
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

        if parsed.response_ids is not None:    # the samples table records the text of the stored ids
            prompt_text = tk.decode(prompt_ids) if prompt_ids else None
            response_text = tk.decode(response_ids)
        score_from = 0 if (cfg.with_prompt or not prompt_ids) else len(prompt_ids) - 1
        for s, sid in enumerate(ids):
            req = SequenceRequest(prompt_ids, response_ids, score_from, max_new)
            out.append(PreparedSample(row, s, sid, req, prompt_text, response_text, truncated, behaviour))
    return out, skipped
