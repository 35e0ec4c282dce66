"""Other tools' caches in and out: one registered class per foreign layout (``base.ForeignFormat``).

- ``distillkit``: DistillKit's parquet of compressed log-probs and bit-packed ids, both ways (the codec
  itself, numpy only, in ``distillkit_codec``; the import in ``distillkit_import``);
- ``axolotl``: the pre-tokenized dataset axolotl's KD plugin trains from, export.

``export_to(cache, out, to=NAME, ...)`` and ``import_from(src, out, from_=NAME, tokenizer=DIR, ...)`` are the
entry points (``logitcache export --to``, ``logitcache import --from``); docs/interop.md says what each
layout holds and what a round trip keeps. Importing this package loads no zarr, torch or transformers.
"""

from . import distillkit  # noqa: F401,I001  (each module registers its class on import)
from . import axolotl  # noqa: F401,I001
from .base import (REGISTRY, ExportReport, ForeignFormat, ImportReport, Option, all_options, format_class, names,
                   option_flags, register)


def export_to(cache, out: str, *, to: str, selection: str | None = None, storage_options: dict | None = None,
              **options) -> ExportReport:
    """Write the samples of ``cache`` (an open cache; ``selection``: a selection file made from it, whose
    samples only are written, in cache order) as format ``to``'s files in the new directory ``out``.
    ``options``: the format's export options by keyword (None: not given)."""
    cls = format_class(to)
    given = cls.check_options(options, importing=False)
    ids = None
    if selection is not None:
        from ..query.selection import check_selection, load_selection

        table, info = load_selection(selection)
        check_selection(table, info, cache, str(selection))
        ids = table.column("sample_id").combine_chunks()
    return cls().export(cache, out, sample_ids=ids, selection=str(selection or ""), storage_options=storage_options,
                        **given)


def import_from(src: str, out: str, *, from_: str, tokenizer: str, storage_options: dict | None = None,
                **options) -> ImportReport:
    """Read format ``from_``'s files at ``src`` into a new cache at ``out`` (``tokenizer``: the teacher's
    tokenizer, a directory or hub id)."""
    cls = format_class(from_, importing=True)
    given = cls.check_options(options, importing=True)
    return cls().import_(src, out, tokenizer=tokenizer, storage_options=storage_options, **given)


__all__ = ["REGISTRY", "ForeignFormat", "Option", "ExportReport", "ImportReport", "register", "names",
           "format_class", "all_options", "option_flags", "export_to", "import_from"]
