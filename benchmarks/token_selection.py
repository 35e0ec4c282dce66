"""Which positions to distil (issue 21): all of them against the top 20% by the student's entropy, by the
teacher's entropy or at random (training time, --token-select), and a cache that stores the teacher's
distribution on 20% of the rows only, chosen by the starting student's entropy (capture time,
--positions-from). Same teacher, data, student, steps and seeds as the quality benchmark
(benchmarks/distillation_quality.py, whose work directory and functions this reuses): exact held-out
KL(teacher||student) on its --encoding full evaluation cache, bytes per token of the distribution,
seconds per step; a difference from "all" counts as real when every seed moves the same way by more
than the seed-to-seed range. Writes benchmarks/results/token_selection.{json,md} and its section of
docs/results.md.

    python benchmarks/token_selection.py --work /work/lc-quality
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import distillation_quality as dq  # noqa: E402  (benchmarks/ is not a package)
from generated import write_block  # noqa: E402

COMPACT = dq.CACHES["compact"]
# key -> (row name, cache, student-train flags)
CONFIGS = {
    "all": ("all positions (fwd KL, compact)", "compact", []),
    "se20": ("student entropy, top 20% (training time)", "compact",
             ["--token-select", "student-entropy", "--top-frac", "0.2"]),
    "te20": ("teacher entropy, top 20% (training time)", "compact",
             ["--token-select", "teacher-entropy", "--top-frac", "0.2"]),
    "rand20": ("random 20% (training time)", "compact", ["--token-select", "random", "--top-frac", "0.2"]),
    "cap20": ("student entropy, 20% chosen at capture (--positions-from)", "compact-positions20", []),
    # the same with hard-label CE on every position beside the distillation (--ce-alpha 0.5)
    "all-ce": ("all positions + CE (alpha 0.5)", "compact", ["--ce-alpha", "0.5"]),
    "se20-ce": ("student entropy, top 20% + CE on all (alpha 0.5)", "compact",
                ["--token-select", "student-entropy", "--top-frac", "0.2", "--ce-alpha", "0.5"]),
    "rand20-ce": ("random 20% + CE on all (alpha 0.5)", "compact",
                  ["--token-select", "random", "--top-frac", "0.2", "--ce-alpha", "0.5"]),
}


def starting_student(work: Path, keep: str) -> Path:
    """The student every run starts from (the teacher's layers ``keep``), saved as a model directory: the
    capture-time rule scores positions with it."""
    out = work / f"student-init-{keep.replace(':', '')}"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from logitcache.teacher.embedded import embedded_teacher_dir
        from student_train.model import drop_layers, parse_keep_layers

        src = embedded_teacher_dir("smollm2-135m")
        teacher = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        drop_layers(teacher, parse_keep_layers(keep, teacher.config.num_hidden_layers)).save_pretrained(out)
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"SmolLM2-135M-Instruct teacher; student: its layers `{a['keep_layers']}`; {a['steps']} steps of "
             f"{a['batch_size']} x {a['seq_len']}, lr {a['lr']}, seeds {', '.join(map(str, a['seeds']))}; "
             f"{res['train_pairs']} training pairs, held-out exact KL on {res['eval_tokens']} tokens of an "
             f"`--encoding full` cache; {res['machine']}.",
             "",
             "| rule | held-out KL(p‖q), nats | vs all | distribution B/token | distilled share | s/step |",
             "|---|---:|---|---:|---:|---:|"]
    for c in res["configs"]:
        share = c.get("selected_share")
        vs = "—" if c["vs_baseline"] == "baseline" else f"{c['delta_kl']:+.3f} ({c['vs_baseline']})"
        lines.append(f"| {c['name']} | {c['kl_forward_exact']:.3f} ± {c['kl_forward_exact_sd']:.3f} | {vs} | "
                     f"{c['dist_bytes_per_token']:.1f} | {'—' if share is None else f'{share:.2f}'} | "
                     f"{c['seconds_per_step']:.2f} |")
    lines += ["", "s/step: wall clock on a 2-core machine other jobs shared; rows reused from an earlier invocation "
                  "(--reuse) keep that invocation's timing, so compare seconds only between rows run together."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/work/lc-quality", help="the quality benchmark's work directory")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--keep-layers", default="every:3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--keep-frac", type=float, default=0.2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--render-only", action="store_true", help="rewrite the .md (and docs) from --out's JSON")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --work")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    work, out = Path(args.work), Path(args.out)
    if args.render_only:
        render(json.loads((out / "token_selection.json").read_text()), out, not args.no_docs)
        return
    log = work / "log.txt"
    if not (work / "train.jsonl").exists():
        raise SystemExit(f"{work}: run benchmarks/distillation_quality.py first (its pairs and caches are reused)")
    score = ["--mode", "score", "--backend", "hf", "--prompt-column", "prompt", "--response-column", "response",
             "--input", str(work / "train.jsonl")]
    student = starting_student(work, args.keep_layers)
    caches = {"compact": dq.capture(work, "compact", [*score, *COMPACT], log),
              "compact-positions20": dq.capture(work, "compact-positions20",
                                                [*score, *COMPACT, "--positions-from", str(student), "--keep-frac",
                                                 str(args.keep_frac)], log)}
    ev = dq.capture(work, "eval-full", ["--mode", "score"], log)           # made by the quality benchmark
    configs = []
    for key in args.configs.split(","):
        name, cache, flags = CONFIGS[key]
        runs = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            run = dq.train(work, cache, flags, f"sel-{key}", seed, args, log)
            report = json.loads((Path(run["student_dir"]).parent / "report.json").read_text())
            logged = [json.loads(x) for x in (Path(run["student_dir"]).parent / "log.jsonl").read_text().splitlines()]
            shares = [x["selected_share"] for x in logged if "selected_share" in x]
            run.update(seconds_per_step=report["seconds_this_run"] / max(report["steps"], 1),
                       selected_share=sum(shares) / len(shares) if shares else None)
            runs.append(run)
            print(f"  {name} seed {seed}: KL {run['end']['kl_forward_exact']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        c = {"key": key, "name": name, "cache": cache, "flags": flags, "runs": runs,
             "dist_bytes_per_token": caches[cache]["dist_bytes_per_token"],
             "seconds_per_step": sum(r["seconds_per_step"] for r in runs) / len(runs),
             "selected_share": (None if runs[0]["selected_share"] is None
                                else sum(r["selected_share"] for r in runs) / len(runs))}
        if key == "cap20":          # the share of scored rows that hold a distribution in the cache
            from logitcache import open_cache
            from logitcache.report.summary import summarize

            ts = summarize(open_cache(caches[cache]["path"]))["token_stats"]
            c["selected_share"] = ts["rows_with_distribution_share"]
        configs.append(c)
    dq.summarise(configs, "all")
    res = {"args": vars(args), "machine": f"{os.cpu_count()} CPU cores", "caches": caches, "eval_tokens":
           ev["scored_tokens"], "train_pairs": sum(1 for _ in open(work / "train.jsonl")), "configs": configs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_selection.json").write_text(json.dumps(res, indent=1, default=str))
    render(res, out, not args.no_docs)


def render(res: dict, out: Path, docs: bool) -> None:
    md = markdown(res)
    (out / "token_selection.md").write_text(md)
    if docs:
        write_block(ROOT / "docs" / "results.md", "token-selection", md,
                    heading="## Which positions to distil: student entropy, teacher entropy, random, at capture")
    print(md)


if __name__ == "__main__":
    main()
