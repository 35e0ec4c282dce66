"""Shared CLI plumbing: turn our errors into a message and an exit code, print JSON."""

from __future__ import annotations

import functools
import json
import sys

import click

from ..format.errors import CorruptShardError, LogitcacheError

EXIT_INPUT, EXIT_CORRUPT = 1, 3


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CorruptShardError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_CORRUPT)
        except LogitcacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_INPUT)
    return wrapper


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))
