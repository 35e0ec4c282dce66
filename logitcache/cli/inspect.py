"""`logitcache inspect`: the summary of a cache, as text, JSON or a picture."""

from __future__ import annotations

import click

from .common import echo_json, handle_errors, parse_storage_options, storage_options_option


@click.command(context_settings={"max_content_width": 100})
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the entropy histogram, top-k mass curve and entropy by position to this PNG.")
@click.option("--selection", default=None, metavar="FILE.parquet",
              help="Summarise this selection file against CACHE (checked: made from CACHE); --plot overlays it.")
@click.option("--verify", is_flag=True, help="Recompute every shard checksum (exit code 3 names a corrupt shard).")
@click.option("--partial", is_flag=True, help="Read a cache whose capture is running or was never finalized.")
@click.option("--no-token-stats", is_flag=True, help="Skip the token-level pass (entropy, top-k mass).")
@storage_options_option
@handle_errors
def inspect(cache, as_json, plot, verify, partial, no_token_stats, selection, storage_options):
    """Summarise CACHE: teacher, tokenizer, capture settings, sizes (bytes/token per array) and the
    distribution of the teacher's entropy.

    \b
    Examples:
      logitcache inspect ./cache --verify
      logitcache inspect ./cache --plot entropy.png
      logitcache inspect ./cache --selection hard.parquet --plot hard.png   # selection vs cache
    """
    from ..report.summary import plot as draw, render_text, summarize
    from ..store.reader import open_cache

    c = open_cache(cache, verify=verify, allow_partial=partial, storage_options=parse_storage_options(storage_options))
    s = summarize(c, token_stats=not no_token_stats or bool(plot), selection=selection)
    if verify:
        s["verified_shards"] = len(c.shards)
    if plot:
        if "token_stats" not in s:
            raise click.UsageError("--plot needs scored tokens; this cache has none")
        draw(s, plot)
        s["plot"] = plot
    if as_json:
        echo_json(s)
    else:
        click.echo(render_text(s))
        if verify:
            click.echo(f"verified     {len(c.shards)} shard checksum(s) OK")
        if plot:
            click.echo(f"plot         {plot}")
