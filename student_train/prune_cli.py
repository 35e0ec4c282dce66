"""`student-prune`: a student cut from the teacher by importance (``prune``). Thin: flags (one per
``PruneConfig`` field) -> config -> ``prune.prune`` -> a summary."""

from __future__ import annotations

import dataclasses

import click

from logitcache.cli.common import echo_json, handle_errors

from .prune import DEPTH_METHODS, PruneConfig

HELP = {
    "teacher": "The teacher's model directory (default: the cache's teacher).",
    "calibration_tokens": "Tokens of the cache's samples to measure importance on.",
    "seq_len": "The longest calibration sequence (longer samples are cut).",
    "depth": "Decoder blocks to keep.",
    "depth_method": "bi: the blocks of largest block influence (1 - cos(in, out)); likelihood: of largest "
                    "likelihood drop when removed; contiguous: drop the run of blocks of least summed influence.",
    "ffn": "FFN neurons per block to keep (the student's intermediate_size).",
    "kv_heads": "KV groups per block to keep, each with its query heads (grouped-query aware).",
    "hidden": "Embedding channels to keep (the student's hidden_size).",
    "importance_from": "Reuse the importance of an earlier prune_report.json (same teacher, cache and calibration) "
                       "instead of measuring again: cut several shapes from one measurement.",
}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(PruneConfig)}


def config_options(fn):
    for f in reversed(dataclasses.fields(PruneConfig)):
        if f.name in ("cache", "out"):
            continue
        kind = click.Choice(list(DEPTH_METHODS)) if f.name == "depth_method" else \
            str if f.name in ("teacher", "importance_from") else int
        fn = click.option("--" + f.name.replace("_", "-"), f.name, type=kind, default=DEFAULTS[f.name],
                          show_default=DEFAULTS[f.name] is not None, help=HELP[f.name])(fn)
    return fn


@click.command(context_settings={"max_content_width": 100})
@click.argument("cache")
@click.option("--out", "-o", required=True, help="The student directory (weights, tokenizer, prune_report.json/.png).")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def cli(cache, out, as_json, **fields):
    """Cut a student from CACHE's teacher by importance measured on CACHE's own tokens: fewer blocks
    (--depth), FFN neurons (--ffn), KV groups with their query heads (--kv-heads) and embedding channels
    (--hidden). Writes a Hugging Face directory to train with `student-train --student DIR`.

    \b
    Examples:
      student-prune ./cache --out ./student-d20 --depth 20
      student-prune ./cache --out ./student-w --ffn 1024 --kv-heads 2 --hidden 384
    """
    from .prune import prune

    report = prune(PruneConfig(cache=cache, out=out, **fields), log=(lambda m: None) if as_json else click.echo)
    if as_json:
        echo_json(report)
        return
    p, nll = report["parameters"], report["nll"]
    click.echo(f"kept blocks {report['kept']['blocks']}; {p['before'] / 1e6:.2f}M -> {p['after'] / 1e6:.2f}M "
               f"parameters; calibration NLL {nll['teacher']:.3f} -> {nll['pruned_before_healing']:.3f} nats/token "
               f"before healing")
    click.echo(f"student: {out} (report: {out}/prune_report.json, {out}/prune_report.png)")


if __name__ == "__main__":
    cli()
