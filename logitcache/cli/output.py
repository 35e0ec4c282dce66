"""Printing query results: a terminal table, JSON or CSV (stdout), for `query`, `select`, `inspect`."""

from __future__ import annotations

import io
import json
import math

import click

MAX_CELL = 48


def _cell(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v).replace("\n", "\\n")
    return s if len(s) <= MAX_CELL else s[: MAX_CELL - 1] + "…"


def render_table(table, max_rows: int) -> str:
    """Columns padded to their widest cell; at most ``max_rows`` rows, then a line saying how many more."""
    rows = table.slice(0, max_rows).to_pylist()
    names = table.column_names
    cells = [[_cell(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    more = table.num_rows - len(rows)
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}"
                 + (f"; {more} more not shown: use LIMIT, --csv, --json or --out)" if more > 0 else ")"))
    return "\n".join(lines)


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def rows_json(table) -> str:
    """The rows as a JSON list of objects (NaN and infinities as null)."""
    return json.dumps([_plain(r) for r in table.to_pylist()], indent=1, default=str, allow_nan=False)


def rows_csv(table) -> str:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from ..query.errors import QueryError

    buf = io.BytesIO()
    try:
        pacsv.write_csv(table, buf)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise QueryError(f"the result cannot be written as CSV ({e}); use --json") from None
    return buf.getvalue().decode()


def echo_rows(table, as_json: bool, as_csv: bool, max_rows: int) -> None:
    if as_json:
        click.echo(rows_json(table))
    elif as_csv:
        click.echo(rows_csv(table), nl=False)
    else:
        click.echo(render_table(table, max_rows))
