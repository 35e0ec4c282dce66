"""What verified reads cost: the training loader and the reader on the same data, with and without the
checks of format 1.3 (issue 12), measured side by side in one run.

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
from logitcache.format.manifest import CaptureConfig, InputSpec, Manifest, TeacherInfo, TokenizerInfo
from logitcache.store import codecs
from logitcache.store.fs import CacheFS
from logitcache.store.reader import open_cache
from logitcache.store.shard_writer import write_shard

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
    manifest = Manifest(
        teacher=TeacherInfo("synthetic", "synthetic", "", "sha256-edges:synthetic", "LlamaForCausalLM", 30, HIDDEN,
                            VOCAB, 8192, "bfloat16", "hf"),
        tokenizer=TokenizerInfo(VOCAB, "0" * 64, 1, [2], 2, ""),
        capture=CaptureConfig(mode="generate", top_k=K, logprob_dtype="float16", with_prompt=False,
                              hidden_layers=layers, hidden_dtype="bfloat16", max_length=8192, truncate=False,
                              samples_per_shard=256, max_new_tokens=2048),
        arrays=specs, codecs=codecs.describe(specs),
        inputs=[InputSpec("ibench0002", "synthetic.jsonl", "synthetic.jsonl", "", {"prompt": "prompt"}, None,
                          256 * len(records), len(records))],
        shards=records, complete=True, created_by=f"benchmarks/loader.py (logitcache {__version__})")
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
