"""student-train: distil a student from a logitcache cache.

The trainer arrives with the student-trainer issue; until then the command explains itself and
exits with status 2 instead of pretending to train.
"""

import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("cache", required=False)
def cli(cache):
    """Train a student on CACHE (a logitcache directory or fsspec URL).

    Not implemented in this release: the cache format and `logitcache capture` / `inspect` are.
    """
    click.echo("student-train: the student trainer is not part of this release yet "
               "(see the README's roadmap); nothing was done.", err=True)
    sys.exit(2)
