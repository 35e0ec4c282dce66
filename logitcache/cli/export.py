"""`logitcache export`: copy a selection into a new, smaller cache, or write a cache as another tool's files."""

from __future__ import annotations

import click

from ..format.errors import LogitcacheError
from ..interop import all_options, names
from .common import echo_json, handle_errors, parse_storage_options, storage_options_option

LOGITCACHE = "logitcache"


def format_options(importing: bool):
    """The flags of every foreign format's options (``interop.Option``), each passed on by its keyword."""
    def wrap(fn):
        for o in reversed(all_options(importing)):
            fn = click.option(o.flag, o.name, type=o.type, default=None, metavar=o.metavar, help=o.help)(fn)
        return fn
    return wrap


@click.command(context_settings={"max_content_width": 100})
@click.argument("cache")
@click.argument("out")
@click.option("--to", "to", type=click.Choice([LOGITCACHE, *names()]), default=LOGITCACHE, show_default=True,
              help="What to write: a logitcache cache (needs --selection), DistillKit's parquet, or axolotl's KD "
                   "dataset (docs/interop.md).")
@click.option("--selection", default=None, metavar="FILE.parquet",
              help="A selection file made from CACHE (by `logitcache select` or `query --out`): only its samples. "
                   "Required with --to logitcache.")
@format_options(importing=False)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@storage_options_option
@handle_errors
def export(cache, out, to, selection, as_json, storage_options, **options):
    """Write OUT: a new cache holding only the samples of a selection (--to logitcache), or the samples of
    CACHE as another tool's files (--to distillkit, --to axolotl; a --selection keeps only its samples).

    A new cache: each shard of CACHE with selected samples becomes one shard of OUT (samples keep their
    order and sample_id; arrays are copied as stored), committed with checksums like a capture; the
    manifest is written last and records the provenance: CACHE's URL and fingerprint, the selection's
    query and count. Another tool's files: its layout (docs/interop.md), samples in cache order, plus
    OUT/.logitcache/ (where each sample went; what was checked). OUT must not exist or be empty. A
    selection is checked against CACHE first: a file made from another cache is refused and nothing is
    written.

    \b
    Example:
      logitcache select ./cache --by mean_entropy --top-frac 0.3 --out hard.parquet
      logitcache export ./cache --selection hard.parquet ./hard-cache
      logitcache export ./cache ./distillkit-data --to distillkit
      logitcache export ./cache ./axolotl-data --to axolotl --selection hard.parquet
    """
    from ..store.reader import open_cache

    opts = parse_storage_options(storage_options)
    if to == LOGITCACHE:
        given = [o.flag for o in all_options(False) if options.get(o.name) is not None]
        if given:
            raise LogitcacheError(f"{given[0]} applies to --to {'/'.join(names())}, not {LOGITCACHE}")
        if selection is None:
            raise LogitcacheError("--selection: --to logitcache copies a selection; give --selection FILE.parquet "
                                  "(or --to distillkit/axolotl to write another tool's files)")
        from ..query.export import export_selection

        s = export_selection(open_cache(cache, storage_options=opts), selection, out, opts)
        if as_json:
            echo_json(s.to_dict())
        else:
            click.echo(f"{s.cache}: {s.samples} samples in {s.shards} shard(s), {s.tokens} tokens, "
                       f"{s.bytes / 1e6:.2f} MB, from {s.source} ({s.selection})")
        return
    from ..interop import export_to

    r = export_to(open_cache(cache, storage_options=opts), out, to=to, selection=selection, storage_options=opts,
                  **options)
    if as_json:
        echo_json(r.to_dict())
    else:
        click.echo(f"{r.out}: {to} files of {r.samples} samples, {r.tokens} tokens, {len(r.files)} file(s), "
                   f"{r.bytes / 1e6:.2f} MB ({r.bytes_per_token:.1f} B/token), from {r.source}")
