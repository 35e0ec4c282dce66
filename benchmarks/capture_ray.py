"""The local executor against ``--executor ray`` on one machine: the wall time of the whole command in a
fresh process, as a user runs it (Ray's start and the actors' engine loads included), and whether the
two caches are equal element by element.

Three commands per repeat, interleaved, best of ``--repeats`` reported (other load can only add time):
  local    ``logitcache capture`` as it is (torch's default threads: all cores);
  local-1  the same with one torch thread (``OMP_NUM_THREADS=1``), what each Ray actor has;
  ray      ``--executor ray``: a new local Ray, one actor per core at ``--ray-cpus-per-actor 1``.
The Ray cache must equal local-1's (float sums on CPUs depend on the thread count, so not local's).
Results go to ``<out>/capture_ray.json`` and ``<out>/capture_ray.md``; the markdown is printed.

    python benchmarks/capture_ray.py                               # tiny random teacher, 64 prompts
    python benchmarks/capture_ray.py --teacher smollm2-135m --limit 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def tiny_teacher(where: Path) -> Path:
    """The tests' tiny teacher: a 2-layer, d=32 random Llama with SmolLM2's tokenizer."""
    sys.path.insert(0, str(ROOT))
    from logitcache.teacher.embedded import embedded_teacher_dir
    from tests.conftest import make_tiny_teacher

    where.mkdir(parents=True, exist_ok=True)
    return make_tiny_teacher(where, embedded_teacher_dir("smollm2-135m"))


def run(cache: Path, args: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "logitcache.cli.main", "capture", str(cache), *args, "--no-progress",
                          "--json"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"capture failed:\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout)
    return {"wall_s": wall, "capture_s": summary["wall_seconds"], "tokens": summary["tokens"],
            "shards": summary["shards_written"]}


def equal(a: Path, b: Path) -> bool:
    import numpy as np

    from logitcache import open_cache

    ca, cb = open_cache(str(a), verify=True), open_cache(str(b), verify=True)
    if [s.name for s in ca.shards] != [s.name for s in cb.shards] or not ca.samples.equals(cb.samples):
        return False
    for sa, sb in zip(ca.shards, cb.shards):
        ra, rb = ca.read_rows(sa.name, 0, sa.tokens), cb.read_rows(sb.name, 0, sb.tokens)
        if ra.keys() != rb.keys() or not all(np.array_equal(ra[k], rb[k], equal_nan=True) for k in ra):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="default: the tests' tiny random teacher")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--samples-per-shard", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="capture-ray-"))
    teacher = a.teacher or str(tiny_teacher(work / "tiny-teacher"))
    args = ["--teacher", teacher, "--backend", "hf", "--limit", str(a.limit), "--samples-per-shard",
            str(a.samples_per_shard), "--max-new-tokens", str(a.max_new_tokens)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    variants = {"local": ([], env), "local-1": ([], {**env, "OMP_NUM_THREADS": "1"}),
                "ray": (["--executor", "ray"], env)}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(a.repeats):
        for name, (extra, e) in variants.items():
            runs[name].append(run(work / f"{name}-{r}", args + extra, e))
    load = os.getloadavg()[1]                         # over the last 5 minutes: other work on the machine
    same = equal(work / "local-1-0", work / "ray-0")
    best = {k: min(v, key=lambda x: x["wall_s"]) for k, v in runs.items()}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "teacher": a.teacher or "tiny random Llama (tests/conftest.py)", "settings": vars(a), "runs": runs,
              "best": best, "ray_equals_local_1_thread": same, "load_average_5min": load}
    lines = [f"# Local executor vs --executor ray ({result['teacher']}, {result['machine']})", "",
             f"generate mode, {a.limit} builtin prompts, {a.max_new_tokens} new tokens, "
             f"{best['local']['shards']} shards of {a.samples_per_shard}; best of {a.repeats}; wall = the whole "
             f"command in a fresh process; load average {load:.1f} (other work on the machine)", "",
             "| executor | wall (s) | tokens/s of wall |", "|---|---|---|"]
    for name, b in best.items():
        lines.append(f"| {name} | {b['wall_s']:.1f} | {b['tokens'] / b['wall_s']:.0f} |")
    lines += ["", f"Ray cache equals the one-thread local cache element by element: {same}"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture_ray.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "capture_ray.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(work)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
