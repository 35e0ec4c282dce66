"""`logitcache finalize`: merge part manifests into manifest.json (normally automatic)."""

from __future__ import annotations

import click

from .common import echo_json, handle_errors, parse_storage_options, storage_options_option


@click.command(context_settings={"max_content_width": 100})
@click.argument("cache")
@click.option("--allow-incomplete", is_flag=True,
              help="Write manifest.json even though planned shards are missing (readers see what is committed).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@storage_options_option
@handle_errors
def finalize(cache, allow_incomplete, as_json, storage_options):
    """Merge the part manifests of all capture workers of CACHE into manifest.json.

    The last worker to finish does this by itself; run it when a worker will not come back, or
    after copying parts around by hand. Leftovers of crashed writers are removed.
    """
    from ..store.commit import finalize as run
    from ..store.fs import CacheFS

    m = run(CacheFS(cache, parse_storage_options(storage_options)), allow_incomplete=allow_incomplete)
    result = {"cache": cache, "complete": m.complete, "shards": len(m.shards), "samples": m.num_samples,
              "tokens": m.num_tokens, "skipped": len(m.skipped)}
    if as_json:
        echo_json(result)
    else:
        click.echo(f"{cache}: {'complete' if m.complete else 'INCOMPLETE'}; {result['shards']} shard(s), "
                   f"{result['samples']} samples, {result['tokens']} tokens, {result['skipped']} skipped")
