"""Shared CLI plumbing: turn our errors into a message and an exit code, print JSON."""

from __future__ import annotations

import functools
import json
import sys

import click

from ..format.errors import CorruptCacheError, LogitcacheError

EXIT_INPUT, EXIT_CORRUPT = 1, 3


def os_error_message(e: OSError) -> str:
    """One line for a failed file operation: what failed, on which path (full disk, read-only or
    missing destination, permissions, a file where a directory belongs)."""
    what = e.strerror or str(e) or type(e).__name__
    paths = [p for p in (e.filename, getattr(e, "filename2", None)) if p]
    return f"{what}: {' -> '.join(map(str, paths))}" if paths else what


def handle_errors(fn):
    """Turn our errors into ``error: <message>`` and an exit code (3: a corrupt cache; 1: anything
    else the user can fix, a failed file operation included); anything else is a bug and keeps its
    traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CorruptCacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_CORRUPT)
        except LogitcacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_INPUT)
        except OSError as e:
            click.echo(f"error: {os_error_message(e)}", err=True)
            sys.exit(EXIT_INPUT)
    return wrapper


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))
