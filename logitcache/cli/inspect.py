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
@click.option("--student-tokenizer", type=click.Path(file_okay=False), default=None,
              help="How the samples align with this other tokenizer (a directory with its files): the shares a "
                   "student-train run with it would report (docs/training.md).")
@click.option("--teacher-tokenizer", type=click.Path(file_okay=False), default=None,
              help="With --student-tokenizer: the teacher's tokenizer directory.  [default: the teacher's directory]")
@click.option("--align-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="With --student-tokenizer: how many samples (the first) to align.")
@storage_options_option
@handle_errors
def inspect(cache, as_json, plot, verify, partial, no_token_stats, selection, storage_options, student_tokenizer,
            teacher_tokenizer, align_samples):
    """Summarise CACHE: teacher, tokenizer, capture settings, sizes (bytes/token per array) and the
    distribution of the teacher's entropy.

    \b
    Examples:
      logitcache inspect ./cache --verify
      logitcache inspect ./cache --plot entropy.png
      logitcache inspect ./cache --selection hard.parquet --plot hard.png   # selection vs cache
      logitcache inspect ./cache --student-tokenizer ./qwen-student          # aligned share, mapped mass
    """
    from ..report.summary import plot as draw, render_text, summarize
    from ..store.reader import open_cache

    c = open_cache(cache, verify=verify, allow_partial=partial, storage_options=parse_storage_options(storage_options))
    s = summarize(c, token_stats=not no_token_stats or bool(plot), selection=selection)
    if verify:
        s["verified_shards"] = len(c.shards)
    if student_tokenizer:
        s["alignment"] = _alignment(c, student_tokenizer, teacher_tokenizer, align_samples)
    if plot:
        if "token_stats" not in s:
            raise click.UsageError("--plot needs scored tokens; this cache has none")
        draw(s, plot)
        s["plot"] = plot
    if as_json:
        echo_json(s)
    else:
        click.echo(render_text(s))
        if student_tokenizer:
            a = s["alignment"]
            click.echo(f"alignment    {student_tokenizer}: {a['aligned']} of {a['student_positions']} student positions "
                       f"aligned ({100 * a['aligned_share']:.1f}%) over {a['samples']} samples; {a['mapped']} with a "
                       f"mapped entry, mean mapped mass {a['mapped_mass']:.3f}; {100 * a['vocab_mapped_share']:.1f}% "
                       "of teacher ids map")
        if verify:
            click.echo(f"verified     {len(c.shards)} shard checksum(s) OK")
        if plot:
            click.echo(f"plot         {plot}")


def _alignment(cache, student_dir: str, teacher_dir: str | None, samples: int) -> dict:
    from ..align import load_tokenizer
    from ..align.stats import alignment_stats
    from ..teacher.identity import teacher_directory

    m = cache.manifest
    teacher_dir = teacher_dir or teacher_directory(m, "--student-tokenizer", "pass --teacher-tokenizer DIR")
    teacher = load_tokenizer(teacher_dir, "--teacher-tokenizer", m.tokenizer.vocab_sha256)
    return alignment_stats(cache, teacher, load_tokenizer(student_dir, "--student-tokenizer"), samples)
