"""`logitcache select`: common selections without SQL, written as a selection file."""

from __future__ import annotations

import click

from ..query import DEFAULT_THRESHOLD
from .common import echo_json, handle_errors, parse_storage_options, storage_options_option


@click.command(context_settings={"max_content_width": 100})
@click.argument("cache")
@click.option("--by", "by", required=True, metavar="COLUMN",
              help="mean_entropy, max_entropy, p90_entropy, teacher_logprob_mean, teacher_logprob_sum, perplexity, "
                   "response_tokens, num_tokens, high_entropy_share or high_entropy_tokens.")
@click.option("--top-frac", type=float, default=None, help="Keep the largest ceil(F x N) values (0 < F <= 1).")
@click.option("--bottom-frac", type=float, default=None, help="Keep the smallest ceil(F x N) values.")
@click.option("--min", "min_", type=float, default=None, help="Keep values >= this (with or without --max).")
@click.option("--max", "max_", type=float, default=None, help="Keep values <= this.")
@click.option("--out", required=True, metavar="FILE.parquet", help="The selection file to write.")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="Entropy in nats above which a token is high-entropy (for high_entropy_*).")
@click.option("--no-persist", is_flag=True, help="Compute token stats in memory; write nothing into CACHE.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON.")
@storage_options_option
@handle_errors
def select(cache, by, top_frac, bottom_frac, min_, max_, out, threshold, no_persist, as_json, storage_options):
    """Select samples of CACHE by one per-sample column and write a selection file (Parquet:
    sample_id and the column, sorted by it; the metadata records the cache's fingerprint and the
    equivalent SQL). N counts the samples whose value is not null; ties are broken by sample_id.

    \b
    Examples:
      logitcache select ./cache --by mean_entropy --top-frac 0.3 --out hard.parquet
      logitcache select ./cache --by perplexity --max 20 --out fluent.parquet
      logitcache select ./cache --by high_entropy_share --top-frac 0.1 --threshold 2.0 --out forks.parquet
      logitcache select ./cache --by response_tokens --min 32 --max 512 --out mid.parquet

    Then: `logitcache inspect ./cache --selection hard.parquet`, `logitcache export ./cache
    --selection hard.parquet ./hard-cache`, or `student-train --selection hard.parquet`.
    """
    from ..query.selection import write_selection
    from ..query.shortcuts import Shortcut, select_samples
    from ..store.reader import open_cache

    shortcut = Shortcut(by, top_frac, bottom_frac, min_, max_)
    shortcut.validate()  # before opening anything
    c = open_cache(cache, storage_options=parse_storage_options(storage_options))
    result = select_samples(c, shortcut, threshold=threshold, persist=not no_persist)
    info = write_selection(result.table, out, c, result.sql, shortcut=shortcut.describe(),
                           entropy_threshold=result.entropy_threshold)
    summary = {"selection": out, "count": info.count, "of_samples": c.manifest.num_samples, "cache": c.url,
               "cache_fingerprint": info.cache_fingerprint, "query": info.query, "shortcut": info.shortcut}
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"wrote {info.count} of {c.manifest.num_samples} sample ids to {out}\nquery: {info.query}")
