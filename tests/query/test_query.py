"""Queries, select shortcuts, derived token statistics, selection files and exports, each checked
against the same thing computed directly with pyarrow / numpy over the stored Parquet and Zarr."""

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

from logitcache import open_cache
from logitcache.cli.main import cli
from logitcache.format import FORMAT_VERSION, Manifest, cache_fingerprint, layout
from logitcache.format.manifest import manifest_checksum
from logitcache.query import derived, read_selection
from logitcache.query import token_stats as ts
from logitcache.query.engine import Engine, run_query
from logitcache.query.errors import QueryError, SelectionError
from logitcache.query.export import export_selection
from logitcache.query.selection import load_selection, write_selection
from logitcache.query.shortcuts import BY_COLUMNS, Shortcut, select_samples
from logitcache.teacher.capture import CaptureJob, run_capture

DOCS = Path(__file__).resolve().parents[2] / "docs"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def capture(cache, teacher, **kw):
    base = dict(cache=str(cache), teacher=str(teacher), progress=False, encoding="topk", top_k=4, samples_per_shard=4, backend="hf",
                limit=10, max_new_tokens=10, hidden_layers=[-1])
    base.update(kw)
    run_capture(CaptureJob(**base))
    return open_cache(str(cache))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_teacher):
    """Generate mode over 10 builtin prompts, 3 shards; prompt rows are unscored (NaN entropy)."""
    path = tmp_path_factory.mktemp("query") / "cache"
    capture(path, tiny_teacher)
    return path


@pytest.fixture(scope="module")
def thr(cache_dir) -> float:
    """An entropy threshold that splits this cache's scored tokens in two (the tiny teacher is peaked)."""
    e = np.concatenate(list(raw_entropy(open_cache(str(cache_dir))).values()))
    return float(np.median(e))


@pytest.fixture
def cache(cache_dir, tmp_path):
    """A fresh copy per test, so derived tables written by one test do not leak into another."""
    import shutil

    shutil.copytree(cache_dir, tmp_path / "cache")
    return open_cache(str(tmp_path / "cache"))


def raw_entropy(cache) -> dict[str, np.ndarray]:
    """Per sample id, the entropy of its scored rows, read with zarr alone."""
    out = {}
    for s in cache.shards:
        g = zarr.open_group(str(Path(cache.url) / layout.shard_arrays(s.name)), mode="r")
        ent = g["entropy"][:]
        for rec in pq.read_table(Path(cache.url) / layout.shard_samples(s.name)).to_pylist():
            rows = ent[rec["token_offset"]:rec["token_offset"] + rec["num_tokens"]]
            out[rec["sample_id"]] = rows[rec["scored_start"]:rec["scored_end"]]
    return out


def reference_values(cache, by: str, threshold: float) -> dict[str, float | None]:
    """The per-sample value `select --by` ranks on, from pyarrow (samples) or numpy (raw Zarr entropy)."""
    t = cache.samples
    if by in ("high_entropy_share", "high_entropy_tokens"):
        out = {}
        for sid, e in raw_entropy(cache).items():
            high = int((e.astype(np.float64) > threshold).sum())
            out[sid] = high if by == "high_entropy_tokens" else (high / e.size if e.size else None)
        return out
    scored = pc.subtract(t["scored_end"], t["scored_start"]).to_numpy().astype(np.float64)
    if by == "teacher_logprob_mean":
        col = t["teacher_logprob_sum"].to_numpy() / scored
    elif by == "perplexity":
        col = np.exp(-t["teacher_logprob_sum"].to_numpy() / scored)
    else:
        col = t[by].to_numpy().astype(np.float64)
    return {sid: (None if np.isnan(v) else float(v)) for sid, v in zip(t["sample_id"].to_pylist(), col)}


def reference_selection(values: dict, top=None, bottom=None, lo=None, hi=None) -> list[str]:
    items = [(v, sid) for sid, v in values.items() if v is not None]
    if top is not None or bottom is not None:
        frac = top if top is not None else bottom
        k = math.ceil(frac * len(items) - 1e-9)
        key = (lambda x: (-x[0], x[1])) if top is not None else (lambda x: (x[0], x[1]))
        return [sid for _, sid in sorted(items, key=key)[:k]]
    keep = [(v, sid) for v, sid in items if (lo is None or v >= lo) and (hi is None or v <= hi)]
    return [sid for _, sid in sorted(keep, key=lambda x: (-x[0], x[1]))]


# ---- SQL -----------------------------------------------------------------------------------------
def test_query_equals_the_same_selection_with_pyarrow(cache):
    t = cache.samples
    cut = float(np.median(t["mean_entropy"].to_numpy()))
    got = run_query(cache, f"SELECT sample_id, mean_entropy FROM samples WHERE mean_entropy > {cut} "
                           "ORDER BY mean_entropy DESC LIMIT 3").table
    ref = t.filter(pc.greater(t["mean_entropy"].cast(pa.float64()), cut)).sort_by([("mean_entropy", "descending")])
    assert got["sample_id"].to_pylist() == ref["sample_id"].to_pylist()[:3]
    # every stored column reads back as stored, and the computed ones equal numpy
    full = run_query(cache, "SELECT * FROM samples").table
    for name in t.column_names:
        assert full[name].to_pylist() == t[name].to_pylist(), name
    scored = (t["scored_end"].to_numpy() - t["scored_start"].to_numpy()).astype(np.float64)
    np.testing.assert_allclose(full["teacher_logprob_mean"].to_numpy(), t["teacher_logprob_sum"].to_numpy() / scored)
    np.testing.assert_allclose(full["perplexity"].to_numpy(), np.exp(-t["teacher_logprob_sum"].to_numpy() / scored))
    agg = run_query(cache, "SELECT finish_reason, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1").table.to_pylist()
    ref = pc.value_counts(t["finish_reason"]).to_pylist()
    assert agg == sorted([{"finish_reason": r["values"], "n": r["counts"]} for r in ref], key=lambda r: r["finish_reason"])


def test_the_samples_index_gives_the_same_answers(cache):
    queries = ["SELECT sample_id, mean_entropy, perplexity FROM samples ORDER BY mean_entropy DESC, sample_id",
               "SELECT shard, count(*) AS n, sum(num_tokens) AS t FROM samples GROUP BY 1 ORDER BY 1",
               "SELECT sample_id, shard, token_offset, num_tokens, scored_start, scored_end, teacher_logprob_sum, "
               "finish_reason, source, split, row, sample_index FROM samples"]
    direct = [run_query(cache, q).table for q in queries]
    engine = Engine(cache, index_min_shards=1)   # as on a cache of many shards
    for q, want in zip(queries, direct):
        assert engine.run(q).table.equals(want), q
        assert engine.samples_source == "index"
    (rec,) = open_cache(cache.url).manifest.derived
    assert rec.name == "samples_index" and "prompt" not in rec.columns and sum(f.rows for f in rec.files) == 10
    text = engine.run("SELECT sample_id, response FROM samples WHERE response LIKE '%e%'").table
    assert engine.samples_source == "shards"      # texts are read from the shards' files
    ref = cache.samples.filter(pc.match_substring(cache.samples["response"], "e"))
    assert text["sample_id"].to_pylist() == ref["sample_id"].to_pylist()
    assert engine.run("SELECT * FROM samples").table.num_rows == 10


def test_query_cli_prints_a_table_json_csv_and_writes_a_selection(cache, tmp_path):
    sql = "SELECT sample_id, mean_entropy FROM samples ORDER BY mean_entropy DESC LIMIT 4"
    want = cache.samples.sort_by([("mean_entropy", "descending")])["sample_id"].to_pylist()[:4]
    r = run("query", cache.url, sql)
    assert r.exit_code == 0 and "sample_id" in r.output and "(4 rows)" in r.output and want[0] in r.output
    r = run("query", cache.url, sql, "--json")
    assert [row["sample_id"] for row in json.loads(r.output)] == want
    r = run("query", cache.url, sql, "--csv")
    assert r.output.splitlines()[0] == '"sample_id","mean_entropy"' and len(r.output.splitlines()) == 5
    r = run("query", cache.url, "SELECT sample_id FROM samples", "--max-rows", 2)
    assert "(10 rows; 8 more not shown" in r.output
    r = run("query", cache.url, sql, "--out", tmp_path / "sel.parquet", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["count"] == 4
    assert read_selection(str(tmp_path / "sel.parquet"), cache) == want
    _, info = load_selection(str(tmp_path / "sel.parquet"))
    assert (info.query, info.count, info.cache_fingerprint) == (sql, 4, cache_fingerprint(cache.manifest))


# ---- select shortcuts ----------------------------------------------------------------------------
@pytest.mark.parametrize("by", list(BY_COLUMNS))
def test_select_shortcuts_equal_pyarrow(cache, by, thr):
    values = reference_values(cache, by, thr)
    finite = sorted(v for v in values.values() if v is not None)
    lo, hi = finite[2], finite[-3]
    for kw, ref in [(dict(top_frac=0.3), reference_selection(values, top=0.3)),
                    (dict(bottom_frac=0.25), reference_selection(values, bottom=0.25)),
                    (dict(min=lo), reference_selection(values, lo=lo)),
                    (dict(max=hi), reference_selection(values, hi=hi)),
                    (dict(min=lo, max=hi), reference_selection(values, lo=lo, hi=hi))]:
        got = select_samples(cache, Shortcut(by, **kw), threshold=thr).table
        assert got["sample_id"].to_pylist() == ref, (by, kw)
    assert len(reference_selection(values, top=0.3)) == math.ceil(0.3 * len(finite) - 1e-9)


def test_select_cli_writes_a_selection_file(cache, tmp_path, thr):
    out = tmp_path / "top.parquet"
    r = run("select", cache.url, "--by", "mean_entropy", "--top-frac", 0.3, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["count"] == 3 and s["shortcut"] == "logitcache select --by mean_entropy --top-frac 0.3"
    assert read_selection(str(out), cache) == reference_selection(reference_values(cache, "mean_entropy", thr), top=0.3)
    t = pq.read_table(out)
    assert t.column_names == ["sample_id", "mean_entropy"]
    meta = json.loads(t.schema.metadata[b"logitcache.selection"])
    assert meta["query"].startswith("SELECT sample_id, mean_entropy FROM samples") and meta["count"] == 3
    help_text = run("select", "--help").output
    for name in BY_COLUMNS:
        assert name in help_text


# ---- derived token statistics --------------------------------------------------------------------
@pytest.mark.parametrize("chunk_tokens", [7, 1 << 16])
def test_token_stats_equal_numpy_over_the_raw_zarr_entropy(cache, chunk_tokens, thr):
    got = ts.compute_token_stats(cache, thr, chunk_tokens=chunk_tokens).to_pylist()
    ref = raw_entropy(cache)
    assert [r["sample_id"] for r in got] == cache.samples["sample_id"].to_pylist()
    for r in got:
        e = ref[r["sample_id"]]
        assert e.size > 0 and not np.isnan(e).any()
        high = e.astype(np.float64) > thr
        assert r["high_entropy_tokens"] == int(high.sum())
        assert r["high_entropy_share"] == pytest.approx(high.mean())
    assert 0 < sum(r["high_entropy_tokens"] for r in got) < sum(v.size for v in ref.values())  # a real cut


def test_token_stats_are_materialised_once_and_recorded(cache, monkeypatch, thr):
    before = {s.name: s.checksum for s in cache.shards}
    samples_before = cache.samples
    fp = cache_fingerprint(cache.manifest)
    sql = "SELECT sample_id, high_entropy_share FROM token_stats ORDER BY high_entropy_share DESC, sample_id LIMIT 3"
    first = run_query(cache, sql, threshold=thr).table
    raw = json.loads((Path(cache.url) / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == "1.6"
    (rec,) = raw["derived"]
    assert rec["name"] == "token_stats" and rec["params"] == {"entropy_threshold": thr}
    assert rec["cache_fingerprint"] == fp and rec["columns"] == [c for c, _, _ in ts.TOKEN_STATS_COLUMNS]
    (f,) = rec["files"]
    path = Path(cache.url) / f["path"]
    assert f["path"].startswith("derived/") and path.stat().st_size == f["bytes"] and f["rows"] == 10
    stamp = path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("token stats recomputed")

    monkeypatch.setattr(ts, "compute_token_stats", boom)
    again = open_cache(cache.url)
    assert again.manifest.derived[0].files[0].checksum == f["checksum"]
    assert run_query(again, sql, threshold=thr).table.equals(first)
    assert path.stat().st_mtime_ns == stamp
    # a 1.0 reader sees the same cache: same shards, same samples, same fingerprint
    after = open_cache(cache.url, verify=True)
    assert {s.name: s.checksum for s in after.shards} == before and after.samples.equals(samples_before)
    assert cache_fingerprint(after.manifest) == fp and sorted(p.name for p in (Path(cache.url) / "shards").iterdir()) == sorted(before)
    legacy = dict(raw, format_version="1.0")
    legacy.pop("derived")
    legacy.pop("checksum")
    assert Manifest.from_dict(legacy).shards == after.manifest.shards


def test_a_stale_derived_table_is_recomputed_and_its_file_removed(cache, thr):
    derived.token_stats(cache, thr)
    root = Path(cache.url)
    m = json.loads((root / "manifest.json").read_text())
    rec = m["derived"][0]
    old = root / "derived" / "token_stats-old.parquet"
    (root / rec["files"][0]["path"]).rename(old)
    rec["files"][0]["path"] = "derived/token_stats-old.parquet"
    rec["cache_fingerprint"] = "sha256:" + "0" * 64   # as if shards were added since it was computed
    m["checksum"] = manifest_checksum(m)
    (root / "manifest.json").write_text(json.dumps(m))
    stale = open_cache(cache.url)
    got = derived.token_stats(stale, thr)
    assert got.equals(ts.compute_token_stats(stale, thr))
    (rec,) = open_cache(cache.url).manifest.derived
    assert rec.cache_fingerprint == cache_fingerprint(stale.manifest)
    assert (root / rec.files[0].path).exists() and not old.exists()
    derived.token_stats(stale, 2 * thr)  # another threshold: a second record beside the first
    assert sorted(t.params["entropy_threshold"] for t in open_cache(cache.url).manifest.derived) == [thr, 2 * thr]


def test_no_persist_writes_nothing_into_the_cache(cache):
    manifest = (Path(cache.url) / "manifest.json").read_bytes()
    run_query(cache, "SELECT count(*) FROM token_stats JOIN tokens USING (sample_id)", persist=False)
    assert (Path(cache.url) / "manifest.json").read_bytes() == manifest
    assert not (Path(cache.url) / "derived").exists()


def test_tokens_view_equals_the_arrays(cache, thr):
    sid = cache.samples["sample_id"][4].as_py()
    got = run_query(cache, f"SELECT position, token, entropy, target_logprob FROM tokens "
                           f"WHERE sample_id = '{sid}' ORDER BY position").table
    a = cache.sample(sid)
    assert got["position"].to_pylist() == list(range(len(a["tokens"])))
    assert got["token"].to_pylist() == a["tokens"].tolist()
    ent = got["entropy"].to_numpy(zero_copy_only=False).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(ent), np.isnan(a["entropy"]))  # nulls exactly where unscored
    np.testing.assert_array_equal(ent[~np.isnan(ent)], a["entropy"][~np.isnan(a["entropy"])])
    rows = run_query(cache, "SELECT count(*) AS n, count(entropy) AS scored FROM tokens").table.to_pylist()[0]
    assert rows == {"n": cache.manifest.num_tokens, "scored": sum(s.scored_tokens for s in cache.shards)}
    (rec,) = open_cache(cache.url).manifest.derived
    assert rec.name == "tokens" and len(rec.files) == len(cache.shards)
    # a query can rank samples by their forking tokens, computed either way
    by_tokens = run_query(cache, f"SELECT sample_id, count(*) FILTER (WHERE entropy::DOUBLE > '{thr!r}'::DOUBLE) AS high FROM tokens "
                                 "GROUP BY 1 ORDER BY 1").table
    by_stats = run_query(cache, "SELECT sample_id, high_entropy_tokens AS high FROM token_stats ORDER BY 1",
                         threshold=thr).table
    assert by_tokens["high"].to_pylist() == by_stats["high"].to_pylist()


# ---- export --------------------------------------------------------------------------------------
def test_select_export_round_trip(cache, tmp_path, thr):
    sel = tmp_path / "sel.parquet"
    assert run("select", cache.url, "--by", "high_entropy_share", "--top-frac", 0.5, "--threshold", thr,
               "--out", sel).exit_code == 0
    ids = read_selection(str(sel), cache)
    out = tmp_path / "small"
    r = run("export", cache.url, out, "--selection", sel, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["samples"] == len(ids) == 5
    small = open_cache(str(out), verify=True)
    m = small.manifest
    assert m.complete and m.format_version == FORMAT_VERSION and m.num_samples == len(ids)
    assert m.provenance.source_cache == cache.url and m.provenance.source_fingerprint == cache_fingerprint(cache.manifest)
    assert m.provenance.selection_count == 5 and "high_entropy_share" in m.provenance.selection_query
    assert set(small.samples["sample_id"].to_pylist()) == set(ids)
    src_rows = {r["sample_id"]: r for r in cache.samples.to_pylist()}
    for rec in small.samples.to_pylist():
        s = src_rows[rec["sample_id"]]
        assert {k: v for k, v in rec.items() if k not in ("shard", "token_offset")} == \
               {k: v for k, v in s.items() if k not in ("shard", "token_offset")}
        assert m.provenance.source_shards[rec["shard"]] == s["shard"]
        a, b = small.sample(rec["sample_id"]), cache.sample(rec["sample_id"])
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        raw_a = small.group(rec["shard"])["hidden/2"][rec["token_offset"]:rec["token_offset"] + rec["num_tokens"]]
        raw_b = cache.group(s["shard"])["hidden/2"][s["token_offset"]:s["token_offset"] + s["num_tokens"]]
        np.testing.assert_array_equal(raw_a, raw_b)  # bfloat16 bits copied as stored
    for shard in m.shards:
        rows = small.samples.filter(pc.equal(small.samples["shard"], shard.name))
        assert shard.tokens == pc.sum(rows["num_tokens"]).as_py()
        assert shard.scored_tokens == pc.sum(pc.subtract(rows["scored_end"], rows["scored_start"])).as_py()
    assert [s.name for s in m.shards] == [layout.shard_name(m.inputs[0].key, j) for j in range(len(m.shards))]
    assert m.inputs[0].num_shards == len(m.shards)
    from logitcache.store.commit import finalize
    from logitcache.store.fs import CacheFS

    again = finalize(CacheFS(str(out)))   # an exported cache is complete, and keeps its provenance
    assert again.complete and again.provenance == m.provenance


# ---- fsspec --------------------------------------------------------------------------------------
def test_memory_url_query_select_export(tiny_teacher, text_file, thr):
    import fsspec

    url = "memory://query-test/cache"
    c = capture(url, tiny_teacher, mode="score", source=str(text_file), limit=None, samples_per_shard=3)
    got = run_query(c, "SELECT sample_id FROM samples ORDER BY mean_entropy DESC LIMIT 2").table
    assert got["sample_id"].to_pylist() == c.samples.sort_by([("mean_entropy", "descending")])["sample_id"].to_pylist()[:2]
    res = select_samples(c, Shortcut("high_entropy_tokens", top_frac=0.5), threshold=thr)
    assert res.table["sample_id"].to_pylist() == reference_selection(
        {r["sample_id"]: r["high_entropy_tokens"] for r in ts.compute_token_stats(c, thr).to_pylist()}, top=0.5)
    assert fsspec.filesystem("memory").exists(f"/query-test/cache/{open_cache(url).manifest.derived[0].files[0].path}")
    write_selection(res.table, "memory://query-test/sel.parquet", c, res.sql)
    assert read_selection("memory://query-test/sel.parquet", c) == res.table["sample_id"].to_pylist()
    export_selection(c, "memory://query-test/sel.parquet", "memory://query-test/small")
    small = open_cache("memory://query-test/small", verify=True)
    assert small.samples["sample_id"].to_pylist() == [s for s in c.samples["sample_id"].to_pylist()
                                                       if s in set(res.table["sample_id"].to_pylist())]
    assert run_query(small, "SELECT count(*) AS n FROM tokens").table["n"][0].as_py() == small.manifest.num_tokens


# ---- inspect -------------------------------------------------------------------------------------
def test_inspect_selection_and_plot(cache, tmp_path):
    sel = tmp_path / "sel.parquet"
    run("select", cache.url, "--by", "mean_entropy", "--top-frac", 0.3, "--out", sel)
    r = run("inspect", cache.url, "--selection", sel, "--json", "--plot", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    part = s["selection"]
    assert part["count"] == 3 and part["of_samples"] == 10 and part["fingerprint_matches"] is True
    ids = read_selection(str(sel), cache)
    rows = cache.samples.filter(pc.is_in(cache.samples["sample_id"], pa.array(ids)))
    assert part["per_sample"]["mean_entropy"]["selection"] == pytest.approx(pc.mean(rows["mean_entropy"]).as_py())
    assert part["per_sample"]["mean_entropy"]["cache"] == pytest.approx(pc.mean(cache.samples["mean_entropy"]).as_py())
    ent = np.concatenate([v for k, v in raw_entropy(cache).items() if k in set(ids)])
    assert part["token_stats"]["scored_tokens"] == ent.size
    assert part["token_stats"]["entropy_mean"] == pytest.approx(float(ent.astype(np.float64).mean()), rel=1e-6)
    assert sum(part["token_stats"]["entropy_histogram"]["counts"]) == ent.size
    pos = s["token_stats"]["entropy_by_position"]
    assert sum(pos["tokens"]) == s["scored_tokens"]
    all_ent = raw_entropy(cache)
    first = np.array([v[0] for v in all_ent.values()], dtype=np.float64)
    assert pos["mean"][0] == pytest.approx(first.mean(), rel=1e-6) and pos["start"][0] == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run("inspect", cache.url, "--selection", sel).output
    assert "selection    3 of 10 samples (30.0%)" in text and "mean_entropy" in text


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sql, message", [
    ("SELEC sample_id FROM samples", r"malformed SQL: syntax error at or near \"SELEC\""),
    ("SELECT sample_id FROM samples WHERE mean_entrpy > 1", r"unknown column.*mean_entrpy"),
    ("SELECT sample_id FROM samplez", r"samplez.*the views are samples, token_stats, tokens"),
    ("SELECT high_entropy_shar FROM token_stats", r"unknown column.*high_entropy_shar"),
    ("DROP TABLE samples", r"only a SELECT query can be run"),
    ("SELECT 1; SELECT 2", r"expected one SELECT statement, got 2"),
    ("SELECT mean_entropy FROM samples", r"no sample_id column \(columns: mean_entropy\)"),
    ("SELECT sample_id FROM samples, (SELECT 1 UNION ALL SELECT 2)", r"sample_id '[0-9a-f]{16}' appears more than once"),
])
def test_bad_queries_exit_1_name_the_problem_and_write_nothing(cache, tmp_path, sql, message):
    out = tmp_path / "sel.parquet"
    manifest = (Path(cache.url) / "manifest.json").read_bytes()
    r = run("query", cache.url, sql, "--out", out)
    assert r.exit_code == 1 and re.search(message, r.output), r.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*"))
    assert (Path(cache.url) / "manifest.json").read_bytes() == manifest and not (Path(cache.url) / "derived").exists()


def test_query_errors_from_the_library(cache):
    with pytest.raises(QueryError, match=r"malformed SQL"):
        run_query(cache, "SELECT FROM WHERE")
    with pytest.raises(QueryError, match=r"the query is empty"):
        run_query(cache, "  ;")
    with pytest.raises(QueryError, match=r"the query failed: Conversion Error"):
        run_query(cache, "SELECT CAST(sample_id AS INTEGER) FROM samples")


def test_select_flags_are_checked(cache, tmp_path):
    out = tmp_path / "s.parquet"
    for args, message in [(["--by", "entropy", "--top-frac", 0.1], "cannot select by 'entropy': choose one of mean_entropy"),
                          (["--by", "mean_entropy"], "give one of --top-frac, --bottom-frac, --min or --max"),
                          (["--by", "mean_entropy", "--top-frac", 0.1, "--min", 1], "give one of --top-frac, --bottom-frac, or --min/--max"),
                          (["--by", "mean_entropy", "--top-frac", 1.5], "a fraction must be in (0, 1], got 1.5"),
                          (["--by", "mean_entropy", "--min", 2, "--max", 1], "--min 2.0 is above --max 1.0")]:
        r = run("select", cache.url, *args, "--out", out)
        assert r.exit_code == 1 and message in r.output, r.output
        assert not out.exists()


def test_a_selection_from_another_cache_is_refused(cache, tmp_path, tiny_teacher):
    other = capture(tmp_path / "other", tiny_teacher, limit=4, top_k=2)   # other settings, other samples
    sel = tmp_path / "other.parquet"
    assert run("select", other.url, "--by", "mean_entropy", "--top-frac", 1.0, "--out", sel).exit_code == 0
    fp = cache_fingerprint(other.manifest)
    for args in (["inspect", cache.url, "--selection", sel], ["export", cache.url, tmp_path / "x", "--selection", sel]):
        r = run(*args)
        assert r.exit_code == 1 and f"{sel} was made from another cache ({other.url}, fingerprint {fp})" in r.output, r.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(SelectionError, match=r"was made from another cache"):
        read_selection(str(sel), cache)
    # right fingerprint, ids that are not in the cache (a file edited by hand)
    fake = pa.table({"sample_id": ["0123456789abcdef"] + cache.samples["sample_id"].to_pylist()[:2]})
    write_selection(fake, str(tmp_path / "fake.parquet"), cache, "hand made")
    with pytest.raises(SelectionError, match=r"fake.parquet: 1 sample id\(s\) are not in .* \(first: 0123456789abcdef\)"):
        read_selection(str(tmp_path / "fake.parquet"), cache)
    r = run("export", cache.url, tmp_path / "y", "--selection", tmp_path / "fake.parquet")
    assert r.exit_code == 1 and "1 sample id(s) are not in" in r.output and not (tmp_path / "y").exists()
    # not a selection file at all
    pq.write_table(pa.table({"sample_id": ["a"]}), tmp_path / "plain.parquet")
    with pytest.raises(SelectionError, match=r"plain.parquet: not a logitcache selection file"):
        read_selection(str(tmp_path / "plain.parquet"), cache)
    (tmp_path / "junk.parquet").write_text("nope")
    with pytest.raises(SelectionError, match=r"junk.parquet: not a Parquet file"):
        read_selection(str(tmp_path / "junk.parquet"), cache)
    with pytest.raises(SelectionError, match=r"missing.parquet: no such selection file"):
        read_selection(str(tmp_path / "missing.parquet"), cache)


def test_export_refuses_a_non_empty_target(cache, tmp_path):
    sel = tmp_path / "sel.parquet"
    run("select", cache.url, "--by", "mean_entropy", "--top-frac", 0.2, "--out", sel)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    r = run("export", cache.url, tmp_path / "busy", "--selection", sel)
    assert r.exit_code == 1 and "already exists and is not empty" in r.output
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]


# ---- the fingerprint -----------------------------------------------------------------------------
def test_cache_fingerprint_follows_the_documented_recipe(cache):
    doc = (DOCS / "format.md").read_text()
    code = re.search(r"### Cache fingerprint.*?```python\n(.*?)```", doc, re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    manifest = json.loads((Path(cache.url) / "manifest.json").read_text())
    assert scope["cache_fingerprint"](manifest) == cache_fingerprint(cache.manifest)
    assert scope["cache_fingerprint"](manifest, recipe=1) == cache_fingerprint(cache.manifest, recipe=1)
    m = cache.manifest
    renamed = copy.deepcopy(m)
    renamed.teacher.name, renamed.teacher.source = "x", "/y"
    assert cache_fingerprint(renamed) == cache_fingerprint(m)  # where the teacher was loaded from is not identity
    changed = Manifest.from_dict(m.to_dict())
    changed.shards[0].checksum = "sha256:" + "1" * 64
    assert cache_fingerprint(changed) != cache_fingerprint(m)


def test_selections_of_nothing_and_non_numbers_are_refused(cache, tmp_path):
    out = tmp_path / "s.parquet"
    for args, message in [(("--by", "mean_entropy", "--min", "nan"), "--min must be a finite number, got nan"),
                          (("--by", "mean_entropy", "--max", "inf"), "--max must be a finite number, got inf"),
                          (("--by", "mean_entropy", "--top-frac", "nan"), "a fraction must be in (0, 1], got nan"),
                          (("--by", "mean_entropy", "--top-frac", "0.5", "--threshold", "nan"),
                           "--threshold must be a finite number of nats, got nan"),
                          (("--by", "num_tokens", "--min", "100000"), "the selection is empty: 'logitcache select "
                                                                       "--by num_tokens --min 100000.0' matched no sample")]:
        r = run("select", cache.url, *args, "--out", out)
        assert r.exit_code == 1 and message in r.output, (args, r.output)
    r = run("query", cache.url, "SELECT sample_id FROM samples WHERE num_tokens < 0", "--out", out)
    assert r.exit_code == 1 and "the selection is empty" in r.output and "nothing written" in r.output
    assert not out.exists()
