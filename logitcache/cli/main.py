"""`logitcache`: the command-line entry point. Thin: parse, validate, call one library function.

Subcommands are imported only when chosen, so `--help` is instant and imports neither torch nor
vLLM. Exit codes: 0 success, 1 a problem with the input, flags or cache (the message says which),
2 a usage error, 3 a corrupt cache (a checksum does not match).
"""

from __future__ import annotations

import importlib

import click

COMMANDS = {
    "capture": ("logitcache.cli.capture", "capture", "Run a teacher over prompts or text and write a cache."),
    "inspect": ("logitcache.cli.inspect", "inspect", "Summarise a cache: teacher, sizes, entropy; --plot, --json."),
    "finalize": ("logitcache.cli.finalize", "finalize", "Merge the workers' part manifests into manifest.json."),
    "query": ("logitcache.cli.query", "query", "SQL over samples and token views; --out: a selection."),
    "select": ("logitcache.cli.select", "select", "Select samples by entropy, perplexity, length."),
    "export": ("logitcache.cli.export", "export", "Copy a selection into a new cache; --to distillkit/axolotl."),
    "import": ("logitcache.cli.import_", "import_", "Another tool's cache files (DistillKit) into a new cache."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="logitcache")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (resume decisions, leftovers removed).")
def cli(verbose):
    """Offline distillation caches: capture a teacher's top-k log-probabilities, exact entropy and
    hidden states once, then train students from them on other machines.

    \b
    Typical session:
      logitcache capture ./cache                      # builtin prompts, SmolLM2 teacher, generate mode
      logitcache capture ./cache2 --mode score --input data.jsonl --text-column text
      logitcache inspect ./cache --plot entropy.png
      logitcache select ./cache --by mean_entropy --top-frac 0.3 --out hard.parquet
      logitcache query ./cache "SELECT sample_id FROM samples WHERE mean_entropy > 1.5" --out hard.parquet
      logitcache export ./cache --selection hard.parquet ./hard-cache
      logitcache export ./cache ./distillkit-data --to distillkit
      logitcache import ./distillkit-data ./imported --from distillkit --tokenizer ./teacher
    """
    import logging
    import os

    if not verbose:   # vLLM's engine start-up chatter only with -v
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


if __name__ == "__main__":  # pragma: no cover
    cli()
