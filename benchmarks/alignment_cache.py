"""Cross-tokenizer conversion time per batch, alignments made afresh against kept (OUT/alignments/).

One run, one machine, the same batches: ``CrossTokenizer.convert`` without kept alignments (every
epoch retokenizes and aligns every sample) and with them (epoch 1 makes each shard's alignments the
first time one of its samples is met and writes them; epoch 2 reads them back; a new converter on the
same directory, as after a resume). The student tokenizer is the byte-level BPE of
``benchmarks/cross_tokenizer.py``. Loading the batches is not timed. Writes
benchmarks/results/alignment_cache.json and .md.

    python benchmarks/alignment_cache.py --cache /work/lc-quality/cache-compact --work /tmp/aligncache
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def timed(converter, batches: list[dict]) -> list[float]:
    out = []
    for batch in batches:
        t = time.perf_counter()
        converter.convert(batch)
        out.append(1000 * (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    from benchmarks.cross_tokenizer import make_tokenizer
    from logitcache.align import load_tokenizer
    from logitcache.store.reader import open_cache
    from logitcache.teacher.identity import teacher_directory
    from student_train.cross_tokenizer import CrossTokenizer
    from student_train.data import CacheStream

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cache = open_cache(args.cache)
    teacher = load_tokenizer(teacher_directory(cache.manifest, "this benchmark", "--cache"), "teacher",
                             cache.manifest.tokenizer.vocab_sha256)
    student = make_tokenizer(cache, args.vocab, teacher, work / "tokenizer")
    stream = CacheStream(cache, args.seq_len, args.batch_size, packing=False, seed=0, rank=0, world_size=1)
    epochs = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        epochs.append(list(stream))

    fresh = CrossTokenizer(stream, teacher, student)
    kept = CrossTokenizer(stream, teacher, student, alignments=str(work / "run"))
    rows = {"afresh": [timed(fresh, b) for b in epochs], "kept": [timed(kept, b) for b in epochs]}
    resumed = CrossTokenizer(stream, teacher, student, alignments=str(work / "run"))
    rows["kept, resumed"] = [timed(resumed, epochs[0])]
    files = sorted((work / "run" / "alignments").glob("*/*.npz"))
    result = {"cache": args.cache, "samples": stream.num_samples, "shards": len(files),
              "seq_len": args.seq_len, "batch_size": args.batch_size, "batches_per_epoch": len(epochs[0]),
              "student_vocab": len(student), "alignment_bytes": sum(f.stat().st_size for f in files),
              "ms_per_batch": {name: [{"mean": float(np.mean(t)), "median": float(np.median(t)), "max": float(np.max(t))}
                                      for t in times] for name, times in rows.items()}}
    lines = [f"{stream.num_samples} samples ({len(files)} shard(s)), {len(epochs[0])} batches of "
             f"{args.batch_size} x {args.seq_len} per epoch, student BPE of {len(student)} tokens; "
             f"alignments on disk: {result['alignment_bytes']} bytes.", "",
             "| converter | epoch | ms/batch mean | median | max |", "|---|---:|---:|---:|---:|"]
    for name, per_epoch in result["ms_per_batch"].items():
        for e, s in enumerate(per_epoch):
            lines.append(f"| {name} | {e + 1} | {s['mean']:.2f} | {s['median']:.2f} | {s['max']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "alignment_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "alignment_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
