"""Errors of the query layer: each names the problem (the SQL, the column, the file) so the CLI can
print it and exit with code 1."""

from ..format.errors import LogitcacheError


class QueryError(LogitcacheError):
    """SQL that does not parse, names an unknown table or column, or fails while running."""


class SelectionError(LogitcacheError):
    """A selection file that cannot be read or does not belong to the cache it is used with."""
