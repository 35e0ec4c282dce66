"""Shared CLI plumbing: turn our errors into a message and an exit code, print JSON."""

from __future__ import annotations

import functools
import json
import os
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


STORAGE_OPTIONS_ENV = "LOGITCACHE_STORAGE_OPTIONS"
STORAGE_OPTIONS_HELP = ("fsspec options for the cache's file system, as JSON (e.g. an S3-compatible endpoint: "
                        "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'); for a chained URL "
                        "(simplecache::s3://...) flat keys reach the innermost layer, {\"simplecache\": {...}} that "
                        f"layer; default: ${STORAGE_OPTIONS_ENV}, else the file system's own (environment, instance role).")


def storage_options_option(fn):
    """``--storage-options JSON`` (parse it with ``parse_storage_options``)."""
    return click.option("--storage-options", "storage_options", metavar="JSON", default=None,
                        help=STORAGE_OPTIONS_HELP)(fn)


def parse_storage_options(text: str | None) -> dict | None:
    """The JSON object of ``--storage-options`` (or of $LOGITCACHE_STORAGE_OPTIONS when the flag is not
    given); None when neither is set. Anything but a JSON object is refused, naming where it came from."""
    source = "--storage-options"
    if text is None:
        text, source = os.environ.get(STORAGE_OPTIONS_ENV), f"${STORAGE_OPTIONS_ENV}"
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LogitcacheError(f"{source}: not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise LogitcacheError(f"{source}: must be a JSON object of fsspec options, got {type(value).__name__}")
    return value
