"""The slots of vLLM's logprob entries that logitcache's worker hook (``vllm_worker``) fills: which
quantity goes in which column, shared by the hook and the backend that reads them. Imports nothing of
vLLM, so the backend can plan before vLLM loads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENTROPY_TOKEN_ID = -1
UNKEYED = -9                      # a draw slot of a row whose request / position the hook could not find
SUPPORTED_VLLM = ("0.32",)


# ---- the layout of the slots (shared by the backend and the hook) -----------------------------------
@dataclass(frozen=True)
class Column:
    """Slots ``start .. start + width`` of the logprob entries after the top-k: ``kind`` "value" (the
    value carries the number, the id is ``sentinel``) or "ids" (the ids carry the numbers)."""

    name: str
    start: int
    width: int
    kind: str
    sentinel: int = 0


@dataclass(frozen=True)
class SlotPlan:
    """What the hook computes for every row, and where it puts it.

    ``top_k``: the encoding's top-k candidates (vLLM's own entries); ``encoding``: the encoding's
    config (None: top-k and entropy only); ``columns``: the slots after the top-k (entropy first);
    ``keyed``: rows need their (draw key, position) (draws); ``full``: whole rows through the side
    channel. vLLM is asked for ``num_logprobs`` = top_k + slots entries per position.
    """

    top_k: int
    vocab_size: int
    encoding: dict | None
    columns: tuple[Column, ...]
    keyed: bool
    full: bool

    @property
    def slots(self) -> int:
        return sum(c.width for c in self.columns)

    @property
    def num_logprobs(self) -> int:
        return self.top_k + self.slots


def slot_plan(encoding, top_k: int, vocab_size: int) -> SlotPlan:
    """The plan for ``encoding`` (an ``Encoding`` or None) at ``top_k`` over ``vocab_size`` ids."""
    from .distribution import needs_keys

    columns, start = [Column("entropy", 0, 1, "value", ENTROPY_TOKEN_ID)], 1
    full = False
    extras = encoding.extras(top_k, vocab_size) if encoding is not None else []
    for e in extras:
        if e.row_shape == (vocab_size,):
            full = True                                            # every value: the side channel
            continue
        width = int(np.prod(e.row_shape)) if e.row_shape else 1
        ids = e.dtype.startswith("int") and e.row_shape != ()
        columns.append(Column(e.name, start, width, "ids" if ids else "value", 0 if ids else -2 - len(columns)))
        start += width
    k = top_k if encoding is None or encoding.reads_top_k else 0
    return SlotPlan(k, vocab_size, encoding.to_dict() if encoding is not None else None, tuple(columns),
                    needs_keys(encoding), full)
