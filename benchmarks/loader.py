"""The training loader against the reader, measured side by side in one run. Two modes:

``--mode throughput`` (issue 14): tokens/s of the loader (``CacheStream`` + ``make_dataloader``) per
encoding, with and without a hidden layer, local and ``memory://``, at several batch shapes, against
``read_rows`` of the same arrays (see ``throughput``); writes OUT/loader_throughput.{json,md} and the
"Loader throughput" block of docs/training.md.

``--mode verify`` (the default; issue 12): what verified reads cost, with and without the checks of
format 1.3:

Builds two synthetic caches holding the very same arrays and samples (top-k 64 ids and fp16 log-probs,
entropy, target log-prob, optionally a bf16 hidden layer; samples of realistic lengths, 256 per
shard, written by the real shard writer):

- ``v1.3``: the format as written now: crc32c inside every chunk, Parquet page checksums, the shard
  records' metadata and samples checksums;
- ``v1.2``: the layout of the previous format (no crc32c, no per-file checksums in the records).

and times, interleaved round by round (best of ``--rounds``):

1. the reader alone: ``read_rows`` of every array of every shard (a first pass over a cache);
2. the training loader: ``CacheStream`` + ``make_dataloader`` at ``--batch`` x ``--seq-len``, a full
   epoch, tokens/s;

for: v1.3 read as every command reads it (all checks on); the same v1.3 cache with the reader's own
checks off (``verify_reads=False``; zarr still checks crc32c); v1.2 read with checks off (the reader
of the previous release: the baseline); v1.2 read with checks on (shards of earlier formats are
verified whole on first read).

    python benchmarks/loader.py                    # 2M tokens: a few minutes on 2 CPU cores
    python benchmarks/loader.py --tokens 200000 --out /tmp/lb   # smoke run
    python benchmarks/loader.py --mode throughput  # 2M tokens per encoding: ~15 minutes on 2 CPU cores

Writes OUT/loader.json (every number and round, the machine) and OUT/loader.md.
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

from logitcache import __version__
from logitcache.format import SAMPLES_SCHEMA, layout
from logitcache.format.arrays import array_specs
from logitcache.store.fs import CacheFS
from logitcache.store.reader import open_cache
from logitcache.store.shard_writer import write_shard
from logitcache.store.synthetic import synthetic_manifest

from generated import write_block  # benchmarks/ (the script's directory) is on sys.path

VOCAB, K, HIDDEN = 49152, 64, 576
CONFIGS = [  # (name, cache, verify_reads, what it is)
    ("v1.3, checks on", "v1.3", True, "this release, as every command reads"),
    ("v1.3, reader checks off", "v1.3", False, "verify_reads=False (zarr still checks crc32c)"),
    ("v1.2, checks off", "v1.2", False, "the previous release's reader: the baseline"),
    ("v1.2, checks on", "v1.2", True, "an earlier-format cache today: shards verified whole on first read"),
]


def build(root: Path, tokens: int, hidden: bool, checksum: bool, seed: int = 0) -> dict:
    """A cache of about ``tokens`` tokens (same rng seed: the same data for both layouts)."""
    rng = np.random.default_rng(seed)
    layers = [30] if hidden else []
    specs = array_specs(VOCAB, K, "float16", layers, HIDDEN, "bfloat16")
    cfs = CacheFS(str(root))
    records, made, j = [], 0, 0
    while made < tokens:
        lengths = np.clip(rng.lognormal(5.5, 0.6, 256), 16, 2048).astype(np.int64)
        n = int(lengths.sum())
        ent = rng.gamma(1.5, 0.6, n).astype(np.float32)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        ent[offsets] = np.nan                           # first row of each sample unscored
        lp = np.sort(-rng.exponential(1.5, (n, K)), axis=1)[:, ::-1].astype(np.float16)
        lp[offsets] = np.nan
        arrays = {"tokens": rng.integers(0, VOCAB, n).astype(np.uint16),
                  "topk_ids": rng.integers(0, VOCAB, (n, K)).astype(np.uint16),
                  "topk_logprobs": lp, "entropy": ent, "target_logprob": -rng.exponential(1.0, n).astype(np.float32)}
        for layer in layers:
            arrays[f"hidden/{layer}"] = rng.standard_normal((n, HIDDEN)).astype(np.float32)
        name = layout.shard_name("ibench0002", j)
        m = len(lengths)
        table = pa.table({
            "sample_id": [f"{j:08x}{i:08x}" for i in range(m)], "shard": [name] * m, "token_offset": offsets,
            "num_tokens": lengths.astype(np.int32), "prompt_tokens": np.ones(m, np.int32),
            "response_tokens": (lengths - 1).astype(np.int32), "scored_start": np.ones(m, np.int32),
            "scored_end": lengths.astype(np.int32), "mean_entropy": np.ones(m, np.float32),
            "max_entropy": np.ones(m, np.float32), "p90_entropy": np.ones(m, np.float32),
            "teacher_logprob_sum": -np.ones(m), "finish_reason": ["length"] * m, "source": ["s"] * m,
            "split": [""] * m, "row": np.arange(m, dtype=np.int64), "sample_index": np.zeros(m, np.int32),
            "prompt": ["p"] * m, "response": ["r"] * m}).cast(SAMPLES_SCHEMA)
        # scored rows are [1, n): the last row's next token is not in the sample, as in a capture
        table = table.set_column(table.schema.get_field_index("scored_end"), "scored_end",
                                 pa.array((lengths - 1).astype(np.int32)))
        w = write_shard(cfs, name, arrays, specs, table, checksum=checksum)
        records.append(w.record("ibench0002", j, worker=0))
        made += n
        j += 1
    manifest = synthetic_manifest("ibench0002", specs, records, vocab=VOCAB, hidden=HIDDEN, top_k=K, layers=layers,
                                  created_by=f"benchmarks/loader.py (logitcache {__version__})")
    if not checksum:
        manifest.format_version = "1.2"
    cfs.write_atomic(layout.MANIFEST, manifest.to_json().encode())
    return {"tokens": made, "shards": len(records),
            "mb": sum(r.bytes for r in records) / 1e6}


def read_all(root: Path, verify_reads: bool) -> int:
    cache = open_cache(str(root), verify_reads=verify_reads)
    n = 0
    for s in cache.shards:
        rows = cache.read_rows(s.name, 0, s.tokens)
        n += len(rows["tokens"])
    return n


def stream_epoch(root: Path, verify_reads: bool, batch: int, seq_len: int, hidden: bool) -> int:
    from student_train.data import CacheStream, make_dataloader

    cache = open_cache(str(root), verify_reads=verify_reads)
    stream = CacheStream(cache, seq_len=seq_len, batch_size=batch, seed=0, rank=0, world_size=1,
                         hidden_layers=[30] if hidden else [])
    tokens = 0
    for b in make_dataloader(stream):
        tokens += int((b["document_ids"] != 0).sum())
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--hidden", action="store_true", help="add a bf16 hidden layer of width 576")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--render-only", action="store_true", help="rewrite loader.md and the docs from loader.json")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/reliability.md and the README")
    ap.add_argument("--mode", choices=["verify", "throughput"], default="verify",
                    help="verify: the cost of verified reads (issue 12); throughput: loader against raw reads")
    ap.add_argument("--teacher-cache", default=str(Path(__file__).resolve().parents[1] / "demo_out" / "cache"),
                    help="throughput: a compact capture of the embedded teacher whose rows are resampled")
    ap.add_argument("--encodings", default="compact,topk,sampled", help="throughput: encodings to measure")
    ap.add_argument("--storages", default="local,memory", help="throughput: local and/or memory")
    ap.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES), help="throughput: BxT,...")
    ap.add_argument("--loader-tokens", type=int, default=2_000_000,
                    help="throughput: stop a loader run after this many scored tokens")
    ap.add_argument("--no-hidden", action="store_true", help="throughput: no hidden layer anywhere")
    ap.add_argument("--stem", default="loader_throughput", help="throughput: OUT/<stem>.json and .md")
    ap.add_argument("--baseline", default="",
                    help="throughput: FILE:LABEL:SOURCE, a JSON of this mode run on an earlier loader (FILE relative "
                         "to benchmarks/), shown as xN per cell")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="throughput: skip the cProfile run per encoding (local, no hidden, the last shape)")
    args = ap.parse_args()
    if args.mode == "throughput":
        out = Path(args.out)
        if args.render_only:
            publish_throughput(json.loads((out / f"{args.stem}.json").read_text()), out, not args.no_docs, args.stem)
            return
        results = throughput(args)
        if args.baseline:
            file, label, source = args.baseline.split(":", 2)
            results["baseline"] = {"file": file, "label": label, "source": source}
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.stem}.json").write_text(json.dumps(results, indent=1) + "\n")
        publish_throughput(results, out, not args.no_docs, args.stem)
        return
    if args.render_only:
        publish(json.loads((Path(args.out) / "loader.json").read_text()), Path(args.out), docs=not args.no_docs)
        return
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    t0 = time.perf_counter()
    results = {"args": vars(args), "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                               "torch": torch.__version__, "pyarrow": pa.__version__,
                                               "logitcache": __version__}}
    try:
        results["caches"] = {"v1.3": build(work / "v1.3", args.tokens, args.hidden, True),
                             "v1.2": build(work / "v1.2", args.tokens, args.hidden, False)}
        print("built", results["caches"], flush=True)
        runs = {name: {"read_s": [], "stream_s": []} for name, *_ in CONFIGS}
        for r in range(args.rounds):
            for name, which, verify, _ in CONFIGS:
                t = time.perf_counter()
                n = read_all(work / which, verify)
                runs[name]["read_s"].append(time.perf_counter() - t)
                runs[name]["read_tokens"] = n
                t = time.perf_counter()
                n = stream_epoch(work / which, verify, args.batch, args.seq_len, args.hidden)
                runs[name]["stream_s"].append(time.perf_counter() - t)
                runs[name]["stream_tokens"] = n
                print(f"round {r}: {name}: read {runs[name]['read_s'][-1]:.2f} s, "
                      f"stream {runs[name]['stream_s'][-1]:.2f} s", flush=True)
        base = runs["v1.2, checks off"]
        for name, run in runs.items():
            run["read_tokens_per_s"] = run["read_tokens"] / min(run["read_s"])
            run["stream_tokens_per_s"] = run["stream_tokens"] / min(run["stream_s"])
            run["read_cost"] = min(run["read_s"]) / min(base["read_s"]) - 1
            run["stream_cost"] = min(run["stream_s"]) / min(base["stream_s"]) - 1
        results["runs"] = runs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.json").write_text(json.dumps(results, indent=1) + "\n")
    publish(results, out, docs=not args.no_docs)


def publish(results: dict, out: Path, docs: bool) -> None:
    """loader.md, and (``docs``) the generated blocks of docs/reliability.md and the README's numbers."""
    md = render(results)
    (out / "loader.md").write_text(md + "\n")
    if docs:
        root = Path(__file__).resolve().parents[1]
        write_block(root / "docs" / "reliability.md", "loader", md.split("\n", 2)[2] +
                    "\n\n(`benchmarks/loader.py`; the query engine's cost: `benchmarks/results/query_samples.md`)")
        r = results["runs"]
        write_block(root / "README.md", "loader-cost",
                    f"training loader epoch {100 * r['v1.3, checks on']['stream_cost']:+.1f}%, "
                    f"read_rows of every array {100 * r['v1.3, checks on']['read_cost']:+.1f}% "
                    "(run-to-run spread a few %)", inline=True)
    print(md)


def render(results: dict) -> str:
    a, m, c = results["args"], results["machine"], results["caches"]
    lines = ["# loader benchmark: the cost of verified reads", "",
             f"{c['v1.3']['tokens']:,} tokens in {c['v1.3']['shards']} shards of 256 samples (top-k {K} ids + fp16 "
             f"log-probs, entropy, target log-prob{', a bf16 hidden layer of 576' if a['hidden'] else ''}); "
             f"{c['v1.3']['mb']:.0f} MB as format 1.3, {c['v1.2']['mb']:.0f} MB as 1.2. Machine: {m['cpus']} CPUs, "
             f"torch {m['torch']} (1 thread), Python {m['python']}. Best of {a['rounds']} interleaved rounds; the files "
             "are in the OS page cache.", "",
             f"| reader | read_rows, every array (tokens/s) | cost | loader epoch, {a['batch']} x {a['seq_len']} "
             "(tokens/s) | cost |", "|---|---:|---:|---:|---:|"]
    for name, _, _, what in CONFIGS:
        r = results["runs"][name]
        lines.append(f"| {name}: {what} | {r['read_tokens_per_s']:,.0f} | {100 * r['read_cost']:+.1f}% | "
                     f"{r['stream_tokens_per_s']:,.0f} | {100 * r['stream_cost']:+.1f}% |")
    lines += ["", "Cost: time against the baseline (v1.2, checks off) in the same run."]
    return "\n".join(lines)



# ---- throughput (issue 14) ------------------------------------------------------------------------

ENCODINGS = {"compact": {"name": "compact", "top_p": 0.99, "bits": 8, "lo": -16.0},
             "topk": {"name": "topk"},
             "sampled": {"name": "sampled", "draws": 64, "temperature": 1.0}}
SHAPES = [(4, 256), (8, 1024), (8, 2048)]
LAYER = 30


class TeacherRows:
    """Scored token rows of a real capture (the embedded teacher's: ``make demo`` writes demo_out/cache,
    compact), to resample from: each synthetic token takes the stored compact row, entropy and tail of
    one of them, so counts, entropies and id gaps follow the teacher's measured distribution."""

    def __init__(self, url: str):
        cache = open_cache(url)
        enc = cache.manifest.capture.encoding
        if enc.get("name") != "compact" or cache.manifest.teacher.vocab_size != VOCAB:
            raise SystemExit(f"{url}: need a compact cache of a {VOCAB}-token teacher (make demo writes one)")
        counts, ids, codes, tail, entropy, dec_ids, dec_lp = [], [], [], [], [], [], []
        for s in cache.shards:
            r = cache.read_rows(s.name, 0, s.tokens, ["dist/counts", "dist/ids", "dist/codes", "dist/tail", "entropy"])
            rows = cache.teacher_rows(s.name, 0, s.tokens)
            keep = r["dist/counts"] > 0                             # scored rows only
            off = np.concatenate([[0], np.cumsum(r["dist/counts"].astype(np.int64))])
            entries = np.repeat(keep, r["dist/counts"].astype(np.int64))
            counts.append(r["dist/counts"][keep])
            ids.append(r["dist/ids"][entries])
            codes.append(r["dist/codes"][entries])
            tail.append(r["dist/tail"][keep])
            entropy.append(r["entropy"][keep])
            i, lp = rows.padded(K)
            dec_ids.append(i[keep])
            dec_lp.append(lp[keep])
            del off
        self.url = url
        self.counts = np.concatenate(counts).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.ids, self.codes = np.concatenate(ids), np.concatenate(codes)
        self.tail, self.entropy = np.concatenate(tail), np.concatenate(entropy)
        self.dec_ids, self.dec_lp = np.concatenate(dec_ids), np.concatenate(dec_lp)

    def describe(self) -> dict:
        return {"source": self.url, "rows": len(self.counts), "mean_entries": float(self.counts.mean()),
                "entries_p10_p50_p90": np.percentile(self.counts, [10, 50, 90]).tolist(),
                "mean_entropy": float(self.entropy.mean())}

    def compact(self, pick: np.ndarray) -> dict[str, np.ndarray]:
        c = self.counts[pick]
        starts = np.repeat(self.offsets[pick] - np.concatenate([[0], np.cumsum(c)[:-1]]), c)
        entries = starts + np.arange(int(c.sum()))
        return {"dist/counts": c.astype(np.uint8), "dist/ids": self.ids[entries], "dist/codes": self.codes[entries],
                "dist/tail": self.tail[pick]}

    def topk(self, pick: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The row's entries, continued to K by ids and log-probs below its last one (the stored rows
        stop where 99% of the mass is reached)."""
        ids, lp = self.dec_ids[pick].copy(), self.dec_lp[pick].copy()
        c = self.counts[pick]
        beyond = np.arange(K)[None, :] >= c[:, None]
        last = lp[np.arange(len(pick)), c - 1]
        lp = np.where(beyond, last[:, None] - 0.25 * (np.arange(K)[None, :] - c[:, None] + 1), lp)
        ids = np.where(beyond, rng.integers(0, VOCAB, ids.shape), ids)
        return {"topk_ids": ids.astype(np.uint16), "topk_logprobs": lp.astype(np.float16)}

    def sampled(self, pick: np.ndarray, rng: np.random.Generator, draws: int) -> dict[str, np.ndarray]:
        """``draws`` ids per token from the row's distribution (its entries, the tail mass on random ids)."""
        from logitcache.format.encodings import encoding_from

        out = np.empty((len(pick), draws), np.int64)
        for a in range(0, len(pick), 4096):
            p = pick[a:a + 4096]
            probs = np.exp(self.dec_lp[p].astype(np.float64))                        # (n, K), 0 on padding
            cum = np.cumsum(np.concatenate([probs, self.tail[p, None].astype(np.float64)], 1), 1)
            u = rng.random((len(p), draws)) * cum[:, -1:]
            bucket = (cum[:, None, :] <= u[:, :, None]).sum(-1).clip(0, K)          # (n, draws)
            got = np.take_along_axis(np.concatenate([self.dec_ids[p], np.zeros((len(p), 1), np.int64)], 1), bucket, 1)
            out[a:a + len(p)] = np.where(bucket == K, rng.integers(0, VOCAB, bucket.shape), got)
        enc = encoding_from(ENCODINGS["sampled"])
        return enc.encode(1, VOCAB, None, None, None, {"draws": out}, "float16")


def build_encoded(root: Path, encoding: str, tokens: int, hidden: bool, rows: TeacherRows, seed: int = 0) -> dict:
    """A cache of about ``tokens`` tokens in ``encoding`` whose rows are resampled teacher rows
    (256 samples of lognormal lengths per shard, written by the real shard writer, format 1.3)."""
    rng = np.random.default_rng(seed)
    layers = [LAYER] if hidden else []
    top_k = 1 if encoding == "sampled" else K
    specs = array_specs(VOCAB, top_k, "float16", layers, HIDDEN, "bfloat16", ENCODINGS[encoding])
    cfs = CacheFS(str(root))
    records, made, j = [], 0, 0
    while made < tokens:
        lengths = np.clip(rng.lognormal(5.5, 0.6, 256), 16, 2048).astype(np.int64)
        n = int(lengths.sum())
        pick = rng.integers(0, len(rows.counts), n)
        arrays = {"tokens": rng.integers(0, VOCAB, n).astype(np.uint16), "entropy": rows.entropy[pick],
                  "target_logprob": -rng.exponential(1.0, n).astype(np.float32)}
        if encoding == "compact":
            arrays.update(rows.compact(pick))
        elif encoding == "topk":
            arrays.update(rows.topk(pick, rng))
        else:
            arrays.update(rows.sampled(pick, rng, ENCODINGS["sampled"]["draws"]))
        for layer in layers:
            arrays[f"hidden/{layer}"] = rng.standard_normal((n, HIDDEN), dtype=np.float32)
        name = layout.shard_name("ibench0014", j)
        records.append(write_shard(cfs, name, arrays, specs, samples_table(name, j, lengths)).record(
            "ibench0014", j, worker=0))
        made += n
        j += 1
    manifest = synthetic_manifest("ibench0014", specs, records, vocab=VOCAB, hidden=HIDDEN, top_k=top_k,
                                  layers=layers, encoding=ENCODINGS[encoding],
                                  created_by=f"benchmarks/loader.py (logitcache {__version__})")
    cfs.write_atomic(layout.MANIFEST, manifest.to_json().encode())
    sizes = open_cache(str(root)).stored_bytes()
    return {"tokens": made, "shards": len(records), "scored_tokens": sum(r.scored_tokens for r in records),
            "mb": sum(r.bytes for r in records) / 1e6,
            "bytes_per_token": {k: v / made for k, v in sizes.items() if v}}


def samples_table(name: str, j: int, lengths: np.ndarray) -> pa.Table:
    """Samples of a generate-mode shard: a one-token prompt, scored rows [1, n - 1)."""
    m = len(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return pa.table({
        "sample_id": [f"{j:08x}{i:08x}" for i in range(m)], "shard": [name] * m, "token_offset": offsets,
        "num_tokens": lengths.astype(np.int32), "prompt_tokens": np.ones(m, np.int32),
        "response_tokens": (lengths - 1).astype(np.int32), "scored_start": np.ones(m, np.int32),
        "scored_end": (lengths - 1).astype(np.int32), "mean_entropy": np.ones(m, np.float32),
        "max_entropy": np.ones(m, np.float32), "p90_entropy": np.ones(m, np.float32),
        "teacher_logprob_sum": -np.ones(m), "finish_reason": ["length"] * m, "source": ["s"] * m,
        "split": [""] * m, "row": np.arange(m, dtype=np.int64), "sample_index": np.zeros(m, np.int32),
        "prompt": ["p"] * m, "response": ["r"] * m}).cast(SAMPLES_SCHEMA)


def loader_names(cache, hidden: bool) -> list[str]:
    """The arrays the loader reads: tokens, entropy, the encoding's stored arrays, the hidden layer."""
    return ["tokens", "entropy", *cache.encoding.stored_names(), *([f"hidden/{LAYER}"] if hidden else [])]


def raw_read(url: str, hidden: bool) -> tuple[int, float]:
    """``read_rows`` of every shard, whole, of the arrays the loader reads: (scored tokens, seconds)."""
    t = time.perf_counter()
    cache = open_cache(url)
    names = loader_names(cache, hidden)
    scored = 0
    for s in cache.shards:
        cache.read_rows(s.name, 0, s.tokens, names)
        scored += s.scored_tokens
    return scored, time.perf_counter() - t


def loader_run(url: str, hidden: bool, batch: int, seq_len: int, max_tokens: int) -> dict:
    """One epoch of the loader (or its first batches, up to ``max_tokens`` scored tokens): scored tokens,
    input tokens, batches, seconds (from opening the cache to the last batch)."""
    from student_train.data import CacheStream, make_dataloader

    t = time.perf_counter()
    stream = CacheStream(open_cache(url), seq_len=seq_len, batch_size=batch, seed=0, rank=0, world_size=1,
                         hidden_layers=[LAYER] if hidden else [])
    scored = tokens = batches = 0
    for b in make_dataloader(stream):
        scored += int(b["loss_mask"].sum())
        tokens += int((b["document_ids"] != 0).sum())
        batches += 1
        if scored >= max_tokens:
            break
    return {"scored": scored, "tokens": tokens, "batches": batches, "seconds": time.perf_counter() - t}


def profile_run(url: str, batch: int, seq_len: int, max_tokens: int) -> dict:
    """Where one loader run's time goes, from cProfile of the batch-building thread (``prefetch=0``: the
    batches are built in this thread; blocks read ahead by the loader's helper thread are not counted):
    **decode** = calls from the loader into the encoding's decoder (``logitcache/format/encodings``),
    **read** = calls into the reader (``Cache.read_rows`` / ``read_raw``) and waits for blocks read
    ahead, **loader** = the rest (plan, gathering rows, filling the batch tensors), plus the top
    functions by own time."""
    import cProfile
    import pstats

    from student_train.data import CacheStream

    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    stream = CacheStream(open_cache(url), seq_len=seq_len, batch_size=batch, seed=0, rank=0, world_size=1, prefetch=0)
    scored = 0
    for b in stream:
        scored += int(b["loss_mask"].sum())
        if scored >= max_tokens:
            break
    prof.disable()
    total = time.perf_counter() - t
    stats = pstats.Stats(prof).stats

    def entries(into, caller) -> float:
        """Time of calls into the functions ``into(file, name)`` selects from callers ``caller(file)`` selects."""
        spent = 0.0
        for (filename, _, name), (_, _, _, _, callers) in stats.items():
            if into(filename.replace(os.sep, "/"), name):
                spent += sum(c[3] for (cf, _, _), c in callers.items() if caller(cf.replace(os.sep, "/")))
        return spent

    def encodings(f, n=""):
        return "logitcache/format/encodings/" in f

    def reader(f, n=""):
        return f.endswith("logitcache/store/reader.py")

    decode = entries(encodings, lambda f: not encodings(f))                  # the decoder, however reached
    read = (entries(reader, lambda f: not reader(f) and not encodings(f))   # the reader, from outside it ...
            - entries(encodings, reader)                                    # ... less the decoding it called
            + entries(lambda f, n: f.endswith("concurrent/futures/_base.py") and n == "result",
                      lambda f: "student_train/data" in f))                 # waits for blocks read ahead
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    return {"encoding": None, "batch": batch, "seq_len": seq_len, "scored": scored, "seconds": total,
            "scored_per_s": scored / total, "decode_s": decode, "read_s": read,
            "loader_s": total - decode - read,
            "top": [{"function": f"{Path(f).name}:{line}({name})", "own_s": v[2], "cum_s": v[3], "calls": v[1]}
                    for (f, line, name), v in top]}


def to_memory(local: Path, name: str) -> str:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(local), f"/{name}", recursive=True)
    return f"memory://{name}"


def drop_memory(name: str) -> None:
    import fsspec

    fsspec.filesystem("memory").rm(f"/{name}", recursive=True)


def throughput(args) -> dict:
    """Per encoding (a cache of ``--tokens`` resampled teacher rows; compact also with a bf16 hidden
    layer), per storage (local files in the page cache; the same files copied into fsspec's
    ``memory://``), per hidden (off; on for the compact cache) and batch shape: loader scored tokens/s
    against raw ``read_rows`` scored tokens/s of the same arrays, interleaved round by round, best of
    ``--rounds``. Returns the results dict."""
    import torch

    torch.set_num_threads(1)
    rows = TeacherRows(args.teacher_cache)
    work = Path(tempfile.mkdtemp(prefix="loader-throughput-"))
    results = {"mode": "throughput", "args": vars(args), "teacher_rows": rows.describe(),
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                           "pyarrow": pa.__version__, "logitcache": __version__}, "caches": {}, "runs": []}
    encodings = args.encodings.split(",")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    t0 = time.perf_counter()
    try:
        for enc in encodings:
            hidden_too = enc == "compact" and not args.no_hidden
            results["caches"][enc] = build_encoded(work / enc, enc, args.tokens, hidden_too, rows)
            print("built", enc, results["caches"][enc], flush=True)
            for storage in args.storages.split(","):
                url = str(work / enc) if storage == "local" else to_memory(work / enc, f"bench-{enc}")
                for hidden in ([False, True] if hidden_too else [False]):
                    runs = {"raw": []} | {f"{b}x{t}": [] for b, t in shapes}
                    for r in range(args.rounds):
                        runs["raw"].append(raw_read(url, hidden))
                        for b, t in shapes:
                            runs[f"{b}x{t}"].append(loader_run(url, hidden, b, t, args.loader_tokens))
                    raw_rate = max(n / s for n, s in runs["raw"])
                    for b, t in shapes:
                        best = max(runs[f"{b}x{t}"], key=lambda x: x["scored"] / x["seconds"])
                        rate = best["scored"] / best["seconds"]
                        results["runs"].append({
                            "encoding": enc, "storage": storage, "hidden": hidden, "batch": b, "seq_len": t,
                            "loader_scored_per_s": rate, "loader_tokens_per_s": best["tokens"] / best["seconds"],
                            "raw_scored_per_s": raw_rate, "ratio": rate / raw_rate, "best": best,
                            "rounds": runs[f"{b}x{t}"], "raw_rounds": runs["raw"]})
                        print(f"{enc} {storage} hidden={hidden} {b}x{t}: loader {rate:,.0f} scored tok/s, raw "
                              f"{raw_rate:,.0f} ({rate / raw_rate:.2f})", flush=True)
                if storage == "memory":
                    drop_memory(f"bench-{enc}")
            if args.profile:
                b, t = shapes[-1]
                prof = profile_run(str(work / enc), b, t, args.loader_tokens)
                prof["encoding"] = enc
                results.setdefault("profiles", []).append(prof)
                print(f"{enc} profile {b}x{t}: {prof['scored_per_s']:,.0f} scored tok/s under cProfile; decode "
                      f"{prof['decode_s']:.2f} s, read {prof['read_s']:.2f} s, loader {prof['loader_s']:.2f} s", flush=True)
            shutil.rmtree(work / enc, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_seconds"] = time.perf_counter() - t0
    return results


def render_throughput(results: dict, baseline: dict | None = None) -> str:
    a, m, tr = results["args"], results["machine"], results["teacher_rows"]
    caches = results["caches"]
    lines = ["# loader benchmark: throughput of the training loader", "",
             f"Synthetic caches of ~{a['tokens']:,} tokens per encoding (256 samples of lognormal lengths, median "
             f"~245 tokens, per shard; format 1.3, every read verified), written by the real shard writer. Each token "
             f"carries a scored row of the embedded teacher resampled from `{shown(tr['source'])}` ({tr['rows']:,} rows: "
             f"{tr['mean_entries']:.1f} entries per compact row on average, p10/p50/p90 "
             f"{'/'.join(f'{x:.0f}' for x in tr['entries_p10_p50_p90'])}; mean entropy {tr['mean_entropy']:.2f} "
             "nats): compact as stored, topk the same rows continued to 64 entries, sampled 64 draws from them. "
             f"Hidden: one bf16 layer of {HIDDEN} (compact cache only).", "",
             "Stored bytes per token: " + "; ".join(
                 f"{enc} {sum(v for k, v in c['bytes_per_token'].items() if not k.startswith('hidden')):.0f}"
                 + (f" (+ hidden {c['bytes_per_token'].get(f'hidden/{LAYER}', 0):.0f})"
                    if f'hidden/{LAYER}' in c['bytes_per_token'] else "") for enc, c in caches.items()) + ".", "",
             f"Machine: {m['cpus']} CPUs, torch {m['torch']} (1 thread), Python {m['python']}. One process, "
             "`make_dataloader(stream)` with no workers (the stream's own prefetch thread). Best of "
             f"{a['rounds']} interleaved rounds; a loader run stops after {a['loader_tokens']:,} scored tokens "
             "(or the epoch's end) and counts from opening the cache. **raw**: `read_rows` of every whole shard of "
             "the arrays the loader reads (tokens, entropy, the encoding's arrays, the hidden layer), scored tokens "
             "per second of that pass; **ratio** = loader / raw.", "",
             "| encoding | storage | hidden | raw read (scored tok/s) | " +
             " | ".join(f"loader {b}x{t} (scored tok/s, ratio)" for b, t in SHAPES_OF(results)) + " |",
             "|---|---|---|---:|" + "---:|" * len(SHAPES_OF(results))]
    before = {(r["encoding"], r["storage"], r["hidden"], r["batch"], r["seq_len"]): r
              for r in (baseline or {}).get("runs", [])}
    if before:
        at = len(lines) - 2                                              # above the table
        lines[at:at] = [f"**xN**: this loader's rate over that of the loader before it ({baseline['label']}: "
                        f"`{baseline['source']}`, the same benchmark with runs of "
                        f"{baseline['args']['loader_tokens']:,} scored tokens, best of "
                        f"{baseline['args']['rounds']}).", ""]
    keys = list(dict.fromkeys((r["encoding"], r["storage"], r["hidden"]) for r in results["runs"]))
    for enc, storage, hidden in keys:
        rs = [r for r in results["runs"] if (r["encoding"], r["storage"], r["hidden"]) == (enc, storage, hidden)]
        cells = []
        for r in rs:
            old = before.get((enc, storage, hidden, r["batch"], r["seq_len"]))
            gain = f", x{r['loader_scored_per_s'] / old['loader_scored_per_s']:.0f}" if old else ""
            cells.append(f"{r['loader_scored_per_s']:,.0f} ({r['ratio']:.2f}{gain})")
        lines.append(f"| {enc} | {storage} | {'bf16 x ' + str(HIDDEN) if hidden else 'no'} | "
                     f"{rs[0]['raw_scored_per_s']:,.0f} | " + " | ".join(cells) + " |")
    if results.get("profiles"):
        p0 = results["profiles"][0]
        lines += ["", f"Where a loader run's time goes (local, no hidden, {p0['batch']}x{p0['seq_len']}, cProfile of the "
                  "thread building the batches, `prefetch=0`; **decode**: the encoding's decoder, **read**: the reader "
                  "and waits for blocks read ahead, **loader**: the rest):", "",
                  "| encoding | scored tok/s (profiled) | decode | read | loader | top functions by own time |",
                  "|---|---:|---:|---:|---:|---|"]
        for p in results["profiles"]:
            top = "; ".join(f"`{f['function']}` {f['own_s']:.2f} s" for f in p["top"][:4])
            lines.append(f"| {p['encoding']} | {p['scored_per_s']:,.0f} | {100 * p['decode_s'] / p['seconds']:.0f}% | "
                         f"{100 * p['read_s'] / p['seconds']:.0f}% | {100 * p['loader_s'] / p['seconds']:.0f}% | {top} |")
    return "\n".join(lines)


def shown(path: str) -> str:
    """A path as the docs show it: relative to the repository when inside it."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def SHAPES_OF(results: dict) -> list[tuple[int, int]]:
    return list(dict.fromkeys((r["batch"], r["seq_len"]) for r in results["runs"]))


def publish_throughput(results: dict, out: Path, docs: bool, stem: str) -> None:
    """OUT/<stem>.md and (``docs``) the generated block of docs/training.md; the baseline, where
    ``results["baseline"]`` names one (a JSON of this benchmark run on an earlier loader), adds xN."""
    baseline = None
    if results.get("baseline"):
        baseline = json.loads((Path(__file__).resolve().parent / results["baseline"]["file"]).read_text())
        baseline |= {"label": results["baseline"]["label"], "source": results["baseline"]["source"]}
    md = render_throughput(results, baseline)
    (out / f"{stem}.md").write_text(md + "\n")
    if docs:
        root = Path(__file__).resolve().parents[1]
        write_block(root / "docs" / "training.md", "loader-throughput", md.split("\n", 2)[2] +
                    f"\n\n(`python benchmarks/loader.py --mode throughput`; `benchmarks/results/{stem}.md`)",
                    heading="## Loader throughput")
    print(md)


if __name__ == "__main__":
    main()
