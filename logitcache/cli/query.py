"""`logitcache query`: one SQL SELECT over a cache's samples table and its derived views."""

from __future__ import annotations

import click

from ..query import DEFAULT_THRESHOLD
from .common import echo_json, handle_errors, parse_storage_options, storage_options_option


@click.command(context_settings={"max_content_width": 100})
@click.argument("cache")
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list of objects (with --out: a summary).")
@click.option("--csv", "as_csv", is_flag=True, help="Print the rows as CSV, header first.")
@click.option("--out", default=None, metavar="FILE.parquet",
              help="Write the result as a selection file (needs a sample_id column); prints a summary.")
@click.option("--threshold", type=float, default=DEFAULT_THRESHOLD, show_default=True,
              help="Entropy in nats above which a token is high-entropy in the token_stats view.")
@click.option("--max-rows", type=click.IntRange(min=1), default=50, show_default=True,
              help="Rows shown in the terminal table (--json, --csv and --out take every row).")
@click.option("--no-persist", is_flag=True,
              help="Compute token_stats/tokens in memory and write nothing into CACHE (read-only caches).")
@storage_options_option
@handle_errors
def query(cache, sql, as_json, as_csv, out, threshold, max_rows, no_persist, storage_options):
    """Run one SQL SELECT (DuckDB dialect) over CACHE, a path or fsspec URL.

    \b
    Views:
      samples      one row per sample: the stored samples table (sample_id, shard, num_tokens,
                   prompt_tokens, response_tokens, mean_entropy, max_entropy, p90_entropy,
                   teacher_logprob_sum, finish_reason, source, row, prompt, response, ...) plus
                   scored_tokens, teacher_logprob_mean, perplexity
      token_stats  one row per sample: sample_id, high_entropy_tokens, high_entropy_share
                   (entropy > --threshold); computed from the token arrays the first time, then
                   stored in CACHE/derived/ and reused
      tokens       one row per token: sample_id, position, token, entropy, target_logprob;
                   materialised under CACHE/derived/ the first time a query names it

    \b
    Examples:
      logitcache query ./cache "SELECT sample_id FROM samples WHERE mean_entropy > 1.5
                                ORDER BY mean_entropy DESC LIMIT 1000" --out hard.parquet
      logitcache query ./cache "SELECT finish_reason, count(*), avg(perplexity) FROM samples GROUP BY 1"
      logitcache query ./cache "SELECT sample_id, high_entropy_share FROM token_stats
                                ORDER BY high_entropy_share DESC LIMIT 20" --threshold 2.0
      logitcache query ./cache "SELECT position, avg(entropy) FROM tokens GROUP BY 1 ORDER BY 1" --csv

    docs/query.md has the columns, the selection file format and more examples.
    """
    if as_json and as_csv:
        raise click.UsageError("give one of --json and --csv")
    if as_csv and out:
        raise click.UsageError("--out writes a selection file; --csv prints rows: give one")
    from ..query.engine import run_query
    from ..query.selection import write_selection
    from ..store.reader import open_cache
    from .output import echo_rows

    c = open_cache(cache, storage_options=parse_storage_options(storage_options))
    result = run_query(c, sql, threshold=threshold, persist=not no_persist)
    if out:
        info = write_selection(result.table, out, c, result.sql, entropy_threshold=result.entropy_threshold)
        summary = {"selection": out, "count": info.count, "of_samples": c.manifest.num_samples,
                   "cache": c.url, "cache_fingerprint": info.cache_fingerprint, "query": info.query}
        if as_json:
            echo_json(summary)
        else:
            click.echo(f"wrote {info.count} of {c.manifest.num_samples} sample ids to {out}")
        return
    echo_rows(result.table, as_json, as_csv, max_rows)
