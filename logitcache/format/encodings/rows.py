"""Decoded distributions, as typed rows: what every encoding's ``decode`` returns.

``SparseRows`` (topk, adaptive, compact, full: ids + float32 log-probs in rank order + the exact
tail or None), ``SampledRows`` (sampled: ids + draw counts [+ importance log-weights]) and
``TargetRows`` (ids + target weights that estimate p without bias: hybrid, or
``SampledRows.to_targets()``). All hold N tokens' ragged rows laid end to end, have ``rows(a, b)``
for a token range and ``padded(width)`` for (N, width) arrays. A drawn example, three tokens with
2, 0 and 3 entries:

    counts  = [2, 0, 3]                  offsets = [0, 2, 2, 5]
    ids     = [17, 4 | | 9, 12, 40]      padded(4): [[17,  4, -1, -1],
                                                     [-1, -1, -1, -1],
                                                     [ 9, 12, 40, -1]]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EncodingError


def offsets(counts: np.ndarray) -> np.ndarray:
    """(N + 1,) int64: row i's entries are [o[i], o[i + 1])."""
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def pad(counts: np.ndarray, width: int | None, *flat_and_fill):
    """Ragged rows (``counts`` entries each) -> (N, W) arrays, one per ``(flat, fill, dtype)``."""
    counts = counts.astype(np.int64)
    w = int(counts.max(initial=0)) if width is None else int(width)
    if w < int(counts.max(initial=0)):
        raise EncodingError(f"width={w} is smaller than the longest row ({int(counts.max())} entries)")
    w = max(w, 1)
    n = len(counts)
    mask = np.arange(w)[None, :] < counts[:, None]
    outs = []
    for flat, fill, dtype in flat_and_fill:
        out = np.full((n, w), fill, dtype=dtype)
        out[mask] = flat
        outs.append(out)
    return outs, mask


class RaggedRows:
    """What every decoded-row type shares: N tokens with ``counts`` (N,) entries each, laid end to end."""

    counts: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.counts)

    @property
    def offsets(self) -> np.ndarray:
        return offsets(self.counts)


@dataclass(frozen=True)
class SparseRows(RaggedRows):
    """Decoded top-k / adaptive / compact / full rows. ``ids`` (M,) int64 and ``logprobs`` (M,) float32
    are the rows laid end to end, each in rank order (descending log-prob); ``counts`` (N,) int64
    entries per token; ``tail`` (N,) float32 exact mass outside the row's ids, or None (derive it)."""

    ids: np.ndarray
    logprobs: np.ndarray
    counts: np.ndarray
    tail: np.ndarray | None

    def tail_mass(self) -> np.ndarray:
        """The stored tail, or 1 - sum exp(logprobs) per token (clamped at 0), float64."""
        if self.tail is not None:
            return self.tail.astype(np.float64)
        s = np.zeros(self.num_tokens)
        np.add.at(s, np.repeat(np.arange(self.num_tokens), self.counts), np.exp(self.logprobs.astype(np.float64)))
        return np.clip(1.0 - s, 0.0, None)

    def padded(self, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N, W) int64 with -1 in padding, logprobs (N, W) float32 with -inf in padding);
        W = the longest row (at least 1) unless given."""
        (ids, lp), _ = pad(self.counts, width, (self.ids, -1, np.int64), (self.logprobs, -np.inf, np.float32))
        return ids, lp

    def rows(self, start: int, stop: int) -> "SparseRows":
        """Tokens [start, stop) as their own SparseRows."""
        off = self.offsets
        a, b = off[start], off[stop]
        return SparseRows(self.ids[a:b], self.logprobs[a:b], self.counts[start:stop],
                          None if self.tail is None else self.tail[start:stop])


@dataclass(frozen=True)
class SampledRows(RaggedRows):
    """Decoded sampled rows: per token the unique drawn ids (ascending) ``ids`` (M,) int64, how many of
    the token's n draws hit each ``draw_counts`` (M,) int64, ``counts`` (N,) int64 unique ids per token,
    ``log_weights`` (M,) float64 importance log-weights log(p/r) (None: proposal T=1, all weights 1)."""

    ids: np.ndarray
    draw_counts: np.ndarray
    counts: np.ndarray
    log_weights: np.ndarray | None
    temperature: float

    @property
    def n_draws(self) -> np.ndarray:
        """(N,) draws per token (the per-token sum of draw counts)."""
        s = np.zeros(self.num_tokens, dtype=np.int64)
        np.add.at(s, np.repeat(np.arange(self.num_tokens), self.counts), self.draw_counts)
        return s

    def targets(self) -> np.ndarray:
        """(M,) float64 unbiased estimates of the teacher probabilities p_i: draw count * w / n_draws."""
        n = np.repeat(self.n_draws, self.counts).astype(np.float64)
        w = 1.0 if self.log_weights is None else np.exp(self.log_weights)
        return self.draw_counts * w / n

    def padded(self, width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (N, W) int64, -1 pad; draw counts (N, W) int64, 0 pad; log_weights (N, W) float64, 0 pad)."""
        lw = np.zeros(len(self.ids)) if self.log_weights is None else self.log_weights
        (ids, c, w), _ = pad(self.counts, width, (self.ids, -1, np.int64), (self.draw_counts, 0, np.int64),
                             (lw, 0.0, np.float64))
        return ids, c, w

    def rows(self, start: int, stop: int) -> "SampledRows":
        off = self.offsets
        a, b = off[start], off[stop]
        return SampledRows(self.ids[a:b], self.draw_counts[a:b], self.counts[start:stop],
                           None if self.log_weights is None else self.log_weights[a:b], self.temperature)

    def to_targets(self) -> "TargetRows":
        return TargetRows(self.ids, self.targets(), self.counts)


@dataclass(frozen=True)
class TargetRows(RaggedRows):
    """Decoded rows as ids with target weights: ``targets`` (M,) float64 are unbiased estimates of the
    teacher's p on ``ids`` (M,) int64 (the full-vocabulary CE is estimated by -sum targets * log q);
    ``counts`` (N,) int64 entries per token. Made by the hybrid encoding and ``SampledRows.to_targets``."""

    ids: np.ndarray
    targets: np.ndarray
    counts: np.ndarray

    def padded(self, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N, W) int64, -1 pad; targets (N, W) float64, 0 pad)."""
        (ids, t), _ = pad(self.counts, width, (self.ids, -1, np.int64), (self.targets, 0.0, np.float64))
        return ids, t

    def rows(self, start: int, stop: int) -> "TargetRows":
        off = self.offsets
        a, b = off[start], off[stop]
        return TargetRows(self.ids[a:b], self.targets[a:b], self.counts[start:stop])


def as_targets(rows: "SparseRows | SampledRows | TargetRows") -> "SparseRows | TargetRows":
    """The rows a loss trains on: exact sparse rows as they are, sampled rows as their target weights."""
    return rows.to_targets() if isinstance(rows, SampledRows) else rows
