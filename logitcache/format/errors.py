"""Every error logitcache raises on purpose derives from ``LogitcacheError``.

The CLI turns these into a one-line message and a non-zero exit code; anything else is a bug and
keeps its traceback.
"""


class LogitcacheError(Exception):
    """A problem the user can fix: bad input, a wrong flag, a cache that does not match."""


class FormatError(LogitcacheError):
    """A cache (or part of one) that does not follow the format contract."""


class CorruptShardError(FormatError):
    """A committed shard whose bytes no longer match the checksum in the manifest."""

    def __init__(self, shard: str, detail: str):
        self.shard = shard
        super().__init__(f"shard {shard!r} is corrupt: {detail}")


class InputError(LogitcacheError):
    """Input data that cannot be captured: a missing column, a wrong type, an unreadable file."""


class ConfigMismatchError(LogitcacheError):
    """A capture that would mix two teachers, tokenizers or configs in one cache."""
