"""GKD's mix (arXiv 2306.13649): a fraction lambda of each batch from the student's own samples (an
on-policy round cache), the rest from an ordinary teacher-response cache trained with forward KL:

    loss = lambda * L_on + (1 - lambda) * L_off

each part the token-weighted mean over its own rows (``objective.compute_loss``). The on-policy part
takes round(lambda * B) rows of every micro-batch (at least 1), the off-policy part the other B minus
that. The off-policy rows come from ``OffPolicyRows``: the other cache's batches epoch after epoch,
with a position a checkpoint saves and restores, so a resumed run sees the same rows.
"""

from __future__ import annotations

from typing import Any

from logitcache.format.errors import LogitcacheError

from .data import CacheLoader


def split_batch(batch_size: int, onpolicy_frac: float) -> tuple[int, int]:
    """(rows from the round cache, rows from the off-policy cache) of a micro-batch of ``batch_size``."""
    on = max(1, round(onpolicy_frac * batch_size))
    off = batch_size - on
    if off < 1:
        raise LogitcacheError(f"--onpolicy-frac {onpolicy_frac} of --batch-size {batch_size} leaves no row for "
                              "--offpolicy-cache: lower --onpolicy-frac or raise --batch-size")
    return on, off


class OffPolicyRows:
    """Batches of ``loader`` one after another, starting a new epoch when one ends (an epoch with no
    batch is refused); ``state_dict`` / ``load_state_dict`` save and restore the position."""

    def __init__(self, loader: CacheLoader):
        self.loader, self.epoch, self._batches = loader, 0, None
        self.loader.set_epoch(0)

    def next(self) -> dict:
        for _ in range(2):
            if self._batches is None:
                self._batches = iter(self.loader)
            batch = next(self._batches, None)
            if batch is not None:
                return batch
            self.close()
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
        raise LogitcacheError(f"--offpolicy-cache {self.loader.stream.url}: an epoch gives no batch (too few "
                              "samples for one batch of its rows)")

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "stream": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.epoch = int(state["epoch"])
        self.loader.load_state_dict(state["stream"])
