"""Generated blocks in the docs: a benchmark rewrites the text between its markers from its JSON, so the
numbers in docs/ are never copied by hand."""

from __future__ import annotations

from pathlib import Path


def write_block(doc: Path, name: str, body: str, heading: str = "", inline: bool = False) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``doc`` with
    ``body`` (``inline``: on the markers' line, as in a table cell); append it (under ``heading``) when
    the markers are not there yet."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text()
    sep = " " if inline else "\n"
    block = f"{start}{sep}{body}{sep}{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    doc.write_text(text)
