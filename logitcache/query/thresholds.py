"""Defaults of the query layer that the CLI shows in --help, in a module that imports nothing."""

# nats: a token whose next-token entropy is above this counts as high-entropy ("forking") in the
# token_stats view.
DEFAULT_THRESHOLD = 1.0
