"""`logitcache export`: copy the samples of a selection into a new, smaller cache."""

from __future__ import annotations

import click

from .common import echo_json, handle_errors, parse_storage_options, storage_options_option


@click.command(context_settings={"max_content_width": 100})
@click.argument("cache")
@click.argument("out")
@click.option("--selection", required=True, metavar="FILE.parquet",
              help="A selection file made from CACHE (by `logitcache select` or `query --out`).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@storage_options_option
@handle_errors
def export(cache, out, selection, as_json, storage_options):
    """Write OUT, a new cache in the same format holding only the samples of the selection.

    Each shard of CACHE with selected samples becomes one shard of OUT (samples keep their order and
    sample_id; arrays are copied as stored), committed with checksums like a capture; the manifest
    is written last and records the provenance: CACHE's URL and fingerprint, the selection's query
    and count. OUT must not exist or be empty. The selection is checked against CACHE first: a file
    made from another cache is refused and nothing is written.

    \b
    Example:
      logitcache select ./cache --by mean_entropy --top-frac 0.3 --out hard.parquet
      logitcache export ./cache --selection hard.parquet ./hard-cache
      logitcache inspect ./hard-cache --verify
    """
    from ..query.export import export_selection
    from ..store.reader import open_cache

    options = parse_storage_options(storage_options)
    s = export_selection(open_cache(cache, storage_options=options), selection, out, options)
    if as_json:
        echo_json(s.to_dict())
    else:
        click.echo(f"{s.cache}: {s.samples} samples in {s.shards} shard(s), {s.tokens} tokens, "
                   f"{s.bytes / 1e6:.2f} MB, from {s.source} ({s.selection})")
