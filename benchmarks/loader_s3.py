"""The training loader from object storage against the same cache on local disk, side by side (issue 19).

A compact cache of ``--tokens`` tokens (rows resampled from a real capture, as ``loader.py
--mode throughput`` builds them) is written locally and copied to a real S3 protocol server (moto's,
started here on a free loopback port). Each round runs one epoch of ``CacheStream`` +
``make_dataloader`` at ``--batch`` x ``--seq-len`` from the local copy and one from S3 (the cache
opened fresh each time, as a new training process would), and counts the requests the S3 server
answered during the S3 epoch, by method (GET: metadata and chunk byte ranges; HEAD; LIST). Reported:
scored tokens/s of each, their ratio (goal: S3 >= 50% of local), requests per epoch and per batch.
Then epochs through a local cache layer, ``simplecache::s3://`` with its copies in one fresh directory
(``{"simplecache": {"cache_storage": DIR}}``): cold (every object fetched once; DataLoader workers fill
the directory together, each file's first read under its lock there) and warm (a later process on the
same machine: the copies answer).

    python benchmarks/loader_s3.py                         # ~1M tokens: a few minutes on 2 CPU cores
    python benchmarks/loader_s3.py --tokens 200000 --out /tmp/ls3

Writes OUT/loader_s3.json and OUT/loader_s3.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loader import TeacherRows, build_encoded  # benchmarks/ (the script's directory) is on sys.path

ROOT = Path(__file__).resolve().parents[1]
REQUEST = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP')


class Server:
    """moto's S3 server in its own process (not a thread of this one: it would compete with the loader
    for the GIL), logging one line per request to a file; ``counts()`` tallies the lines since
    ``reset()`` by method (a GET with ``list-type`` in its query is a LIST)."""

    def __init__(self):
        import boto3

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:       # not listening yet
                time.sleep(0.1)
        self.options = {"key": "testing", "secret": "testing",
                        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        self.offset = 0

    def reset(self) -> None:
        self.offset = self.log.stat().st_size

    def counts(self) -> dict:
        with open(self.log) as f:
            f.seek(self.offset)
            text = f.read()
        out: collections.Counter = collections.Counter()
        for method, path in REQUEST.findall(text):
            out["LIST" if method == "GET" and "list-type" in path else method] += 1
        return dict(out)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.log.unlink(missing_ok=True)


def epoch(url: str, options: dict | None, batch: int, seq_len: int, num_workers: int) -> dict:
    """One epoch from opening the cache to the last batch: scored tokens, batches, seconds."""
    from logitcache.store.reader import open_cache
    from student_train.data import CacheStream, make_dataloader

    t = time.perf_counter()
    stream = CacheStream(open_cache(url, storage_options=options), seq_len=seq_len, batch_size=batch, seed=0,
                         rank=0, world_size=1)
    scored = batches = 0
    for b in make_dataloader(stream, num_workers=num_workers):
        scored += int(b["loss_mask"].sum())
        batches += 1
    return {"scored": scored, "batches": batches, "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-workers", default="0", help="comma-separated DataLoader worker counts")
    ap.add_argument("--teacher-cache", default=str(ROOT / "demo_out" / "cache"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    import fsspec
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="loader-s3-"))
    server = Server()
    options = server.options
    t0 = time.perf_counter()
    try:
        cache = build_encoded(work / "cache", "compact", args.tokens, False, TeacherRows(args.teacher_cache))
        fs = fsspec.filesystem("s3", **options)
        fs.put(str(work / "cache"), "bench/cache", recursive=True)
        s3_url = "s3://bench/cache"
        runs = []
        for workers in [int(w) for w in args.num_workers.split(",")]:
            local, remote, requests = [], [], []
            layered = {"cold": [], "warm": []}
            layered_requests = {"cold": [], "warm": []}
            for _ in range(args.rounds):                 # interleaved, so drift hits both
                local.append(epoch(str(work / "cache"), None, args.batch, args.seq_len, workers))
                time.sleep(0.5)                           # the server's log of earlier requests flushed
                server.reset()
                remote.append(epoch(s3_url, options, args.batch, args.seq_len, workers))
                time.sleep(0.5)
                requests.append(server.counts())
                copies = {**options, "simplecache": {"cache_storage": tempfile.mkdtemp(dir=work, prefix="copies-")}}
                for kind in ("cold", "warm"):
                    server.reset()
                    layered[kind].append(epoch(f"simplecache::{s3_url}", copies, args.batch, args.seq_len, workers))
                    time.sleep(0.5)
                    layered_requests[kind].append(server.counts())
            best = lambda xs: max(xs, key=lambda x: x["scored"] / x["seconds"])
            lr, rr = best(local), best(remote)
            row = {"num_workers": workers, "local_scored_per_s": lr["scored"] / lr["seconds"],
                   "s3_scored_per_s": rr["scored"] / rr["seconds"], "batches": rr["batches"],
                   "requests_per_epoch": requests[-1], "local_rounds": local, "s3_rounds": remote,
                   "requests_rounds": requests}
            row["ratio"] = row["s3_scored_per_s"] / row["local_scored_per_s"]
            for kind in ("cold", "warm"):
                b = best(layered[kind])
                row[f"simplecache_{kind}_scored_per_s"] = b["scored"] / b["seconds"]
                row[f"simplecache_{kind}_requests_per_epoch"] = layered_requests[kind][-1]
                row[f"simplecache_{kind}_rounds"] = layered[kind]
            runs.append(row)
            print(f"workers={workers}: local {row['local_scored_per_s']:,.0f}, S3 {row['s3_scored_per_s']:,.0f} scored "
                  f"tok/s ({row['ratio']:.2f}); requests per epoch {requests[-1]} for {rr['batches']} batches; "
                  + "; ".join(f"simplecache:: {kind} {row[f'simplecache_{kind}_scored_per_s']:,.0f} tok/s, "
                              f"{row[f'simplecache_{kind}_requests_per_epoch']}"
                              for kind in ("cold", "warm") if f"simplecache_{kind}_scored_per_s" in row), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    results = {"args": vars(args), "cache": cache, "runs": runs, "wall_seconds": time.perf_counter() - t0,
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_s3.json").write_text(json.dumps(results, indent=1))
    lines = ["# The loader from S3 against local disk", "",
             f"A compact cache of {cache['tokens']:,} tokens ({cache['shards']} shards, {cache['mb']:.1f} MB) on local "
             f"disk and on a real S3 protocol server (moto's, its own process on loopback; this machine: {os.cpu_count()} CPU "
             f"cores); one "
             f"epoch of the training loader at {args.batch} x {args.seq_len} each, the cache opened fresh, best of "
             f"{args.rounds} interleaved rounds. Requests: what the server answered during the S3 epoch.", "",
             "| DataLoader workers | local scored tok/s | S3 scored tok/s | S3 / local | batches | GET | HEAD | LIST | other |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        q = r["requests_per_epoch"]
        other = sum(v for k, v in q.items() if k not in ("GET", "HEAD", "LIST"))
        lines.append(f"| {r['num_workers']} | {r['local_scored_per_s']:,.0f} | {r['s3_scored_per_s']:,.0f} | "
                     f"{r['ratio']:.2f} | {r['batches']} | {q.get('GET', 0)} | {q.get('HEAD', 0)} | {q.get('LIST', 0)} | "
                     f"{other} |")
    lines += ["", "Through a local cache layer, `simplecache::s3://` (its copies in one directory the workers share): "
              "cold, the copies empty (the DataLoader workers fill them together); warm, a later process on the same "
              "machine.", "",
              "| DataLoader workers | epoch | scored tok/s | / local | GET | HEAD | LIST | other |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        for kind in [k for k in ("cold", "warm") if f"simplecache_{k}_requests_per_epoch" in r]:
            q = r[f"simplecache_{kind}_requests_per_epoch"]
            other = sum(v for k, v in q.items() if k not in ("GET", "HEAD", "LIST"))
            speed = r[f"simplecache_{kind}_scored_per_s"]
            lines.append(f"| {r['num_workers']} | {kind} | {speed:,.0f} | {speed / r['local_scored_per_s']:.2f} | "
                         f"{q.get('GET', 0)} | {q.get('HEAD', 0)} | {q.get('LIST', 0)} | {other} |")
    lines += ["", f"Wall time {results['wall_seconds'] / 60:.1f} min. Raw numbers: `loader_s3.json`.", ""]
    (out / "loader_s3.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
