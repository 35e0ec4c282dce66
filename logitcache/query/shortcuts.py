"""`logitcache select`: the common selections without writing SQL.

Each shortcut is turned into one SQL statement over the engine's views, so a selection file made by
a shortcut records an exact, re-runnable query. Rules (docs/query.md):

- ``top_frac f``: the ``ceil(f x N)`` samples with the largest value, N = samples whose value is not
  null; ``bottom_frac``: the smallest. Ties at the cut are broken by ``sample_id``.
- ``min`` / ``max``: every sample with ``min <= value <= max`` (either bound may be left out),
  compared in float64.
- Rows come out sorted by the value (descending, ascending for ``bottom_frac``), then ``sample_id``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..store.reader import Cache
from .engine import Engine, QueryResult
from .errors import QueryError
from .token_stats import DEFAULT_THRESHOLD

# column -> (view, meaning)
BY_COLUMNS: dict[str, tuple[str, str]] = {
    "mean_entropy": ("samples", "mean entropy over scored rows (nats)"),
    "max_entropy": ("samples", "max entropy over scored rows"),
    "p90_entropy": ("samples", "90th percentile of entropy over scored rows"),
    "teacher_logprob_mean": ("samples", "mean log-probability of the scored tokens"),
    "teacher_logprob_sum": ("samples", "log-likelihood of the scored text"),
    "perplexity": ("samples", "exp(-teacher_logprob_mean)"),
    "response_tokens": ("samples", "tokens of the response"),
    "num_tokens": ("samples", "tokens of the sample (prompt + response)"),
    "high_entropy_share": ("token_stats", "share of scored tokens above the entropy threshold"),
    "high_entropy_tokens": ("token_stats", "scored tokens above the entropy threshold"),
}


@dataclass
class Shortcut:
    by: str
    top_frac: float | None = None
    bottom_frac: float | None = None
    min: float | None = None
    max: float | None = None

    def validate(self) -> None:
        if self.by not in BY_COLUMNS:
            raise QueryError(f"cannot select by {self.by!r}: choose one of {', '.join(BY_COLUMNS)}")
        fracs = [f for f in (self.top_frac, self.bottom_frac) if f is not None]
        if len(fracs) > 1 or (fracs and (self.min is not None or self.max is not None)):
            raise QueryError("give one of --top-frac, --bottom-frac, or --min/--max")
        if not fracs and self.min is None and self.max is None:
            raise QueryError("give one of --top-frac, --bottom-frac, --min or --max")
        for f in fracs:
            if not 0 < f <= 1:
                raise QueryError(f"a fraction must be in (0, 1], got {f}")
        for flag, v in (("--min", self.min), ("--max", self.max)):
            if v is not None and not math.isfinite(v):
                raise QueryError(f"{flag} must be a finite number, got {v}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise QueryError(f"--min {self.min} is above --max {self.max}")

    def describe(self) -> str:
        flags = [f"--by {self.by}"]
        for name in ("top_frac", "bottom_frac", "min", "max"):
            if getattr(self, name) is not None:
                flags.append(f"--{name.replace('_', '-')} {getattr(self, name)!r}")
        return "logitcache select " + " ".join(flags)


def shortcut_sql(s: Shortcut, engine: Engine) -> str:
    """The SQL statement that makes the selection (counting the non-null values first for a fraction)."""
    s.validate()
    view = BY_COLUMNS[s.by][0]
    col = s.by
    if s.top_frac is not None or s.bottom_frac is not None:
        frac = s.top_frac if s.top_frac is not None else s.bottom_frac
        n = engine.run(f"SELECT count({col}) AS n FROM {view}").table.column("n")[0].as_py()
        k = math.ceil(frac * n - 1e-9)  # ceil without float dust: 0.3 x 10 is 3, not 4
        order = "DESC" if s.top_frac is not None else "ASC"
        return f"SELECT sample_id, {col} FROM {view} WHERE {col} IS NOT NULL ORDER BY {col} {order}, sample_id LIMIT {k}"
    cond = []
    if s.min is not None:
        cond.append(f"{col}::DOUBLE >= '{float(s.min)!r}'::DOUBLE")
    if s.max is not None:
        cond.append(f"{col}::DOUBLE <= '{float(s.max)!r}'::DOUBLE")
    return f"SELECT sample_id, {col} FROM {view} WHERE {' AND '.join(cond)} ORDER BY {col} DESC, sample_id"


def select_samples(cache: Cache, shortcut: Shortcut, threshold: float = DEFAULT_THRESHOLD,
                   persist: bool = True, **engine_options) -> QueryResult:
    """Run a shortcut; the result has columns ``sample_id`` and the ``by`` column."""
    engine = Engine(cache, threshold, persist, **engine_options)
    return engine.run(shortcut_sql(shortcut, engine))
