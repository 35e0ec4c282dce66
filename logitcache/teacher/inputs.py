"""Input rows for a capture: local jsonl/json/parquet/csv files, or a ``datasets`` dataset.

Only the columns a capture needs are read, into one Arrow table that is sliced per shard. Column
roles: ``prompt`` (a user message), ``messages`` (a chat: list of {role, content}), ``text`` (plain
text to score) and ``response`` (an answer to score after ``prompt``); in score mode (format 1.4, on-policy
rounds) also token ids used verbatim: ``prompt_ids`` and ``response_ids`` (lists of ints) and, optionally,
``behaviour_logprobs`` (one float per response token: its log-probability under the policy that sampled it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..format.errors import InputError

BUILTIN_PROMPTS = "builtin:prompts"
# score mode, token ids (1.4): found by these names, before any text column
ID_ROLES = ("prompt_ids", "response_ids", "behaviour_logprobs")
FILE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                 ".pq": "parquet", ".csv": "csv"}


@dataclass
class InputTable:
    source: str          # as the user gave it
    source_name: str     # what sample ids are derived from: file name or dataset name
    split: str
    table: pa.Table      # only the role columns, renamed to their roles
    columns: dict[str, str]  # role -> column name in the source

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def rows(self, start: int, stop: int) -> list[dict]:
        return self.table.slice(start, stop - start).to_pylist()

    def content_digest(self) -> str:
        """``"sha256:<hex>"`` of the rows a capture reads (the role columns, after ``--limit``), so a
        resume (or another worker) can tell whether the input is still the one the cache holds
        (docs/format.md, ``inputs.content``). Per column: text as the byte lengths of its values (-1 for
        null) and their bytes end to end; lists of numbers (token ids, behaviour log-probs) as their
        lengths (-1 for null) and their values as int64 / float64, end to end; other columns (chat
        messages) as canonical JSON, row by row."""
        h = hashlib.sha256()
        for name in self.table.column_names:
            h.update(name.encode() + b"\0")
            col = self.table.column(name)
            numbers = _number_lists(col)
            if numbers is not None:
                h.update(b"".join(numbers))
            elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type):
                arr = col.cast(pa.large_string()).combine_chunks()
                lengths = pc.binary_length(arr).fill_null(-1).to_numpy(zero_copy_only=False).astype("<i8")
                h.update(lengths.tobytes())
                if len(arr):
                    offsets = np.frombuffer(arr.buffers()[1], dtype="<i8")[arr.offset:arr.offset + len(arr) + 1]
                    data = arr.buffers()[2]
                    if data is not None:
                        h.update(memoryview(data)[int(offsets[0]):int(offsets[-1])])
            else:
                for start in range(0, len(col), 1 << 16):
                    rows = col.slice(start, 1 << 16).to_pylist()
                    h.update(json.dumps(rows, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode())
        return "sha256:" + h.hexdigest()


def _number_lists(col: pa.ChunkedArray) -> tuple[bytes, bytes] | None:
    """A column of lists of integers or floats without null elements as (lengths as int64 with -1 for
    null, values as int64 or float64), little endian; None for any other column. Vectorised: one pass
    over the values, whatever the integer or float width the file stored."""
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return None
    wide = pa.int64() if pa.types.is_integer(t.value_type) else (
        pa.float64() if pa.types.is_floating(t.value_type) else None)
    if wide is None:
        return None
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    values = pc.list_flatten(arr)
    if values.null_count:
        return None
    lengths = pc.list_value_length(arr).fill_null(-1).to_numpy(zero_copy_only=False).astype("<i8")
    flat = values.cast(wide).to_numpy(zero_copy_only=False).astype("<i8" if wide == pa.int64() else "<f8")
    return lengths.tobytes(), flat.tobytes()


def builtin_prompts_path() -> Path:
    return Path(str(resources.files("logitcache") / "data" / "prompts.jsonl"))


COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
GLOB_CHARS = set("*?[")


def file_kind(name: str) -> tuple[str | None, str | None]:
    """(file type, compression) of a file name: ``a.jsonl.gz`` -> ("jsonl", "gzip")."""
    p = Path(name)
    compression = COMPRESSIONS.get(p.suffix.lower())
    if compression:
        p = p.with_suffix("")
    return FILE_SUFFIXES.get(p.suffix.lower()), compression


def _read_file(path: Path) -> pa.Table:
    kind, compression = file_kind(path.name)
    if kind is None:
        raise InputError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv "
                         f"(optionally compressed: {', '.join(COMPRESSIONS)})")
    if compression:
        import fsspec

        with fsspec.open(str(path), "rb", compression=compression) as f:
            return _table_from_bytes(path, f.read(), kind)
    return _table_from_bytes(path, None, kind)


def _read_files(source: str, storage_options: dict | None) -> pa.Table:
    """Every file an fsspec URL or glob names (``s3://bucket/data/*.jsonl.gz``, ``data/part-*.parquet``),
    decompressed by suffix, as one table in name order; the files must share their columns."""
    import fsspec

    try:
        files = fsspec.open_files(source, "rb", compression="infer", **(storage_options or {}))
    except Exception as e:   # a missing file system package, no credentials, a bad pattern
        raise InputError(f"{source}: cannot list it ({type(e).__name__}: {e})") from None
    if not files:
        raise InputError(f"{source}: no file matches")
    files = sorted(files, key=lambda f: f.path)
    tables = []
    for of in files:
        kind, _ = file_kind(of.path)
        if kind is None:
            raise InputError(f"{source}: {of.path} has an unknown file type; use .jsonl, .json, .parquet or .csv "
                             f"(optionally compressed: {', '.join(COMPRESSIONS)})")
        try:
            with of as f:
                data = f.read()
        except Exception as e:
            raise InputError(f"{of.path}: cannot read it ({type(e).__name__}: {e})") from None
        tables.append(_table_from_bytes(of.path, data, kind))
    names = tables[0].column_names
    for of, t in zip(files, tables):
        if sorted(t.column_names) != sorted(names):
            raise InputError(f"{source}: {of.path} has columns {t.column_names}, the first file {names}")
    try:
        return pa.concat_tables([t.select(names) for t in tables], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"{source}: its files' columns do not share types ({e})") from None


def _table_from_bytes(path, data: bytes | None, kind: str) -> pa.Table:
    """A table from a file's bytes (``data``), or from the local file ``path`` itself when ``data`` is None."""
    source = path if data is None else pa.BufferReader(data)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq
            return pq.read_table(source)
        if kind == "csv":
            import pyarrow.csv as pcsv
            return pcsv.read_csv(source)
        lines = Path(path).read_text(encoding="utf-8") if data is None else data.decode("utf-8")
        if kind == "json":
            parsed = json.loads(lines)
            if isinstance(parsed, dict):  # {"data": [...]} or column-oriented
                parsed = next((v for v in parsed.values() if isinstance(v, list)), None)
            if not isinstance(parsed, list):
                raise InputError(f"{path}: a .json input must be a list of objects")
            return _table_from_records(path, parsed)
        records = []
        # lines end at "\n" only: str.splitlines would also split inside strings at U+2028, U+0085, ...
        for n, line in enumerate(lines.split("\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        return _table_from_records(path, records)
    except InputError:
        raise
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as {kind}: {e}") from None


def _table_from_records(path: Path, records: list) -> pa.Table:
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError, AttributeError):
        pass
    first_type: dict[str, tuple[int, str]] = {}
    for row, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"{path}, row {row}: expected a JSON object, got {type(rec).__name__}")
        for col, val in rec.items():
            if val is None:
                continue
            kind = type(val).__name__
            seen = first_type.setdefault(col, (row, kind))
            if seen[1] != kind:
                raise InputError(f"{path}, row {row}: column {col!r} holds {kind} where row {seen[0]} holds {seen[1]}")
    raise InputError(f"{path}: rows do not form a table (nested values of different shapes)")


def _read_dataset(name: str, split: str) -> pa.Table:
    import datasets

    try:
        if Path(name, "dataset_dict.json").is_file() or Path(name, "state.json").is_file():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise InputError(f"dataset {name!r}: no split {split!r}; splits: {', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except InputError:
        raise
    except Exception as e:  # missing, offline, unknown split: say which dataset and why
        raise InputError(f"dataset {name!r} (split {split!r}): cannot load it: {e}") from None
    return ds.with_format("arrow")[:]


def load_input(source: str, split: str, roles: dict[str, str | None], mode: str, limit: int | None = None,
               source_name: str | None = None, storage_options: dict | None = None) -> InputTable:
    """Read ``source`` and resolve which columns play which role (explicit names win; otherwise the
    usual names are looked for). Errors name the file and the columns it has."""
    if source in ("builtin", BUILTIN_PROMPTS):
        path = builtin_prompts_path()
        table, name, split = _read_file(path), "logitcache-builtin-prompts", ""
    elif Path(source).expanduser().is_file():
        path = Path(source).expanduser()
        table, name, split = _read_file(path), path.name, ""
    elif Path(source).expanduser().is_dir():  # a dataset saved with save_to_disk, or data files
        path = Path(source).expanduser()
        table, name = _read_dataset(str(path), split), path.name
    elif "://" in source or GLOB_CHARS & set(source):
        table, name, split = _read_files(source, storage_options), source, ""      # fsspec URLs and globs
    elif file_kind(source)[0]:
        raise InputError(f"{source}: no such file")
    else:
        table, name = _read_dataset(source, split), source
    columns = resolve_columns(table.column_names, roles, mode, source)
    if limit is not None:
        if limit < 0:
            raise InputError(f"--limit must be >= 0, got {limit}")
        table = table.slice(0, limit)
    table = table.select(list(columns.values())).rename_columns(list(columns))
    return InputTable(source, source_name or name, split, table, columns)


def resolve_columns(available: list[str], roles: dict[str, str | None], mode: str, source: str) -> dict[str, str]:
    explicit = {role: col for role, col in roles.items() if col}
    for role, col in explicit.items():
        if col not in available:
            raise InputError(f"{source}: no column {col!r} (given as --{role}-column); "
                             f"columns: {', '.join(available)}")
    if explicit:
        chosen = explicit
    elif mode == "generate":
        chosen = {"prompt": "prompt"} if "prompt" in available else (
            {"messages": "messages"} if "messages" in available else {})
    else:
        if "response_ids" in available:      # token ids, used verbatim: before any text column
            chosen = {role: role for role in ID_ROLES if role in available}
        elif "behaviour_logprobs" in available:
            raise InputError(f"{source}: column 'behaviour_logprobs' needs the response as token ids (column "
                             f"'response_ids', with 'prompt_ids'): text would be tokenised anew and the values "
                             f"would not line up; columns: {', '.join(available)}")
        elif "text" in available:
            chosen = {"text": "text"}
        elif "prompt" in available and "response" in available:
            chosen = {"prompt": "prompt", "response": "response"}
        elif "messages" in available:
            chosen = {"messages": "messages"}
        else:
            chosen = {}
    valid = ({"prompt"}, {"messages"}) if mode == "generate" else (
        {"text"}, {"prompt", "response"}, {"messages"}, {"prompt_ids", "response_ids"}, {"response_ids"},
        {"prompt_ids", "response_ids", "behaviour_logprobs"}, {"response_ids", "behaviour_logprobs"})
    if set(chosen) not in [set(v) for v in valid]:
        need = ("--prompt-column or --messages-column" if mode == "generate"
                else "--text-column, --prompt-column with --response-column, --messages-column, or token-id "
                     "columns prompt_ids and response_ids")
        found = f"given {', '.join('--' + r + '-column' for r in chosen)}; " if chosen else ""
        raise InputError(f"{source}: {mode} mode needs {need} ({found}columns: {', '.join(available)})")
    return chosen
