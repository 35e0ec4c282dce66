"""The one interface every teacher engine implements (``hf``: transformers; ``vllm``).

The capture loop tokenises, plans shards and writes; a backend only turns token sequences into
per-position statistics. Tokenisation stays outside so that two engines read identical ids. What a
backend computes beyond the top-k is what the cache's encoding declares (``Encoding.extras``); it
comes back typed, in ``DeviceExtras``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np

from ..format.encodings import Encoding, ExtraSpec
from ..format.manifest import TeacherInfo


@dataclass
class SequenceRequest:
    """One sequence to capture.

    ``response_ids`` None means: generate a response (at most ``max_new_tokens``). Rows from
    ``score_from`` to the second-to-last position get their next-token distribution stored.
    ``draw_key``: the key of this sample's random draws (``distribution.row_keys``), an int63.
    """

    prompt_ids: list[int]
    response_ids: list[int] | None
    score_from: int
    max_new_tokens: int = 0
    draw_key: int = 0


@dataclass
class GenerationSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    eos_token_ids: list[int]


class DeviceExtras(Mapping[str, np.ndarray]):
    """The device extras of one sequence: exactly the arrays its encoding declares (``ExtraSpec``), each
    (n, *row_shape) of the declared dtype, holding the declared fill outside the scored rows. Set rows
    with ``put``; an array the encoding does not declare, or of another shape, is refused."""

    def __init__(self, specs: list[ExtraSpec], n: int):
        self.specs = {e.name: e for e in specs}
        self._values = {e.name: np.full((n, *e.row_shape), e.fill, dtype=e.dtype) for e in specs}

    def put(self, name: str, rows, values: np.ndarray) -> None:
        if name not in self.specs:
            raise KeyError(f"the encoding declares no device extra {name!r} (it declares {', '.join(self.specs)})")
        self._values[name][rows] = values

    def __getitem__(self, name: str) -> np.ndarray:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@dataclass
class CapturedSequence:
    """Per-position results, one row per token (fill values outside the scored rows).

    Shapes: tokens (n,), topk_ids (n, k), topk_logprobs (n, k), entropy (n,), target_logprob (n,),
    hidden[layer] (n, d); ``extras``: the encoding's device extras; ``attention``: per array name
    (``attn/<block>_q`` / ``k``, format 1.5) (n, heads, head_dim) post-rotary queries / keys.
    """

    tokens: np.ndarray
    prompt_len: int
    score_from: int
    score_to: int
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    entropy: np.ndarray
    target_logprob: np.ndarray
    hidden: dict[int, np.ndarray] = field(default_factory=dict)
    finish_reason: str = "scored"
    extras: DeviceExtras = field(default_factory=lambda: DeviceExtras([], 0))
    attention: dict[str, np.ndarray] = field(default_factory=dict)


ProgressFn = Callable[[int], None]


class TeacherBackend(Protocol):
    name: str

    def teacher_info(self) -> TeacherInfo:
        """Identity and shape of the loaded teacher (goes into the manifest)."""

    def run(self, requests: list[SequenceRequest], top_k: int, hidden_layers: list[int],
            generation: GenerationSettings | None, progress: ProgressFn | None = None,
            encoding: Encoding | None = None, attention_layers: list[int] = ()) -> list[CapturedSequence]:
        """Generate where asked, then capture every request; results in request order. ``attention_layers``:
        decoder blocks whose queries and keys to capture (a backend that cannot must refuse). ``encoding``: the
        cache's encoding, whose declared extras the backend computes (random draws keyed by each
        request's ``draw_key`` and the row's position: ``distribution.row_keys``); a backend that cannot
        compute them must refuse it."""

    def close(self) -> None:
        """Free the engine (GPU memory, worker processes)."""
