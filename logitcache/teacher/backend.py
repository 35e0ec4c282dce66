"""The one interface every teacher engine implements (``hf`` now, ``vllm`` next).

The capture loop tokenises, plans shards and writes; a backend only turns token sequences into
per-position statistics. Tokenisation stays outside so that two engines read identical ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from ..format.manifest import TeacherInfo


@dataclass
class SequenceRequest:
    """One sequence to capture.

    ``response_ids`` None means: generate a response (at most ``max_new_tokens``). Rows from
    ``score_from`` to the second-to-last position get their next-token distribution stored.
    """

    prompt_ids: list[int]
    response_ids: list[int] | None
    score_from: int
    max_new_tokens: int = 0


@dataclass
class GenerationSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    eos_token_ids: list[int]


@dataclass
class CapturedSequence:
    """Per-position results, one row per token (fill values outside the scored rows).

    Shapes: tokens (n,), topk_ids (n, k), topk_logprobs (n, k), entropy (n,), target_logprob (n,),
    hidden[layer] (n, d).
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
    extra: dict[str, np.ndarray] = field(default_factory=dict)   # the encoding's device extras, (n, ...)


ProgressFn = Callable[[int], None]


class TeacherBackend(Protocol):
    name: str

    def teacher_info(self) -> TeacherInfo:
        """Identity and shape of the loaded teacher (goes into the manifest)."""

    def run(self, requests: list[SequenceRequest], top_k: int, hidden_layers: list[int],
            generation: GenerationSettings | None, progress: ProgressFn | None = None,
            dist: dict | None = None) -> list[CapturedSequence]:
        """Generate where asked, then capture every request; results in request order. ``dist``: the
        resolved encoding plus a ``seed`` for its draws; a backend that cannot compute its extras
        (``token_stats.extras_fill``) must refuse it."""

    def close(self) -> None:
        """Free the engine (GPU memory, worker processes)."""
