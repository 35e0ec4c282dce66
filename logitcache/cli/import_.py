"""`logitcache import`: another tool's cache files -> a new logitcache cache."""

from __future__ import annotations

import click

from ..interop import names
from .common import echo_json, handle_errors, parse_storage_options, storage_options_option
from .export import format_options


@click.command("import", context_settings={"max_content_width": 100})
@click.argument("src")
@click.argument("out")
@click.option("--from", "from_", type=click.Choice(names(importing=True)), required=True,
              help="The tool whose files SRC holds (docs/interop.md).")
@click.option("--tokenizer", required=True, metavar="DIR",
              help="The teacher's tokenizer (a directory or hub id): the manifest's tokenizer, the samples' text, "
                   "and SRC's token ids checked against its vocabulary.")
@format_options(importing=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@storage_options_option
@handle_errors
def import_(src, out, from_, tokenizer, as_json, storage_options, **options):
    """Write OUT, a new cache holding the samples of SRC (a file, a directory or a glob; any fsspec URL).

    DistillKit: its capture's directory (compression_config.yaml and data_<i>.parquet). The cache is a
    topk cache of its decoded log-probs (approximations of the teacher's: the manifest says so), with
    entropy unknown (NaN), committed like a capture; its provenance names the files. OUT must not exist
    or be empty.

    \b
    Example:
      logitcache import ./distillkit-data ./cache --from distillkit --tokenizer ./teacher
      logitcache inspect ./cache
    """
    from ..interop import import_from

    opts = parse_storage_options(storage_options)
    r = import_from(src, out, from_=from_, tokenizer=tokenizer, storage_options=opts, **options)
    if as_json:
        echo_json(r.to_dict())
    else:
        click.echo(f"{r.cache}: {r.samples} samples in {r.shards} shard(s), {r.tokens} tokens, "
                   f"{r.bytes / 1e6:.2f} MB, from {r.source} ({len(r.files)} file(s), {from_})")
