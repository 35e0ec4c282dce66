"""Distillation quality by encoding and loss, and the teacher-versus-student report (issue 7).

One script, from a clean working directory to ``benchmarks/results/distillation_quality.{md,json}``,
``quality_*.png`` and the tables in ``docs/results.md``:

1. The embedded SmolLM2 teacher writes greedy responses to builtin prompts under vLLM (one capture).
2. Those (prompt, response) pairs are scored by the teacher once per encoding (hf backend, score mode:
   the very same tokens in every cache); a disjoint evaluation set is captured with ``--encoding full``.
3. The same student (the teacher with every third layer kept) trains the same steps on the same rows
   for each (cache, loss) configuration and seed; every run is evaluated against the full
   distribution of the evaluation set: exact KL(teacher || student) and KL(student || teacher) over
   the whole vocabulary, perplexity on the teacher's responses, top-1 agreement.
4. Teacher and students (three depths, and the students pruned by importance) go through the
   evaluation report command, ``student-eval``: arithmetic accuracy, fidelity on the evaluation cache,
   size, latency, throughput (transformers and vLLM) and memory, with the Pareto fronts
   (``benchmarks/results/teacher_vs_students/``).

    python benchmarks/distillation_quality.py                 # ~2.5 h on 2 CPU cores (on-policy rows: ~25 min a seed)
    python benchmarks/distillation_quality.py --quick         # a smoke run, minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from generated import write_block  # noqa: E402  (benchmarks/ is not a package)

# (cache name, capture flags): the encodings compared, all scored over the same tokens
CACHES = {
    "topk-64": ["--encoding", "topk", "--top-k", "64", "--hidden-layers", "-1"],
    "topk-128": ["--encoding", "topk", "--top-k", "128"],
    "adaptive": ["--encoding", "adaptive", "--top-k", "128", "--keep-mass", "0.99"],
    "compact": ["--encoding", "compact", "--top-k", "64", "--keep-mass", "0.99", "--bits", "8"],
    "sampled": ["--encoding", "sampled", "--draws", "64"],
    "hybrid": ["--encoding", "hybrid", "--top-k", "16", "--bits", "10", "--draws", "64"],
    "full": ["--encoding", "full"],        # every value: the dense reference (~65 KB/token)
    # compact + the queries and keys of 3 teacher blocks (those the every:3 student's blocks 3, 7, 10 copy)
    "compact-attn": ["--encoding", "compact", "--top-k", "64", "--keep-mass", "0.99", "--bits", "8",
                     "--attention-layers", "9,21,29"],
}
ROUNDS = "rounds"         # a config trained by student-onpolicy rounds instead of one cache
# key -> (config name, cache, student-train flags)
CONFIGS = {
    "ce": ("CE only (hard labels)", "compact", ["--ce-alpha", "1"]),
    "dense": ("dense fwd KL (every value, --encoding full)", "full", ["--full-targets"]),
    "topk64": ("fwd KL, topk-64", "topk-64", []),
    "topk128": ("fwd KL, topk-128 (lossless top-128)", "topk-128", []),
    "adaptive": ("fwd KL, adaptive p0.99 k<=128", "adaptive", []),
    "compact": ("fwd KL, compact p0.99 k<=64 8-bit (default)", "compact", []),
    "sampled": ("fwd KL, sampled N=64", "sampled", []),
    "hybrid": ("fwd KL, hybrid top-16 + tail draws", "hybrid", []),
    "reverse": ("reverse KL off-policy, compact", "compact", ["--loss", "reverse_kl"]),
    "jsd": ("JSD(0.5) off-policy, compact", "compact", ["--loss", "generalized_jsd", "--loss-arg", "beta=0.5"]),
    "hidden": ("fwd KL + hidden (cosine, layer -1), topk-64", "topk-64", ["--layer-map", "-1:-1", "--hidden-weight", "1"]),
    # students of equal parameter count (67.3M) and equal steps, cut by importance instead of by stride (PRUNE)
    "prune-bi": ("pruned by block influence: 11 of 30 blocks, fwd KL, compact", "compact", []),
    "prune-ll": ("pruned by likelihood drop: 11 of 30 blocks, fwd KL, compact", "compact", []),
    "prune-w": ("pruned by importance, depth + width: 16 blocks, FFN 896 of 1536, fwd KL, compact", "compact", []),
    "attn": ("fwd KL + attention transfer (3 blocks, weight 1), compact", "compact-attn",
             ["--attention-transfer", "3:9,7:21,10:29", "--attention-transfer-weight", "1"]),
    # on-policy: student-onpolicy rounds (the student's own samples scored by the teacher, compact), the same
    # optimizer steps in all (--steps split over --rounds), from the same starting student
    "onpg": ("on-policy, policy gradient (per-token reverse KL, batch-mean baseline)", ROUNDS,
             ["--loss", "policy_gradient"]),
    "onpg0": ("on-policy, policy gradient without a baseline", ROUNDS,
              ["--loss", "policy_gradient", "--loss-arg", "baseline=0"]),
    "onrkl": ("on-policy, reverse KL over the stored distribution", ROUNDS, ["--loss", "reverse_kl"]),
    "gkd": ("GKD mix lambda=0.5: on-policy JSD(0.5) + off-policy fwd KL", ROUNDS,
            ["--loss", "generalized_jsd", "--loss-arg", "beta=0.5", "--offpolicy-cache", "{cache-compact}",
             "--onpolicy-frac", "0.5"]),
}
# key -> student-prune flags: the student is cut from the teacher by importance on the compact cache's tokens
PRUNE = {"prune-bi": ["--depth", "11"], "prune-ll": ["--depth", "11", "--depth-method", "likelihood"],
         "prune-w": ["--depth", "16", "--ffn", "896"]}
DEFAULT_CONFIGS = "ce,dense,compact,hybrid,onpg,onrkl,prune-bi,prune-ll,prune-w,attn"
ONPOLICY_MEASURES = ("kl_reverse_exact", "teacher_logprob_per_token")
BASELINE = "compact"
DIST_PREFIXES = ("topk_", "dist/")


def sh(cmd: list[str], log: Path) -> tuple[dict, float]:
    """Run a command that prints JSON on stdout; its stderr goes to ``log``. Returns (json, seconds)."""
    t0 = time.perf_counter()
    with open(log, "a") as err:
        err.write("\n$ " + " ".join(cmd) + "\n")
        err.flush()
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}; see {log}")
    return json.loads(out.stdout), time.perf_counter() - t0


def capture(work: Path, name: str, flags: list[str], log: Path) -> dict:
    out = work / f"cache-{name}"
    done = work / f"capture-{name}.json"
    if done.exists():                                      # captured by an earlier invocation
        summary, wall = json.loads(done.read_text())
    else:
        summary, wall = sh([str(BIN / "logitcache"), "capture", str(out), "--json", "--no-progress", *flags], log)
        done.write_text(json.dumps([summary, wall]))
    from logitcache import open_cache

    cache = open_cache(str(out), verify=True)
    scored = sum(s.scored_tokens for s in cache.shards)
    stored = cache.stored_bytes()
    per = {k: v / scored for k, v in stored.items() if k.startswith(DIST_PREFIXES)}
    hidden = sum(v for k, v in stored.items() if k.startswith("hidden/")) / scored
    attention = sum(v for k, v in stored.items() if k.startswith("attn/")) / scored
    return {"name": name, "flags": flags, "path": str(out), "encoding": cache.manifest.capture.encoding,
            "top_k": cache.manifest.capture.top_k, "samples": cache.manifest.num_samples, "scored_tokens": scored,
            "dist_bytes_per_token": sum(per.values()), "arrays_bytes_per_token": per, "hidden_bytes_per_token": hidden,
            "attention_bytes_per_token": attention, "wall_s": wall,
            "tokens_per_s": summary["tokens_per_second"]}


def pairs_file(gen_cache: Path, rows: range, path: Path) -> None:
    """(prompt, response) pairs from a generate-mode cache, the turn's end marker left to the template."""
    from logitcache import open_cache

    samples = open_cache(str(gen_cache)).samples.to_pylist()
    with open(path, "w") as f:
        for rec in samples[rows.start:rows.stop]:
            response = rec["response"].replace("<|im_end|>", "").strip()
            if response:
                f.write(json.dumps({"prompt": rec["prompt"], "response": response}) + "\n")


def train(work: Path, cache: str, flags: list[str], tag: str, seed: int, args, log: Path) -> dict:
    out = work / f"run-{tag}-s{seed}"
    if args.reuse and (out / "report.json").exists():     # a finished run of an earlier invocation
        report = json.loads((out / "report.json").read_text())
        return {"seed": seed, "wall_s": 0.0, "student_dir": report["student_dir"], "reused": True,
                "tokens_per_s": report["tokens_per_second"], "start": report["eval_start"], "end": report["eval_end"]}
    student = ["--keep-layers", args.keep_layers]
    if tag in PRUNE:                                  # the student cut by importance, once for every seed
        pruned = work / f"pruned-{tag}"
        if not (pruned / "prune_report.json").exists():
            measured = [r for r in (work / f"pruned-{k}" / "prune_report.json" for k in PRUNE) if r.exists()]
            reuse = ["--importance-from", str(measured[0])] if measured else []     # one measurement for all
            sh([str(BIN / "student-prune"), str(work / "cache-compact"), "--out", str(pruned), "--json",
                *PRUNE[tag], *reuse], log)
        student = ["--student", str(pruned)]
    cmd = [str(BIN / "student-train"), str(work / f"cache-{cache}"), "--out", str(out), "--no-resume",
           *student, "--max-steps", str(args.steps), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", "3", "--seed", str(seed),
           "--eval-cache", str(work / "cache-eval-full"), "--save-every", "1000", "--no-progress", "--json",
           *flags]                                  # a later --keep-layers in flags wins (click)
    report, wall = sh(cmd, log)
    end, start = report["eval_end"], report["eval_start"]
    return {"seed": seed, "wall_s": wall, "student_dir": report["student_dir"],
            "tokens_per_s": report["tokens_per_second"], "start": start, "end": end}


def rounds(work: Path, _cache: str, flags: list[str], tag: str, seed: int, args, log: Path) -> dict:
    """An on-policy run: ``args.rounds`` rounds of student-onpolicy from the same starting student, the prompts
    of the training pairs split between the rounds, ``args.steps`` optimizer steps in all."""
    out = work / f"run-{tag}-s{seed}"
    flags = [f.format(**{"cache-compact": str(work / "cache-compact")}) for f in flags]
    prompts = work / "train.jsonl"
    n = sum(1 for _ in open(prompts))
    cmd = [str(BIN / "student-onpolicy"), "run", str(out), "--keep-layers", args.keep_layers, "--prompts", str(prompts),
           "--prompts-per-round", str(-(-n // args.rounds)), "--rounds", str(args.rounds),
           "--steps-per-round", str(args.steps // args.rounds), "--encoding", "compact", "--backend", "hf",
           "--max-new-tokens", str(args.max_new_tokens), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps", "3", "--seed", str(seed),
           "--eval-cache", str(work / "cache-eval-full"), "--no-progress", "--json", *flags]
    report, wall = sh(cmd, log)
    trains = [r["train"] for r in report["rounds"]]
    return {"seed": seed, "wall_s": wall, "student_dir": report["student_dir"],
            "tokens_per_s": statistics.fmean(t["tokens_per_second"] for t in trains),
            "start": trains[0]["eval_start"], "end": trains[-1]["eval_end"],
            "rounds": [{"samples": r["rollout"]["samples"], "response_tokens": r["rollout"]["response_tokens"],
                        "final_loss": r["train"]["final_loss"], "eval_end": r["train"]["eval_end"]}
                       for r in report["rounds"]]}


def onpolicy_eval(work: Path, student: str, tag: str, args, log: Path) -> dict:
    """The on-policy measures of a trained student: its greedy answers to the held-out prompts scored by the
    teacher with --encoding full (student-onpolicy evaluate)."""
    out = work / f"onpolicy-eval-{tag}"
    metrics, _ = sh([str(BIN / "student-onpolicy"), "evaluate", student, "--prompts", str(work / "eval.jsonl"),
                     "--limit", str(args.eval_prompts), "--out", str(out), "--max-new-tokens", str(args.max_new_tokens),
                     "--no-progress", "--json"], log)
    return metrics


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def compare(d: list[float], noise: float) -> tuple[float, str]:
    """(mean paired difference, verdict): real when every seed moves the same way by more than ``noise``."""
    if not d:
        return 0.0, "no seed in common"
    mean = statistics.fmean(d)
    if len(d) < 2:
        return mean, "one seed: no noise estimate"
    same = all(x > 0 for x in d) or all(x < 0 for x in d)
    return mean, "real" if same and abs(mean) > noise else "within seed noise"


def summarise(configs: list[dict], baseline: str) -> dict:
    """Mean and seed spread of each metric; a difference from the baseline config counts as real when
    it is larger than the seed-to-seed range of either config (paired by seed: same data order). With
    CE-only and dense rows: each row's share of the dense-KD gain over CE-only,
    (KL_CE - KL_row) / (KL_CE - KL_dense), and how far CE and dense separate in units of the larger
    seed range (the table resolves differences of that gain only when this is large)."""
    base = next((c for c in configs if c.get("key") == baseline or c["name"] == baseline), None)
    if base is None:             # a partial invocation (e.g. the on-policy rows alone): no comparisons
        base = {"runs": [], "name": baseline}
    for c in configs:
        for key in ("kl_forward_exact", "kl_reverse_exact", "perplexity", "top1_agreement"):
            xs = [r["end"][key] for r in c["runs"]]
            c[key], c[key + "_sd"] = mean_sd(xs)
            c[key + "_range"] = max(xs) - min(xs)
        for key in ONPOLICY_MEASURES:             # on the student's own greedy text (student-onpolicy evaluate)
            xs = [r["onpolicy"][key] for r in c["runs"] if "onpolicy" in r]
            if len(xs) == len(c["runs"]):
                c["onpolicy_" + key], c["onpolicy_" + key + "_sd"] = mean_sd(xs)
                c["onpolicy_" + key + "_range"] = max(xs) - min(xs)
    by_seed = {r["seed"]: r for r in base["runs"]}
    for c in configs:
        if c is base:
            c["vs_baseline"] = "baseline"
            continue
        if not base["runs"]:
            c["vs_baseline"], c["delta_kl"] = "no baseline in this invocation", 0.0
            continue
        pairs = [(r, by_seed[r["seed"]]) for r in c["runs"] if r["seed"] in by_seed]      # paired by seed
        c["delta_kl"], c["vs_baseline"] = compare([r["end"]["kl_forward_exact"] - b["end"]["kl_forward_exact"]
                                                   for r, b in pairs],
                                                  max(c["kl_forward_exact_range"], base["kl_forward_exact_range"]))
        for key in ONPOLICY_MEASURES:
            name = "onpolicy_" + key
            if name in c and name in base:
                c[name + "_delta"], c[name + "_vs_baseline"] = compare(
                    [r["onpolicy"][key] - b["onpolicy"][key] for r, b in pairs],
                    max(c[name + "_range"], base[name + "_range"]))
    by_key = {c.get("key"): c for c in configs}
    ce, dense = by_key.get("ce"), by_key.get("dense")
    out = {}
    if ce and dense:
        gain = ce["kl_forward_exact"] - dense["kl_forward_exact"]
        spread = max(ce["kl_forward_exact_range"], dense["kl_forward_exact_range"], 1e-9)
        out = {"dense_gain": gain, "ce_dense_over_range": gain / spread}
        for c in configs:
            c["share_of_dense_gain"] = (ce["kl_forward_exact"] - c["kl_forward_exact"]) / gain if gain > 0 else None
    return out


def fmt(x, sd=None, digits=3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd else "")


def write_markdown(res: dict, path: Path) -> str:
    a = res["args"]
    lines = [
        "# Distillation quality by encoding and loss",
        "",
        f"Teacher: embedded SmolLM2-135M-Instruct (30 layers, V = 49152), float32 on {res['machine']}. Data: the "
        f"teacher's greedy responses (≤ {a['max_new_tokens']} new tokens, generated once under vLLM) to "
        f"{res['train_pairs']} builtin prompts, scored once per encoding (score mode, hf backend: the same tokens "
        f"in every cache; {res['caches'][0]['scored_tokens']} scored tokens); evaluation: {res['eval_pairs']} other "
        f"prompts' responses captured with `--encoding full` ({res['eval_tokens']} tokens).",
        f"Student: the teacher keeping layers `{a['keep_layers']}` (weights copied), {a['steps']} AdamW steps, "
        f"batch {a['batch_size']} x {a['seq_len']} tokens (packed), lr {a['lr']}, cosine; seeds {a['seeds']} "
        "(the seed changes the data order). Before training the student is at exact KL "
        f"{res['configs'][0]['runs'][0]['start']['kl_forward_exact']:.2f} nats/token.",
        "",
        "**KL fwd** = exact KL(teacher ‖ student) over the full vocabulary on the evaluation tokens (nats/token, "
        "mean ± sd over seeds); **KL rev** = exact KL(student ‖ teacher); **ppl** = the student's perplexity on the "
        "teacher's responses; **top-1** = agreement of the argmaxes; **B/tok** = bytes per scored token of the "
        "cached distribution (every array of the encoding, compressed, as stored); **share of dense gain** = "
        "(KL_CE − KL_row) / (KL_CE − KL_dense): how much of what training on every value of the teacher's "
        "distribution gains over hard labels the row keeps; **vs default**: the difference in KL fwd from the "
        "default encoding's row, called real when every seed moves the same way and by more than the "
        "seed-to-seed range (max − min) of either row.",
        "",
    ]
    r = res.get("resolution") or {}
    if r:
        lines += [f"Resolution: CE-only and dense KD are {r['dense_gain']:.3f} nats/token apart, "
                  f"{r['ce_dense_over_range']:.0f}x the larger of their seed ranges.", ""]
    lines += ["| configuration | B/tok | KL fwd | share of dense gain | KL rev | ppl | top-1 | vs default |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    caches = {c["name"]: c for c in res["caches"]}
    for c in res["configs"]:
        cache = caches[c["cache"] if c["cache"] != ROUNDS else "compact"]   # a round's cache: compact
        b = cache["dist_bytes_per_token"]
        delta = "" if c["vs_baseline"] == "baseline" else f"{c['delta_kl']:+.3f} ({c['vs_baseline']})"
        if c["cache"] == ROUNDS:
            b = "compact, each round"
        elif "--ce-alpha" in c["flags"] and c["flags"][c["flags"].index("--ce-alpha") + 1] == "1":
            b = "— (labels only)"
        elif "--layer-map" in c["flags"]:
            hidden = cache.get("hidden_bytes_per_token")
            b = f"{b:.0f} + hidden" + (f" {hidden:.0f}" if hidden else "")
        elif "--attention-transfer" in c["flags"]:
            b = f"{b:.0f} + q/k {cache.get('attention_bytes_per_token', 0):.0f}"
        else:
            b = f"{b:.0f}"
        share = c.get("share_of_dense_gain")
        share = "—" if share is None or c.get("key") in PRUNE else f"{share:.0%}"   # another student: not comparable
        lines.append(f"| {c['name']} | {b} | {fmt(c['kl_forward_exact'], c['kl_forward_exact_sd'])} | {share} | "
                     f"{fmt(c['kl_reverse_exact'], c['kl_reverse_exact_sd'])} | {fmt(c['perplexity'], None, 2)} | "
                     f"{fmt(c['top1_agreement'], c['top1_agreement_sd'])} | {delta or 'baseline'} |")
    onp = [c for c in res["configs"] if "onpolicy_kl_reverse_exact" in c]
    if onp:
        base = next(c for c in res["configs"] if c.get("key") == res.get("baseline"))
        lines += ["", "### On-policy against off-policy", "",
                  f"The same students measured on their own text: each answers the {res['eval_pairs']} held-out prompts "
                  "greedily (≤ "
                  f"{a['max_new_tokens']} tokens) and the teacher scores the answers with `--encoding full` "
                  "(`student-onpolicy evaluate`). **KL rev (own text)** = exact KL(student ‖ teacher) per token of "
                  "those answers, what on-policy training minimises; **teacher log-lik** = the teacher's mean "
                  "log-probability per token of them (higher: text the teacher finds more likely); **KL fwd** as "
                  f"above (teacher text). On-policy rows: {a.get('rounds', 2)} rounds, the {res['train_pairs']} "
                  "training prompts split between them, the same optimizer steps and batch as every other row "
                  f"(a fresh optimizer and warmup each round); compared with `{base['name']}` by seed.", "",
                  "| configuration | KL fwd (teacher text) | KL rev (own text) | vs default | teacher log-lik (own text) "
                  "| vs default | mean answer tokens |",
                  "|---|---:|---:|---|---:|---|---:|"]
        for c in onp:
            def vs(key):
                if c is base:
                    return "baseline"
                return f"{c['onpolicy_' + key + '_delta']:+.3f} ({c['onpolicy_' + key + '_vs_baseline']})"
            answer = statistics.fmean(r["onpolicy"]["mean_response_tokens"] for r in c["runs"])
            lines.append(f"| {c['name']} | {fmt(c['kl_forward_exact'], c['kl_forward_exact_sd'])} | "
                         f"{fmt(c['onpolicy_kl_reverse_exact'], c['onpolicy_kl_reverse_exact_sd'])} | "
                         f"{vs('kl_reverse_exact')} | "
                         f"{fmt(c['onpolicy_teacher_logprob_per_token'], c['onpolicy_teacher_logprob_per_token_sd'])} | "
                         f"{vs('teacher_logprob_per_token')} | {answer:.1f} |")
        lines += ["", "![off-policy against on-policy](quality_onpolicy.png)"]
    lines += ["", "## The caches", "",
              "| cache | encoding | B/tok (distribution) | per array (B/tok) |",
              "|---|---|---:|---|"]
    for c in res["caches"]:
        per = ", ".join(f"{k} {v:.1f}" for k, v in c["arrays_bytes_per_token"].items())
        lines.append(f"| {c['name']} | `{json.dumps(c['encoding'])}` k={c['top_k']} | {c['dist_bytes_per_token']:.1f} | "
                     f"{per} |")
    lines += ["", "Bytes are per scored token (the responses), as stored (compressed), for the arrays of the "
              "distribution only; `tokens`, `entropy` and `target_logprob` add ~5 B/token to every cache, "
              "`samples.parquet` ~2. Write and read speeds of each encoding: `encodings.md`."]
    if res.get("models"):
        report_md = (path.parent / EVAL_REPORT / "report.md").read_text()
        table = report_md[report_md.index("| model |"):report_md.index("\n## Pareto fronts")].strip()
        lines += ["", "## Teacher versus students", "",
                  f"Produced by `student-eval` ({EVAL_REPORT}/report.md; the command: {res['eval_command']}). "
                  "Students trained with "
                  f"{res['pareto_config']}, seed {a['seeds'][0]}; the others cut by importance as above.", "",
                  report_md[report_md.index("Cost measured"):report_md.index("| model |")].strip(), "",
                  table, "",
                  f"![KL against latency]({EVAL_REPORT}/pareto_kl_forward_exact_vs_latency_ms_per_token.png) "
                  f"![accuracy against size]({EVAL_REPORT}/pareto_arithmetic_accuracy_vs_parameters.png)"]
    lines += ["", f"Wall time: {res['wall_s'] / 60:.1f} min. Raw numbers: `distillation_quality.json`.", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caches = {c["name"]: c for c in res["caches"]}
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for c in res["configs"]:
        if c["name"].startswith("CE only"):         # no distribution: a reference line
            ax.axhline(c["kl_forward_exact"], ls="--", color="grey", lw=1)
            ax.text(19, c["kl_forward_exact"] + 0.005, "cross-entropy on hard labels only", fontsize=7, color="grey")
            continue
        if c["name"].startswith("dense"):           # every value: the reference the encodings approach
            ax.axhline(c["kl_forward_exact"], ls=":", color="black", lw=1)
            ax.text(19, c["kl_forward_exact"] + 0.005, "dense KD (every value)", fontsize=7)
            continue
        if not c["name"].startswith("fwd KL") or "--layer-map" in c["flags"]:
            continue                                # other losses / extra signals: see the table
        b = caches[c["cache"]]["dist_bytes_per_token"]
        xs = [r["end"]["kl_forward_exact"] for r in c["runs"]]
        ax.errorbar(b, c["kl_forward_exact"], yerr=c["kl_forward_exact_sd"] or None, fmt="o", capsize=3)
        ax.scatter([b] * len(xs), xs, s=8, color="grey", zorder=3)
        ax.annotate(c["cache"], (b, c["kl_forward_exact"]), textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per token of the cached distribution (log scale)")
    ax.set_ylabel("held-out exact KL(teacher || student), nats/token")
    ax.set_title("Forward-KL distillation, same student, data and steps: quality against cache size\n"
                 "(mean and sd over seeds; grey dots: each seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_onpolicy(res: dict, path: Path) -> None:
    """Each student with on-policy measures: exact KL on the teacher's text against exact KL(q || p) on its
    own greedy answers (one dot per seed, the mean as a larger marker)."""
    rows = [c for c in res["configs"] if "onpolicy_kl_reverse_exact" in c]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for c in rows:
        xs = [r["end"]["kl_forward_exact"] for r in c["runs"]]
        ys = [r["onpolicy"]["kl_reverse_exact"] for r in c["runs"]]
        dots = ax.scatter(xs, ys, s=14, alpha=0.6)
        ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], s=70, color=dots.get_facecolor()[0],
                   edgecolor="black", label=f"{c['name']} ({len(xs)} seed{'s' if len(xs) > 1 else ''})")
    ax.set_xscale("log")
    ax.set_xlabel("exact KL(teacher || student) on held-out teacher text, nats/token (log scale)")
    ax.set_ylabel("exact KL(student || teacher) on its own answers, nats/token")
    ax.set_title("Off-policy against on-policy training, same student and optimizer steps", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_docs(md: str, docs: Path) -> None:
    """Replace the generated part of docs/results.md (between the markers) with the new tables."""
    body = md.split("\n", 2)[2].replace(f"]({EVAL_REPORT}/", f"](../benchmarks/results/{EVAL_REPORT}/")
    body = body.replace("](quality_onpolicy.png)", "](../benchmarks/results/quality_onpolicy.png)")
    write_block(docs, "distillation_quality",
                f"{body}\n![quality against size](../benchmarks/results/quality_by_encoding.png)",
                "## Distillation quality (generated by `benchmarks/distillation_quality.py`)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/lc-quality", help="scratch directory (caches, runs)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--train-prompts", type=int, default=192)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--keep-layers", default="every:3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated keys of: {', '.join(CONFIGS)}")
    p.add_argument("--skip-models", action="store_true", help="no teacher-versus-students size/speed table")
    p.add_argument("--rounds", type=int, default=2, help="on-policy rows: rounds (the steps are split between them)")
    p.add_argument("--onpolicy-eval", default="compact,onpg,onpg0,onrkl,gkd",
                   help="configs whose students get the on-policy measures (their greedy answers to the held-out "
                        "prompts scored by the teacher with --encoding full); '' for none")
    p.add_argument("--pareto-sizes", default="every:2,every:5", help="other student depths for the Pareto view")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reuse", action="store_true", help="reuse finished training runs found in --work")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/results.md")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the tables and plots from --out/distillation_quality.json, running nothing")
    args = p.parse_args()
    if args.render_only:
        out = Path(args.out)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        res = json.loads((out / "distillation_quality.json").read_text())
        render(res, out, docs=not args.no_docs)
        return
    if args.quick:
        args.train_prompts, args.eval_prompts, args.max_new_tokens, args.steps = 12, 4, 16, 3
        args.seeds, args.pareto_sizes, args.configs = "0", "every:5", "ce,compact"
    args.seeds = [int(s) for s in args.seeds.split(",")]
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    t0 = time.perf_counter()

    n = args.train_prompts + args.eval_prompts
    print(f"[1/5] teacher responses to {n} prompts under vLLM", flush=True)
    gen = work / "cache-generated"
    if not (gen / "manifest.json").exists():
        sh([str(BIN / "logitcache"), "capture", str(gen), "--json", "--no-progress", "--limit", str(n),
            "--max-new-tokens", str(args.max_new_tokens), "--top-k", "1"], log)
    pairs_file(gen, range(0, args.train_prompts), work / "train.jsonl")
    pairs_file(gen, range(args.train_prompts, n), work / "eval.jsonl")

    print("[2/5] one cache per encoding over the same tokens, and the full-distribution evaluation set", flush=True)
    score = ["--mode", "score", "--backend", "hf", "--prompt-column", "prompt", "--response-column", "response"]
    # "key" or "key:0+1": a config, optionally with its own seeds (a row whose other seeds did not run)
    seeds_of = {k.split(":")[0].strip(): ([int(x) for x in k.split(":")[1].split("+")] if ":" in k else args.seeds)
                for k in args.configs.split(",") if k.strip()}
    chosen = list(seeds_of)
    unknown = [k for k in chosen if k not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    needed = {CONFIGS[k][1] for k in chosen} | {"compact"}
    caches = []
    for name, flags in CACHES.items():
        if name not in needed:
            continue
        caches.append(capture(work, name, [*score, "--input", str(work / "train.jsonl"), *flags], log))
        print(f"  {name}: {caches[-1]['dist_bytes_per_token']:.1f} B/token, {caches[-1]['wall_s']:.0f} s", flush=True)
    ev = capture(work, "eval-full", [*score, "--input", str(work / "eval.jsonl"), "--encoding", "full"], log)

    print(f"[3/5] {len(chosen)} configurations x {len(args.seeds)} seeds", flush=True)
    configs = []
    for key in chosen:
        name, cache, flags = CONFIGS[key]
        runs = []
        for seed in seeds_of[key]:
            run = (rounds if cache == ROUNDS else train)(work, cache, flags, key, seed, args, log)
            if key in args.onpolicy_eval.split(","):
                run["onpolicy"] = onpolicy_eval(work, run["student_dir"], f"{key}-s{seed}", args, log)
            runs.append(run)
            e = runs[-1]["end"]
            print(f"  {name} seed {seed}: KL {e['kl_forward_exact']:.3f}, top-1 {e['top1_agreement']:.3f} "
                  + (f"on-policy KL(q||p) {run['onpolicy']['kl_reverse_exact']:.3f} " if "onpolicy" in run else "")
                  + f"({runs[-1]['wall_s']:.0f} s)", flush=True)
        configs.append({"key": key, "name": name, "cache": cache, "flags": flags, "runs": runs})
    resolution = summarise(configs, BASELINE)
    if args.skip_models:
        models, pareto_config, eval_command = [], None, None
    else:
        models, pareto_config, eval_command = teacher_versus_students(work, configs, args, log, out)

    print("[5/5] writing results", flush=True)
    res = {"args": vars(args), "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
           "train_pairs": sum(1 for _ in open(work / "train.jsonl")), "eval_pairs": sum(1 for _ in open(work / "eval.jsonl")),
           "eval_tokens": ev["scored_tokens"], "caches": caches, "eval_cache": ev, "configs": configs,
           "models": models, "pareto_config": pareto_config, "eval_command": eval_command, "baseline": BASELINE, "resolution": resolution,
           "wall_s": time.perf_counter() - t0}
    (out / "distillation_quality.json").write_text(json.dumps(res, indent=1, default=str))
    render(res, out, docs=not args.no_docs)


EVAL_REPORT = "teacher_vs_students"


def teacher_versus_students(work: Path, configs: list[dict], args, log: Path, out: Path) -> tuple[list[dict], str, str]:
    """The teacher and the students through ``student-eval`` (the command users run): its report's rows,
    the configuration of the stride students, and the command line."""
    print("[4/5] teacher versus students: student-eval (accuracy, fidelity, size, speed, memory)", flush=True)
    # the stride students' Pareto line: the best configuration of the --keep-layers student
    best = min((c for c in configs if not c["name"].startswith(("CE", "dense")) and c["key"] not in PRUNE
                and c["cache"] != ROUNDS and "--attention-transfer" not in c["flags"]),
               key=lambda c: c["kl_forward_exact"])
    students = [(args.keep_layers.replace(":", "-"), best["runs"][0])]
    for size in [s for s in args.pareto_sizes.split(",") if s]:
        r = train(work, best["cache"], [*best["flags"], "--keep-layers", size], f"size-{size.replace(':', '')}",
                  args.seeds[0], args, log)
        students.append((size.replace(":", "-"), r))
    for c in configs:                                 # the students cut by importance (same size as every:3)
        if c["key"] in PRUNE and c["runs"]:
            students.append((c["key"], c["runs"][0]))
    runs = [str(Path(r["student_dir"]).parent) for _, r in students]
    cmd = [str(BIN / "student-eval"), "smollm2-135m", *runs, "--names", ",".join(["teacher", *[n for n, _ in students]]),
           "--eval-cache", str(work / "cache-eval-full"), "--task", "arithmetic", "--out", str(out / EVAL_REPORT),
           "--json"]
    report, _ = sh(cmd, log)
    shown = "`student-eval smollm2-135m RUN... --eval-cache EVAL_FULL_CACHE --task arithmetic --out OUT`"
    return report["models"], best["name"], shown


def render(res: dict, out: Path, docs: bool) -> None:
    plot(res, out / "quality_by_encoding.png")
    plot_onpolicy(res, out / "quality_onpolicy.png")
    md = write_markdown(res, out / "distillation_quality.md")
    if docs:
        update_docs(md, ROOT / "docs" / "results.md")
    print(md)


if __name__ == "__main__":
    main()
