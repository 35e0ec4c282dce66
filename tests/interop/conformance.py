"""The conformance class every foreign format runs (as ``EncodingTests`` for encodings): subclass
``FormatTests``, set ``format_name``, and implement ``read`` (the format's files decoded *independently of
its exporter*, into our row alignment) and ``expected`` (what its values must be, given ours). Then:

- it is registered, and docs/interop.md names it and the release its layout follows;
- every encoding that carries top-k rows (topk, adaptive, compact, full: the committed fixtures; and
  generate-mode caches whose prompt rows are not scored) exports, and reads back with the samples in
  cache order under their ids, tokens equal, the scored rows exactly the trained ones, every row's ids
  equal to ours exactly and its values within the format's stated tolerance of the expected ones;
- a selection keeps only its samples, in cache order;
- the estimated encodings (sampled, hybrid) are refused, naming the encoding; bad options name their flag;
  a non-empty target is refused; a failure leaves the target empty;
- an importing format: export -> import gives back the samples (ids, tokens, scored rows, text) and the
  rows within the tolerance; a damaged file is refused naming the file and the row.

``tests/interop/test_formats.py`` makes one subclass per registered format.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitcache import open_cache
from logitcache.format.errors import LogitcacheError
from logitcache.interop import REGISTRY, export_to, format_class, import_from

from tests.interop.conftest import fixture

DOCS = Path(__file__).resolve().parents[2] / "docs" / "interop.md"
TOPK_ENCODINGS = ["topk", "adaptive", "compact", "full"]


def ours(cache, sample: dict, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sample's rows as the cache decodes them: ids (T, k) (-1 after a row's entries), float32
    log-probs (T, k), scored (T,)."""
    a = sample["token_offset"]
    rows = cache.teacher_rows(sample["shard"], a, a + sample["num_tokens"])
    ids, lp = rows.padded(max(cache.encoding.width(cache.manifest.capture.top_k), k))
    scored = np.zeros(sample["num_tokens"], dtype=bool)
    scored[sample["scored_start"]:sample["scored_end"]] = True
    valid = (ids >= 0) & np.isfinite(lp) & scored[:, None]
    return np.where(valid, ids, -1)[:, :k], np.where(valid, lp, -np.inf)[:, :k], scored


def record_ids(out: Path) -> list[tuple[str, str, int]]:
    """Our record of an export: (sample_id, file, row in file) in the order written."""
    t = pq.read_table(out / ".logitcache" / "samples.parquet")
    return list(zip(t.column("sample_id").to_pylist(), t.column("file").to_pylist(), t.column("file_row").to_pylist()))


class FormatTests:
    format_name: ClassVar[str]
    export_options: ClassVar[dict] = {}
    bad_options: ClassVar[list[tuple[dict, str]]] = []        # (export options, the error's words)

    # ---- what a subclass provides --------------------------------------------------------------------
    def read(self, out: Path) -> dict[tuple[str, int], dict]:
        """{(file, row): {"tokens": (T,), "ids": (T, k) int (-1: none), "values": (T, k), "trained": (T,) bool}}:
        the exported files decoded the way the tool reads them, row j = the teacher after tokens[j]."""
        raise NotImplementedError

    def expected(self, lp: np.ndarray, valid: np.ndarray, options: dict) -> np.ndarray:
        """The values the tool must see for our log-probs ``lp`` (n, k) at entries ``valid``."""
        return lp

    def tolerance(self, expected: np.ndarray, options: dict, report) -> np.ndarray:
        """|read - expected| allowed per entry of ``expected`` (n, k) (``report``: the export's)."""
        raise NotImplementedError

    # ---- the tests ---------------------------------------------------------------------------------------
    @property
    def cls(self):
        return format_class(self.format_name)

    def export(self, src: str, out: Path, **options):
        return export_to(open_cache(src), str(out), to=self.format_name, **{**self.export_options, **options})

    def test_registered_and_documented(self):
        assert REGISTRY[self.format_name] is self.cls and self.cls.name == self.format_name
        doc = DOCS.read_text()
        assert f"--to {self.format_name}" in doc, f"docs/interop.md does not show --to {self.format_name}"
        commit = re.search(r"\b([0-9a-f]{7})\)", self.cls.follows).group(1)
        assert commit in doc, f"docs/interop.md does not name the commit {commit} the {self.format_name} layout follows"

    def check_round_trip(self, src: str, out: Path, report, options: dict) -> int:
        """Every sample of the export equals the cache's: order, ids, tokens, trained rows, values. Returns the
        entries compared."""
        cache = open_cache(src)
        k = self.k_of(report)
        read = self.read(out)
        written = record_ids(out)
        samples = {s["sample_id"]: s for s in cache.samples.to_pylist()}
        assert [sid for sid, _, _ in written] == [s for s in samples if s in {w[0] for w in written}], "cache order"
        assert len(read) == len(written) == report.samples
        compared = 0
        for sid, file, row in written:
            s = samples[sid]
            got = read[(file, row)]
            ids, lp, scored = ours(cache, s, k)
            np.testing.assert_array_equal(got["tokens"], cache.sample(sid, ["tokens"])["tokens"])
            valid = ids >= 0
            np.testing.assert_array_equal(got["trained"], scored & self.trains_empty_rows(valid), err_msg=sid)
            np.testing.assert_array_equal(np.where(valid, got["ids"], -1), ids, err_msg=f"{sid}: ids")
            want = self.expected(lp, valid, options)
            err = np.abs(got["values"].astype(np.float64) - want)[valid]
            tol = self.tolerance(want, options, report)[valid]
            assert (err <= tol).all(), f"{sid}: |error| up to {err.max()} (allowed {tol[np.argmax(err - tol)]})"
            compared += int(valid.sum())
        return compared

    def trains_empty_rows(self, valid: np.ndarray) -> np.ndarray:
        """Which scored rows the tool trains, given their entries (default: every scored row)."""
        return np.ones(valid.shape[0], dtype=bool)

    def k_of(self, report) -> int:
        raise NotImplementedError

    @pytest.mark.parametrize("encoding", TOPK_ENCODINGS)
    def test_every_top_k_encoding_round_trips(self, encoding, tmp_path):
        report = self.export(fixture(encoding), tmp_path / "out")
        assert self.check_round_trip(fixture(encoding), tmp_path / "out", report, self.export_options) > 30
        assert report.tokens == open_cache(fixture(encoding)).manifest.num_tokens

    @pytest.mark.parametrize("encoding", ["topk", "compact", "adaptive"])
    def test_rows_outside_the_response_are_not_trained(self, encoding, generated, tmp_path):
        report = self.export(generated[encoding], tmp_path / "out")
        self.check_round_trip(generated[encoding], tmp_path / "out", report, self.export_options)
        assert report.rows == open_cache(generated[encoding]).manifest.shards[0].scored_tokens

    def test_a_selection_keeps_its_samples_in_cache_order(self, generated, tmp_path):
        from logitcache.query.selection import write_selection

        cache = open_cache(generated["topk"])
        ids = cache.samples.column("sample_id").to_pylist()
        sel = tmp_path / "sel.parquet"
        write_selection(pa.table({"sample_id": [ids[3], ids[0]]}), str(sel), cache, query="test")
        report = export_to(cache, str(tmp_path / "out"), to=self.format_name, selection=str(sel), **self.export_options)
        assert report.samples == 2 and report.selection == str(sel)
        assert [w[0] for w in record_ids(tmp_path / "out")] == [ids[0], ids[3]]
        self.check_round_trip(generated["topk"], tmp_path / "out", report, self.export_options)

    @pytest.mark.parametrize("encoding", ["sampled", "hybrid"])
    def test_estimated_encodings_are_refused(self, encoding, tmp_path):
        with pytest.raises(LogitcacheError, match=f"its encoding {encoding} stores unbiased estimates"):
            self.export(fixture(encoding), tmp_path / "out")
        assert not (tmp_path / "out").exists()

    def test_bad_options_name_their_flag(self, tmp_path):
        assert self.bad_options
        for options, words in self.bad_options:
            with pytest.raises(LogitcacheError, match=words):
                self.export(fixture("topk"), tmp_path / "out", **options)
            assert not (tmp_path / "out").exists()
        other = [o for c in REGISTRY.values() for o in c.export_options
                 if o.name not in {x.name for x in self.cls.export_options}]
        for o in other[:1]:                     # an option of another format only: refused, named
            with pytest.raises(LogitcacheError, match=f"{o.flag} applies to --to .*, not {self.format_name}"):
                self.export(fixture("topk"), tmp_path / "out", **{o.name: o.type(1)})

    def test_a_non_empty_target_is_refused_and_a_failure_leaves_it_empty(self, tmp_path, monkeypatch):
        busy = tmp_path / "busy"
        busy.mkdir()
        (busy / "x").write_text("mine")
        with pytest.raises(LogitcacheError, match="already exists and is not empty"):
            self.export(fixture("topk"), busy)
        assert [p.name for p in busy.iterdir()] == ["x"]
        import sys

        def boom(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(sys.modules[self.cls.__module__], "write_record", boom)      # the last write fails
        with pytest.raises(OSError):
            self.export(fixture("topk"), tmp_path / "new")
        assert not (tmp_path / "new").exists()


class ImportTests:
    """For a format that imports too (mixed into its ``FormatTests`` subclass): ``corrupt(out)`` damages
    one row of an export and returns the words of the error that names its file and row."""

    def corrupt(self, out: Path) -> str:
        raise NotImplementedError

    def import_tolerance(self, values: np.ndarray, report) -> np.ndarray:
        """|imported - ours| allowed per entry of our (n, k) ``values``."""
        return self.tolerance(values, self.export_options, report)

    @pytest.mark.parametrize("encoding", ["topk", "compact"])
    def test_export_then_import_gives_the_samples_back(self, encoding, generated, tokenizer_dir, tmp_path):
        src = open_cache(generated[encoding])
        report = self.export(generated[encoding], tmp_path / "out")
        back = import_from(str(tmp_path / "out"), str(tmp_path / "back"), from_=self.format_name,
                           tokenizer=tokenizer_dir, samples_per_shard=2)
        assert back.samples == report.samples and back.shards == 3
        cache = open_cache(str(tmp_path / "back"), verify=True)
        k = self.k_of(report)
        assert cache.manifest.provenance.imported_from["format"] == self.format_name
        keep = ["sample_id", "num_tokens", "prompt_tokens", "response_tokens", "scored_start", "scored_end", "source",
                "row", "prompt", "response"]
        assert cache.samples.select(keep).to_pylist() == src.samples.select(keep).to_pylist()
        before = {s["sample_id"]: s for s in src.samples.to_pylist()}
        for s in cache.samples.to_pylist():
            ids, lp, scored = ours(src, before[s["sample_id"]], k)
            got_ids, got_lp, got_scored = ours(cache, s, k)
            np.testing.assert_array_equal(got_scored, scored)
            real = ids >= 0
            # the import sorts each row by its decoded values: find each of our ids in its row
            match = (got_ids[:, None, :] == ids[:, :, None]) & real[:, :, None]        # (T, k ours, k theirs)
            assert (match.sum(-1) == real).all(), f"{s['sample_id']}: an id of ours is missing or twice"
            got = np.where(match, got_lp[:, None, :], 0).sum(-1)
            err = np.abs(got[real].astype(np.float64) - lp[real])
            assert (err <= self.import_tolerance(lp, report)[real]).all(), f"{s['sample_id']}: |error| {err.max()}"
            assert (np.diff(got_lp[scored], axis=1) <= 0).all(), "rows are sorted by descending log-prob"

    def test_a_damaged_row_is_refused_naming_file_and_row(self, tokenizer_dir, tmp_path):
        self.export(fixture("topk"), tmp_path / "out")
        words = self.corrupt(tmp_path / "out")
        with pytest.raises(LogitcacheError, match=words):
            import_from(str(tmp_path / "out"), str(tmp_path / "back"), from_=self.format_name, tokenizer=tokenizer_dir)
        assert not (tmp_path / "back").exists()
