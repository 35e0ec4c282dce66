"""How fast `logitcache query` / `select` answer on a 10-million-sample cache, and how fast the
token-level pass that feeds `token_stats` streams entropy.

1. Builds a synthetic cache whose samples table has 10M rows in the real schema (SAMPLES_SCHEMA;
   realistic value distributions; short prompt/response texts drawn from a pool), one
   `samples.parquet` per shard as a capture writes them, plus a `manifest.json`. It has no token
   arrays: the samples-table queries never read them. A `token_stats` derived table with random
   counts is stored and recorded the way `logitcache query` stores it, so queries over it are timed
   too. Two layouts: 256 samples per shard (the capture default: ~39k files) and 16384.
2. Times typical queries and select shortcuts end to end as the CLI runs them (open the cache, make
   the engine and its views, run, fetch the rows as Arrow; writing the selection file for the
   shortcuts), each the best of --repeats runs in this process (the first run is kept too). The
   first query on a cache of many shards builds the samples index (once; timed on its own row),
   as `logitcache query` does; a second table times the same queries on the shards' files alone.
3. Streams the entropy of a smaller synthetic cache with real Zarr arrays through
   `compute_token_stats` (the one-off pass behind `token_stats`) and the `tokens` materialisation,
   and reports tokens per second.

    python benchmarks/query_samples.py                    # 10M rows, both layouts: a few minutes
    python benchmarks/query_samples.py --rows 200000 --out /tmp/qbench   # smoke run

Writes OUT/query_samples.json (every number, every repeat) and OUT/query_samples.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from logitcache import __version__, open_cache
from logitcache.format import SAMPLES_SCHEMA, cache_fingerprint, layout
from logitcache.format.arrays import array_specs
from logitcache.format.manifest import (CaptureConfig, InputSpec, Manifest, ShardRecord, TeacherInfo,
                                        TokenizerInfo)
from logitcache.query import derived
from logitcache.query import token_stats as ts
from logitcache.query.engine import Engine
from logitcache.query.selection import read_selection, write_selection
from logitcache.query.shortcuts import Shortcut, select_samples
from logitcache.store import codecs
from logitcache.store.checksum import recipe_digest, sha256
from logitcache.store.fs import CacheFS
from logitcache.store.shard_writer import samples_parquet, write_shard

from generated import write_block  # benchmarks/ (the script's directory) is on sys.path

QUERIES = [
    ("issue example: filter + sort + limit 1000",
     "SELECT sample_id FROM samples WHERE mean_entropy > 1.5 ORDER BY mean_entropy DESC LIMIT 1000"),
    ("aggregate by finish_reason",
     "SELECT finish_reason, count(*) AS n, avg(mean_entropy) AS h, avg(perplexity) AS ppl FROM samples GROUP BY 1"),
    ("filter returning every matching row",
     "SELECT sample_id, response_tokens FROM samples WHERE response_tokens BETWEEN 100 AND 400 AND p90_entropy > 2"),
    ("point lookup of one sample, all columns", "SELECT * FROM samples WHERE sample_id = '{probe}'"),
    ("join token_stats, rank by forking tokens",
     "SELECT s.sample_id, t.high_entropy_share FROM samples s JOIN token_stats t USING (sample_id) "
     "WHERE s.response_tokens > 64 ORDER BY t.high_entropy_share DESC LIMIT 1000"),
]
SHORTCUTS = [
    ("select --by mean_entropy --top-frac 0.3", Shortcut("mean_entropy", top_frac=0.3)),
    ("select --by perplexity --max 3.0", Shortcut("perplexity", max=3.0)),
    ("select --by high_entropy_share --top-frac 0.1", Shortcut("high_entropy_share", top_frac=0.1)),
]
THRESHOLD = 1.0


def fake_manifest(num_rows: int, shards: list[ShardRecord], top_k: int = 64, input_key: str = "ibench0000") -> Manifest:
    specs = array_specs(49152, top_k, "float16", [], 576, "bfloat16")
    return Manifest(
        teacher=TeacherInfo("synthetic", "synthetic", "", "sha256-edges:synthetic", "LlamaForCausalLM", 30, 576,
                            49152, 8192, "bfloat16", "hf"),
        tokenizer=TokenizerInfo(49152, "0" * 64, 1, [2], 2, ""),
        capture=CaptureConfig(mode="generate", top_k=top_k, logprob_dtype="float16", with_prompt=False,
                              hidden_layers=[], hidden_dtype="bfloat16", max_length=8192, truncate=False,
                              samples_per_shard=max(s.samples for s in shards), max_new_tokens=2048),
        arrays=specs, codecs=codecs.describe(specs),
        inputs=[InputSpec(input_key, "synthetic.jsonl", "synthetic.jsonl", "", {"prompt": "prompt"}, None,
                          num_rows, len(shards))],
        shards=shards, complete=True, created_by=f"benchmarks/query_samples.py (logitcache {__version__})")


def synthetic_columns(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    prompt = rng.integers(16, 400, n).astype(np.int32)
    response = np.clip(rng.lognormal(5.0, 0.9, n), 1, 2048).astype(np.int32)
    mean_h = rng.gamma(2.0, 0.55, n).astype(np.float32)
    p90 = (mean_h + rng.gamma(2.0, 0.5, n)).astype(np.float32)
    mean_lp = -rng.gamma(2.0, 0.35, n)
    return {
        "num_tokens": prompt + response, "prompt_tokens": prompt, "response_tokens": response,
        "scored_start": prompt - 1, "scored_end": prompt + response - 1,
        "mean_entropy": mean_h, "max_entropy": (p90 + rng.gamma(2.0, 1.0, n)).astype(np.float32), "p90_entropy": p90,
        "teacher_logprob_sum": mean_lp * response, "finish_reason": np.where(rng.random(n) < 0.85, "stop", "length"),
        "sample_id": np.array([f"{x:016x}" for x in rng.integers(0, 2**63, n)]),
    }


def build_samples_cache(root: Path, rows: int, per_shard: int, seed: int = 0) -> dict:
    """A cache of `rows` samples (no arrays), `per_shard` per shard, plus a recorded token_stats table."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    cols = synthetic_columns(rows, rng)
    pool = pa.array([" ".join(rng.choice(["the", "cat", "proof", "so", "thus", "x", "=", "2", "is", "and"],
                                         int(rng.integers(8, 40)))) for _ in range(4096)])
    prompts, responses = rng.integers(0, 4096, rows), rng.integers(0, 4096, rows)
    cfs = CacheFS(str(root))
    records = []
    for j, start in enumerate(range(0, rows, per_shard)):
        stop = min(start + per_shard, rows)
        name = layout.shard_name("ibench0000", j)
        n = stop - start
        lengths = cols["num_tokens"][start:stop]
        table = pa.table({
            "sample_id": cols["sample_id"][start:stop], "shard": pa.array([name] * n),
            "token_offset": np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]),
            **{k: cols[k][start:stop] for k in ("num_tokens", "prompt_tokens", "response_tokens", "scored_start",
                                                "scored_end", "mean_entropy", "max_entropy", "p90_entropy",
                                                "teacher_logprob_sum", "finish_reason")},
            "source": pa.array(["synthetic.jsonl"] * n), "split": pa.array([""] * n),
            "row": np.arange(start, stop, dtype=np.int64), "sample_index": np.zeros(n, np.int32),
            "prompt": pool.take(pa.array(prompts[start:stop])), "response": pool.take(pa.array(responses[start:stop])),
        }).select(SAMPLES_SCHEMA.names).cast(SAMPLES_SCHEMA)
        data = samples_parquet(table)                 # as a capture writes it: zstd, page checksums
        cfs.write_atomic(layout.shard_samples(name), data)
        scored = int((table["scored_end"].to_numpy() - table["scored_start"].to_numpy()).sum())
        # no arrays: the whole-shard checksum is that of the samples file alone (queries never verify it
        # whole: they check samples_checksum)
        records.append(ShardRecord(name, "ibench0000", j, n, int(lengths.sum()), scored, len(data),
                                   recipe_digest([(layout.SAMPLES, data)]), 0, metadata_checksum=recipe_digest([]),
                                   samples_checksum=sha256(data)))
    manifest = fake_manifest(rows, records)
    cfs.write_atomic(layout.MANIFEST, manifest.to_json().encode())
    build_samples = time.perf_counter() - t0
    # a token_stats table as `logitcache query` would have stored it (random counts; no arrays to stream)
    t1 = time.perf_counter()
    cache = open_cache(str(root))
    high = rng.binomial(cols["response_tokens"], 0.2).astype(np.int32)
    stats = pa.table([pa.array(cols["sample_id"]), pa.array(high), pa.array(high / cols["response_tokens"])],
                     schema=ts.TOKEN_STATS_SCHEMA)
    record = derived.store(cache, "token_stats", {"entropy_threshold": THRESHOLD}, stats, stats.column_names)
    files = record.files
    return {"rows": rows, "samples_per_shard": per_shard, "shards": len(records),
            "samples_parquet_mb": sum(r.bytes for r in records) / 1e6, "token_stats_mb": files[0].bytes / 1e6,
            "build_seconds": build_samples, "token_stats_store_seconds": time.perf_counter() - t1,
            "probe": cols["sample_id"][rows // 2]}


def timed(fn, repeats: int) -> dict:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "first_s": times[0], "all_s": times, "result": out}


def bench_queries(root: Path, info: dict, repeats: int, workdir: Path, index: bool = True) -> list[dict]:
    """``index``: as the CLI runs (the samples index is built by the first query and then used);
    else every query reads the shards' samples files (index_min_shards out of reach)."""
    rows = []
    min_shards = 256 if index else 1 << 62
    t = timed(lambda: cache_fingerprint(open_cache(str(root)).manifest) and None, repeats)
    rows.append({"what": "open cache + fingerprint (manifest of %d shards)" % info["shards"], **t, "rows": None})
    if index:
        t = timed(lambda: Engine(open_cache(str(root)), THRESHOLD, index_min_shards=min_shards)
                  .run("SELECT count(*) AS n FROM samples").table["n"][0].as_py(), 1)
        rows.append({"what": "first query: count(*), builds the samples index (once per cache)", **t,
                     "rows": t.pop("result")})
    for label, sql in QUERIES:
        sql = sql.format(probe=info["probe"])

        def q(sql=sql):
            return Engine(open_cache(str(root)), THRESHOLD, index_min_shards=min_shards).run(sql).table.num_rows

        t = timed(q, repeats)
        rows.append({"what": label, "sql": sql, **t, "rows": t.pop("result")})
    for label, sc in SHORTCUTS:
        out = workdir / "sel.parquet"

        def s(sc=sc, out=out):
            cache = open_cache(str(root))
            res = select_samples(cache, sc, threshold=THRESHOLD, index_min_shards=min_shards)
            write_selection(res.table, str(out), cache, res.sql, shortcut=sc.describe())
            return res.table.num_rows

        t = timed(s, repeats)
        rows.append({"what": label + " (+ write selection)", **t, "rows": t.pop("result")})
        if label == SHORTCUTS[0][0]:
            t = timed(lambda out=out: len(read_selection(str(out), open_cache(str(root)))), repeats)
            rows.append({"what": "read_selection of that file (fingerprint + every id checked)", **t,
                         "rows": t.pop("result")})
    for r in rows:
        r.pop("result", None)
    return rows


def bench_verification(root: Path, info: dict, repeats: int) -> list[dict]:
    """The cost of checking every file DuckDB reads (issue 12): a few queries with the reader's checks
    on (as every command runs them) and off (``verify_reads=False``), interleaved."""
    rows = []
    picks = [QUERIES[0], QUERIES[3]]            # the index (no texts) and the shards' files (all columns)
    for label, sql in picks:
        sql = sql.format(probe=info["probe"])
        times = {True: [], False: []}
        for _ in range(repeats):
            for verify in (True, False):
                t0 = time.perf_counter()
                Engine(open_cache(str(root), verify_reads=verify), THRESHOLD).run(sql)
                times[verify].append(time.perf_counter() - t0)
        on, off = min(times[True]), min(times[False])
        rows.append({"what": label, "on_s": on, "off_s": off, "cost": on / off - 1, "all_on_s": times[True],
                     "all_off_s": times[False]})
    return rows


def bench_token_pass(root: Path, tokens: int, seed: int = 1) -> dict:
    """A cache with real Zarr arrays (top-k 8, no hidden): stream its entropy through compute_token_stats."""
    rng = np.random.default_rng(seed)
    specs = array_specs(49152, 8, "float16", [], 32, "bfloat16")
    cfs = CacheFS(str(root))
    per_sample, per_shard = 512, 256
    n_samples = tokens // per_sample
    records = []
    for j, start in enumerate(range(0, n_samples, per_shard)):
        n = min(per_shard, n_samples - start)
        rows = n * per_sample
        ent = rng.gamma(1.5, 0.6, rows).astype(np.float32)
        ent[::per_sample] = np.nan   # first row of each sample unscored
        arrays = {"tokens": rng.integers(0, 49152, rows).astype(np.uint16),
                  "topk_ids": rng.integers(0, 49152, (rows, 8)).astype(np.uint16),
                  "topk_logprobs": (-rng.exponential(2.0, (rows, 8))).astype(np.float16),
                  "entropy": ent, "target_logprob": -rng.exponential(1.0, rows).astype(np.float32)}
        name = layout.shard_name("ibench0001", j)
        table = pa.table({
            "sample_id": [f"{start + i:016x}" for i in range(n)], "shard": [name] * n,
            "token_offset": np.arange(n, dtype=np.int64) * per_sample, "num_tokens": np.full(n, per_sample, np.int32),
            "prompt_tokens": np.ones(n, np.int32), "response_tokens": np.full(n, per_sample - 1, np.int32),
            "scored_start": np.ones(n, np.int32), "scored_end": np.full(n, per_sample, np.int32),
            "mean_entropy": np.ones(n, np.float32), "max_entropy": np.ones(n, np.float32),
            "p90_entropy": np.ones(n, np.float32), "teacher_logprob_sum": -np.ones(n),
            "finish_reason": ["length"] * n, "source": ["s"] * n, "split": [""] * n,
            "row": np.arange(start, start + n, dtype=np.int64), "sample_index": np.zeros(n, np.int32),
            "prompt": ["p"] * n, "response": ["r"] * n,
        })
        w = write_shard(cfs, name, arrays, specs, table)
        records.append(w.record("ibench0001", j, worker=0))
    cfs.write_atomic(layout.MANIFEST, fake_manifest(n_samples, records, top_k=8, input_key="ibench0001").to_json().encode())
    cache = open_cache(str(root))
    t0 = time.perf_counter()
    stats = ts.compute_token_stats(cache, THRESHOLD)
    t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    files = derived.tokens(cache, persist=True)
    t_tokens = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_rows = Engine(open_cache(str(root))).run("SELECT count(*) AS n FROM tokens WHERE entropy > 1").table
    t_query = time.perf_counter() - t0
    return {"tokens": n_samples * per_sample, "samples": n_samples, "shards": len(records),
            "token_stats_seconds": t_stats, "token_stats_tokens_per_s": n_samples * per_sample / t_stats,
            "tokens_view_materialise_seconds": t_tokens,
            "tokens_view_tokens_per_s": n_samples * per_sample / t_tokens,
            "tokens_view_mb": sum(cfs.size(f) for f in files) / 1e6,
            "tokens_view_count_query_seconds": t_query, "check_rows": stats.num_rows,
            "tokens_over_1_nat": n_rows["n"][0].as_py()}


def render(results: dict) -> str:
    m = results["machine"]
    lines = ["# query_samples benchmark", "",
             f"Synthetic samples table of {results['rows']:,} rows (SAMPLES_SCHEMA). Machine: {m['cpus']} CPUs, "
             f"duckdb {m['duckdb']}, pyarrow {m['pyarrow']}, Python {m['python']}. Times: end to end as the CLI "
             f"runs them (open cache, build the views, run, fetch as Arrow), best of {results['repeats']} "
             "(first run in brackets); files are in the OS page cache (built just before).", ""]
    for lay in results["layouts"]:
        b = lay["build"]
        lines += [f"## {b['samples_per_shard']} samples per shard: {b['shards']:,} samples.parquet files, "
                  f"{b['samples_parquet_mb']:.0f} MB", "",
                  f"Built in {b['build_seconds']:.0f} s; token_stats table {b['token_stats_mb']:.0f} MB.", "",
                  "| query | rows out | best s | (first s) |", "|---|---:|---:|---:|"]
        for r in lay["queries"]:
            rows = "" if r["rows"] is None else f"{r['rows']:,}"
            lines.append(f"| {r['what']} | {rows} | {r['best_s']:.2f} | ({r['first_s']:.2f}) |")
        lines.append("")
        if "queries_without_index" in lay:
            lines += ["Without the samples index (every query opens every shard's samples.parquet):", "",
                      "| query | rows out | best s | (first s) |", "|---|---:|---:|---:|"]
            for r in lay["queries_without_index"]:
                rows = "" if r["rows"] is None else f"{r['rows']:,}"
                lines.append(f"| {r['what']} | {rows} | {r['best_s']:.2f} | ({r['first_s']:.2f}) |")
            lines.append("")
        if "verification" in lay:
            lines += ["Read verification (every file DuckDB reads checked against its checksum first), on against "
                      "off (`verify_reads=False`), interleaved:", "",
                      "| query | checks on, s | checks off, s | cost |", "|---|---:|---:|---:|"]
            for r in lay["verification"]:
                lines.append(f"| {r['what']} | {r['on_s']:.2f} | {r['off_s']:.2f} | {100 * r['cost']:+.0f}% |")
            lines.append("")
    t = results["token_pass"]
    lines += ["## Token-level pass (real Zarr arrays)", "",
              f"{t['tokens']:,} tokens in {t['shards']} shards ({t['samples']:,} samples of 512 tokens, top-k 8).", "",
              "| step | seconds | tokens/s |", "|---|---:|---:|",
              f"| compute_token_stats (stream entropy, per-sample counts) | {t['token_stats_seconds']:.2f} | "
              f"{t['token_stats_tokens_per_s']:,.0f} |",
              f"| materialise the tokens view ({t['tokens_view_mb']:.0f} MB Parquet) | "
              f"{t['tokens_view_materialise_seconds']:.2f} | {t['tokens_view_tokens_per_s']:,.0f} |",
              f"| then `SELECT count(*) FROM tokens WHERE entropy > 1` | {t['tokens_view_count_query_seconds']:.2f} | |",
              ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--layouts", default="256,16384", help="samples per shard, comma-separated")
    ap.add_argument("--token-rows", type=int, default=4_000_000, help="tokens of the token-pass cache")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--workdir", default=None, help="where the synthetic caches go (default: a temporary directory)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown and docs from the JSON")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite the block in docs/reliability.md")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render_only:
        publish(json.loads((out / "query_samples.json").read_text()), out, docs=not args.no_docs)
        return
    import duckdb

    t0 = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="query-bench-"))
    results = {"rows": args.rows, "repeats": args.repeats, "layouts": [],
               "machine": {"cpus": os.cpu_count(), "duckdb": duckdb.__version__, "pyarrow": pa.__version__,
                           "python": platform.python_version(), "logitcache": __version__}}
    try:
        for per_shard in (int(x) for x in args.layouts.split(",")):
            root = work / f"samples-{per_shard}"
            build = build_samples_cache(root, args.rows, per_shard)
            print(f"built {build['shards']} shards in {build['build_seconds']:.0f} s", flush=True)
            entry = {"build": build}
            for key, index in (("queries_without_index", False), ("queries", True)):  # before the index exists
                if not index and per_shard < 256:
                    continue
                entry[key] = bench_queries(root, build, args.repeats, work, index=index)
                for r in entry[key]:
                    print(f"  {key} {r['what']}: {r['best_s']:.2f} s", flush=True)
            entry["verification"] = bench_verification(root, build, args.repeats)
            results["layouts"].append(entry)
            shutil.rmtree(root)
        results["token_pass"] = bench_token_pass(work / "tokens", args.token_rows)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results["wall_seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "query_samples.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    publish(results, out, docs=not args.no_docs)


def publish(results: dict, out: Path, docs: bool) -> None:
    """query_samples.md, and (``docs``) the read-verification block of docs/reliability.md."""
    md = render(results)
    (out / "query_samples.md").write_text(md + "\n")
    if docs:
        lines = ["| samples per shard (files) | query | checks on, s | checks off, s | cost |", "|---|---|---:|---:|---:|"]
        for lay in results["layouts"]:
            b = lay["build"]
            for r in lay.get("verification", []):
                lines.append(f"| {b['samples_per_shard']:,} ({b['shards']:,}) | {r['what']} | {r['on_s']:.2f} | "
                             f"{r['off_s']:.2f} | {100 * r['cost']:+.0f}% |")
        write_block(Path(__file__).resolve().parents[1] / "docs" / "reliability.md", "query-verification",
                    f"SQL over a samples table of {results['rows']:,} rows, as the CLI runs it, with every file DuckDB "
                    "reads checked first (on) and without (`verify_reads=False`), best of "
                    f"{results['repeats']} interleaved (`benchmarks/query_samples.py`):\n\n" + "\n".join(lines))
    print(md)


if __name__ == "__main__":
    main()
