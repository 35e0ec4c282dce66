"""The per-sample Parquet table: one row per captured sample, one file per shard.

``SAMPLE_COLUMNS`` is the single source of truth for the schema; docs/format.md mirrors it and a test
keeps the two in step.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

# (name, arrow type, meaning)
SAMPLE_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("sample_id", pa.string(), "stable id: hash of (source name, split, row, sample index); never run order"),
    ("shard", pa.string(), "name of the shard that holds this sample's token rows"),
    ("token_offset", pa.int64(), "first row of this sample in the shard's token-major arrays"),
    ("num_tokens", pa.int32(), "rows of this sample (prompt + response tokens)"),
    ("prompt_tokens", pa.int32(), "tokens of the prompt (chat template included); 0 for plain text"),
    ("response_tokens", pa.int32(), "tokens of the response (generated, or the scored text)"),
    ("scored_start", pa.int32(), "first row (relative to token_offset) whose next-token distribution is stored"),
    ("scored_end", pa.int32(), "one past the last such row; rows outside [scored_start, scored_end) hold fill values"),
    ("mean_entropy", pa.float32(), "mean full-vocabulary entropy (nats) over scored rows"),
    ("max_entropy", pa.float32(), "max entropy over scored rows"),
    ("p90_entropy", pa.float32(), "90th percentile (linear interpolation) of entropy over scored rows"),
    ("teacher_logprob_sum", pa.float64(), "sum of target_logprob over scored rows (log-likelihood of the scored text)"),
    ("finish_reason", pa.string(), "generate: 'stop' (end-of-sequence token) or 'length'; score: 'scored' or 'truncated'"),
    ("source", pa.string(), "input source: a file name or a datasets name"),
    ("split", pa.string(), "dataset split ('' for files)"),
    ("row", pa.int64(), "row index in the source"),
    ("sample_index", pa.int32(), "which of the n samples drawn for this row (0 when n = 1)"),
    ("prompt", pa.string(), "prompt text as given (chat messages as JSON); null for plain text; "
                            "token-id inputs (1.4): the prompt_ids decoded"),
    ("response", pa.string(), "response text: generated, or the scored text; token-id inputs (1.4): the stored "
                              "response ids decoded"),
]

SAMPLES_SCHEMA = pa.schema([pa.field(name, typ) for name, typ, _ in SAMPLE_COLUMNS])

# (1.6) written only by a capture that chose the rows to store (capture --positions-from; the manifest's
# ``positions`` section): every shard of such a cache has them, after the columns above
POSITIONS_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("positions_rule", pa.string(), "(1.6, --positions-from) the rule that chose the rows holding the teacher's "
                                    "distribution: 'student-entropy'"),
    ("positions_kept", pa.int32(), "(1.6, --positions-from) scored rows of this sample whose distribution is stored "
                                   "(the `selected` rows)"),
    ("positions_share", pa.float32(), "(1.6, --positions-from) positions_kept / (scored_end - scored_start); NaN "
                                      "when the sample has no scored row"),
]
OPTIONAL_COLUMNS = POSITIONS_COLUMNS


def samples_schema(names) -> pa.Schema:
    """The schema of a samples table whose columns are ``names``: every column of ``SAMPLES_SCHEMA``, then
    the optional (1.6) columns among ``names``, in their documented order. A column this release does not know (a newer
    minor version's) is not part of it: readers select the schema's names."""
    present = set(names)
    extra = [pa.field(name, typ) for name, typ, _ in OPTIONAL_COLUMNS if name in present]
    return pa.schema(list(SAMPLES_SCHEMA) + extra) if extra else SAMPLES_SCHEMA


def sample_id(source_name: str, split: str, row: int, sample_index: int) -> str:
    """A 16-hex-digit id that is the same whenever the same input row is captured again.

    Derived from what identifies the data (so caches of two teachers over one dataset join on it),
    never from the order a worker happened to process rows in.
    """
    key = f"{source_name}\x00{split}\x00{row}\x00{sample_index}".encode()
    return hashlib.blake2b(key, digest_size=8).hexdigest()
