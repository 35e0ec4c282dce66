"""Every error logitcache raises on purpose derives from ``LogitcacheError``.

The CLI turns these into a one-line message and a non-zero exit code; anything else is a bug and
keeps its traceback.
"""


class LogitcacheError(Exception):
    """A problem the user can fix: bad input, a wrong flag, a cache that does not match."""


class FormatError(LogitcacheError):
    """A cache (or part of one) that does not follow the format contract."""


class CorruptCacheError(FormatError):
    """Stored bytes or records that no longer say what was written (the CLI exits with code 3)."""


class CorruptManifestError(CorruptCacheError):
    """A manifest whose checksum does not match, whose records contradict each other, or whose names
    would point outside the cache."""


class CorruptShardError(CorruptCacheError):
    """A committed shard whose bytes no longer match the checksums in the manifest (or a record it
    contradicts). ``CorruptShardError(message)`` rebuilds one from its message (as torch's DataLoader
    does with errors raised in its workers)."""

    def __init__(self, shard: str, detail: str | None = None):
        if detail is None:                      # one argument: an already formatted message
            self.shard = shard.split("'")[1] if shard.startswith("shard '") else ""
            super().__init__(shard)
            return
        self.shard = shard
        super().__init__(f"shard {shard!r} is corrupt: {detail}")


class InputError(LogitcacheError):
    """Input data that cannot be captured: a missing column, a wrong type, an unreadable file."""


class ConfigMismatchError(LogitcacheError):
    """A capture that would mix two teachers, tokenizers or configs in one cache."""


class EncodingError(LogitcacheError, ValueError):
    """Bad arguments to, or inconsistent arrays for, an encoding of the teacher's distribution."""
