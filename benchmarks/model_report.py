"""Teacher versus student: size, speed and memory of causal LMs on the CPU, side by side.

For each model directory (a Hugging Face directory, or a training run whose ``student/`` or
``model/`` subdirectory holds one, as ``student_train`` writes it), one fresh subprocess loads the
model in float32 and measures:

* ``parameters`` (tied embeddings counted once), ``non_embedding_parameters``, ``disk_bytes`` (the
  weight files: ``*.safetensors`` and ``*.bin``);
* ``latency_ms_per_token``: batch 1, greedy, with the KV cache, time per generated token after the
  first (the prefill is timed on its own as ``prefill_tokens_per_s``);
* ``throughput_tokens_per_s``: ``batch_size`` left-padded prompts generated together with
  ``model.generate`` (greedy, exactly ``new_tokens`` each), generated tokens / wall time;
* ``peak_rss_mb``: the peak resident memory of that subprocess (load included), and
  ``peak_rss_generate_mb``: the peak from after loading to the end (Linux only, else None);
  ``rss_before_load_mb`` is the runtime alone (python, torch, transformers), to subtract.

A fresh process per model keeps one model's memory and warm caches out of the next one's numbers.
Timings are the median over ``repeats``; every repeat is kept under ``details``.

    python benchmarks/model_report.py TEACHER_DIR RUN_DIR --names teacher,student --out /tmp/report
    python benchmarks/model_report.py A B --names a,b --quality-json quality.json --out /tmp/report

``--quality-json`` maps a model name to its quality metrics (e.g. ``{"student": {"kl_exact": 0.41}}``);
they become table columns and one Pareto plot (quality against throughput) per metric.
Writes OUT/model_report.json, OUT/model_report.md and OUT/model_report_<metric>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# Short English prompts for models that ship a tokenizer; a few sentences each, so the prefill
# is not all per-call overhead.
DEFAULT_PROMPTS = [
    "The history of the printing press begins in the fifteenth century. Explain in a few sentences "
    "how movable type changed the way books were made and who could read them.",
    "Write a short, friendly email to a colleague asking whether the team meeting on Thursday can "
    "be moved to the afternoon, and suggest two possible times.",
    "A train leaves the station at nine in the morning and travels at sixty miles per hour. How far "
    "has it gone by half past eleven? Show the steps of the calculation.",
    "List three simple ways to save water at home, and for each one say briefly why it helps and "
    "how much difference it can make over a year.",
]
RANDOM_PROMPT_COUNT, RANDOM_PROMPT_LEN, RANDOM_SEED = 4, 32, 0

WEIGHT_SUFFIXES = (".safetensors", ".bin")
NOT_WEIGHTS = {"training_args.bin"}          # HF Trainer's pickled arguments, not a weight file
MB = 1e6

# Table columns from measure_model: (row key, header, format).
MEASURED_COLUMNS = [
    ("parameters", "parameters (M)", lambda v: f"{v / 1e6:.2f}"),
    ("disk_bytes", "disk (MB)", lambda v: f"{v / MB:.1f}"),
    ("latency_ms_per_token", "latency ms/token", lambda v: f"{v:.2f}"),
    ("throughput_tokens_per_s", "throughput tok/s", lambda v: f"{v:.1f}"),
    ("peak_rss_mb", "peak RSS MB", lambda v: f"{v:.0f}"),
]
# Row keys that are measurements or settings, never quality columns.
NON_QUALITY_KEYS = {"name", "path", "model_dir", "parameters", "non_embedding_parameters",
                    "disk_bytes", "latency_ms_per_token", "prefill_tokens_per_s",
                    "throughput_tokens_per_s", "peak_rss_mb", "peak_rss_generate_mb",
                    "rss_before_load_mb", "rss_after_load_mb", "threads", "torch", "transformers", "new_tokens",
                    "batch_size", "repeats", "prompt_source", "details"}
# Quality metrics where a larger value is better; the others (kl, perplexity, loss) are lower-better.
HIGHER_IS_BETTER_HINTS = ("agreement", "accuracy", "acc", "top1", "score", "win", "logprob", "loglik")
QUALITY_LABELS = {      # the student trainer's eval metrics and the usual distillation ones
    "kl_exact": "KL(teacher || student) per token",
    "kl_forward": "KL(teacher || student) per token",
    "perplexity": "Student perplexity",
    "top1_agreement": "Top-1 agreement with the teacher",
    "kl_reverse_own_text": "KL(student || teacher) per token of its own greedy answers",
    "teacher_logprob_own_text": "Teacher log-likelihood per token of the student's greedy answers",
}
SPEED_LABELS = {
    "throughput_tokens_per_s": "Throughput, batch generation (generated tokens/s, higher is faster)",
    "latency_ms_per_token": "Latency at batch 1 (ms per generated token, lower is faster)",
    "prefill_tokens_per_s": "Prefill speed (prompt tokens/s, higher is faster)",
}


# --- model directory and static sizes ------------------------------------------------------------

def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The Hugging Face directory behind ``path``: itself, or the run's ``student/`` or ``model/``."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    for sub in ("student", "model"):
        if (path / sub / "config.json").is_file():
            return path / sub
    found = [p for p in path.iterdir() if (p / "config.json").is_file()] if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"{path}: no config.json here nor in one subdirectory "
                            f"(expected a Hugging Face model directory or a training run holding one)")


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The weight files of a model directory (sharded or not), in name order."""
    return sorted(p for p in Path(model_dir).iterdir()
                  if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and p.name not in NOT_WEIGHTS)


def disk_bytes(model_dir: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in weight_files(model_dir))


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, non-embedding parameters); a tied input/output embedding counts once."""
    embedding = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                 if m is not None for p in m.parameters()}
    params = list(model.parameters())           # already de-duplicated: shared tensors appear once
    total = sum(p.numel() for p in params)
    return total, total - sum(p.numel() for p in params if id(p) in embedding)


def default_prompt_ids(model_dir: str | os.PathLike) -> tuple[list[list[int]], str]:
    """Fixed prompts: DEFAULT_PROMPTS through the model's tokenizer if it has one, else seeded
    random ids. The same directory always gives the same ids, so teacher and student (which share a
    tokenizer) are timed on the same tokens."""
    model_dir = Path(model_dir)
    if any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        return [tok(text, add_special_tokens=True)["input_ids"] for text in DEFAULT_PROMPTS], "tokenizer"
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    rng = random.Random(RANDOM_SEED)
    return [[rng.randrange(vocab) for _ in range(RANDOM_PROMPT_LEN)]
            for _ in range(RANDOM_PROMPT_COUNT)], "random"


# --- the measurement, in a fresh process ---------------------------------------------------------

def _rss_kb(field: str) -> int | None:
    """A /proc/self/status memory field (VmRSS, VmHWM) in KiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), so later peaks leave out the load (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _left_pad(prompts: list[list[int]], pad_id: int):
    """A left-padded batch (ids, attention mask): generation continues from every row's last token."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def _decode_timed(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for tokens 2..new_tokens): greedy, batch 1, KV cache.

    Our own loop rather than ``generate``: the prefill and the per-token steps are timed apart."""
    import torch

    ids = torch.tensor([prompt], dtype=torch.long)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    past = out.past_key_values
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _measure_here(model_dir: str, prompt_ids: list[list[int]], new_tokens: int, batch_size: int,
                  threads: int | None, repeats: int) -> dict:
    """Load and measure one model in this process (meant to be a fresh one: see measure_model)."""
    import resource

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    rss_before_load = _rss_kb("VmRSS")          # the runtime alone (python, torch, transformers)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    rss_after_load = _rss_kb("VmRSS")           # safetensors weights are mmapped: not all resident yet
    hwm_reset = _reset_peak_rss()
    total, non_embedding = parameter_counts(model)

    cfg = model.config
    pad_id = next(v for v in (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None), 0)
                  if v is not None)
    pad_id = pad_id[0] if isinstance(pad_id, list) else pad_id
    batch = [prompt_ids[i % len(prompt_ids)] for i in range(batch_size)]
    ids, mask = _left_pad(batch, pad_id)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=pad_id, attention_mask=mask)

    prefill_s, decode_s, batch_s = [], [], []
    with torch.inference_mode():
        _decode_timed(model, prompt_ids[0], 3)                       # warm-up: first-call costs
        model.generate(ids, **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})
        for _ in range(repeats):                                     # interleaved, so drift hits both
            p, d = _decode_timed(model, prompt_ids[0], new_tokens)
            prefill_s.append(p)
            decode_s.append(d)
            t = time.perf_counter()
            out = model.generate(ids, **gen)
            batch_s.append(time.perf_counter() - t)
            assert out.shape == (batch_size, ids.shape[1] + new_tokens), out.shape

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux
    hwm_kb = _rss_kb("VmHWM") if hwm_reset else None
    kb_to_mb = lambda kb: None if kb is None else kb * 1024 / MB
    prompt_len = len(prompt_ids[0])
    return {
        "parameters": total,
        "non_embedding_parameters": non_embedding,
        "latency_ms_per_token": statistics.median(decode_s) * 1e3 / (new_tokens - 1),
        "prefill_tokens_per_s": prompt_len / statistics.median(prefill_s),
        "throughput_tokens_per_s": batch_size * new_tokens / statistics.median(batch_s),
        "peak_rss_mb": kb_to_mb(peak_kb),
        "peak_rss_generate_mb": kb_to_mb(hwm_kb),
        "rss_before_load_mb": kb_to_mb(rss_before_load),
        "rss_after_load_mb": kb_to_mb(rss_after_load),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "details": {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
                    "batch_generate_s": batch_s, "latency_prompt_tokens": prompt_len,
                    "batch_prompt_width": int(ids.shape[1]), "model_class": type(model).__name__},
    }


def measure_model(path: str, *, name: str, prompt_ids: list[list[int]] | None = None,
                  new_tokens: int = 32, batch_size: int = 8, threads: int | None = None,
                  repeats: int = 2) -> dict:
    """Size, speed and memory of one causal LM (see the module docstring), measured in a fresh
    spawned process so that models never share memory peaks or warm caches."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2: latency is the time per token after the first")
    if batch_size < 1 or repeats < 1:
        raise ValueError("batch_size and repeats must be >= 1")
    model_dir = resolve_model_dir(path)
    prompt_source = "given"
    if prompt_ids is None:
        prompt_ids, prompt_source = default_prompt_ids(model_dir)
    if not prompt_ids or not all(prompt_ids):
        raise ValueError("prompt_ids: need at least one non-empty prompt")
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        measured = pool.submit(_measure_here, str(model_dir), [list(map(int, p)) for p in prompt_ids],
                               new_tokens, batch_size, threads, repeats).result()
    return {"name": name, "path": str(path), "model_dir": str(model_dir),
            "disk_bytes": disk_bytes(model_dir), **measured, "new_tokens": new_tokens,
            "batch_size": batch_size, "repeats": repeats, "prompt_source": prompt_source}


# --- report: Pareto front, plot, table -----------------------------------------------------------

def higher_is_better(metric: str) -> bool:
    """Whether a larger value of a quality metric is better, guessed from its name."""
    return any(h in metric.lower() for h in HIGHER_IS_BETTER_HINTS)


def pareto_front(rows: list[dict], quality_key: str, speed_key: str = "throughput_tokens_per_s",
                 lower_is_better: bool = True) -> list[str]:
    """Names of the models no other model beats on both quality and speed, slowest first.

    Speed is better when larger, except for latency keys (``latency_*``). Rows without the quality
    or speed key are left out; equal points are all kept."""
    speed_sign = -1 if speed_key.startswith("latency") else 1
    quality_sign = -1 if lower_is_better else 1
    points = [(r["name"], speed_sign * r[speed_key], quality_sign * r[quality_key])
              for r in rows if r.get(quality_key) is not None and r.get(speed_key) is not None]

    def beats(a, b):    # a at least as good on both, strictly better on one
        return a[1] >= b[1] and a[2] >= b[2] and (a[1] > b[1] or a[2] > b[2])

    front = [p for p in points if not any(beats(q, p) for q in points)]
    return [p[0] for p in sorted(front, key=lambda p: (p[1], p[2]))]


def pareto_plot(rows: list[dict], path: str, *, quality_key: str, quality_label: str,
                speed_key: str = "throughput_tokens_per_s", lower_is_better: bool = True) -> list[str]:
    """Scatter of quality against speed, one labelled point per model, the Pareto front joined by a
    step line; writes a PNG to ``path`` and returns the front's names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get(quality_key) is not None and r.get(speed_key) is not None]
    if not rows:
        raise ValueError(f"no row has both {quality_key!r} and {speed_key!r}")
    front = pareto_front(rows, quality_key, speed_key, lower_is_better)
    by_name = {r["name"]: r for r in rows}

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    others = [r for r in rows if r["name"] not in front]
    if others:
        ax.scatter([r[speed_key] for r in others], [r[quality_key] for r in others],
                   s=40, color="0.55", label="beaten on both by another model", zorder=3)
    fx = [by_name[n][speed_key] for n in front]
    fy = [by_name[n][quality_key] for n in front]
    # The front runs from the slow, good end to the fast end; "pre" makes each step show the best
    # quality reachable at a given speed or faster.
    ax.step(fx, fy, where="pre", color="tab:red", lw=1.5, zorder=2)
    ax.scatter(fx, fy, s=70, marker="D", color="tab:red", label="Pareto-optimal", zorder=4)
    for r in rows:
        ax.annotate(r["name"], (r[speed_key], r[quality_key]), xytext=(6, 5),
                    textcoords="offset points", fontsize=9)

    speeds = [r[speed_key] for r in rows]
    if min(speeds) > 0 and max(speeds) / min(speeds) > 20:
        ax.set_xscale("log")
    direction = "lower is better" if lower_is_better else "higher is better"
    ax.set_xlabel(SPEED_LABELS.get(speed_key, speed_key))
    ax.set_ylabel(f"{quality_label} ({direction})")
    ax.set_title(f"Quality against speed: {quality_label}\n"
                 f"red: models no other model beats on both", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return front


def quality_keys(rows: list[dict]) -> list[str]:
    """Numeric row keys that are not measurements (kl_exact, perplexity, ...), in first-seen order."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if (k not in NON_QUALITY_KEYS and k not in keys and isinstance(v, (int, float))
                    and not isinstance(v, bool)):
                keys.append(k)
    return keys


def _fmt_quality(v) -> str:
    return "" if v is None else f"{v:.4g}"


def markdown_table(rows: list[dict]) -> str:
    """One line per model: size, speed, memory, then any quality columns the rows carry."""
    quality = quality_keys(rows)
    header = ["model"] + [h for _, h, _ in MEASURED_COLUMNS] + quality
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        cells = [str(r.get("name", ""))]
        cells += ["" if r.get(k) is None else fmt(r[k]) for k, _, fmt in MEASURED_COLUMNS]
        cells += [_fmt_quality(r.get(k)) for k in quality]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- command line --------------------------------------------------------------------------------

def onpolicy_columns(path: str, prompts: str, limit: int, out: Path, teacher: str | None) -> dict:
    """The on-policy measures of one model (student_train.rounds.evaluate_onpolicy) as report columns."""
    from logitcache.teacher.embedded import DEFAULT_TEACHER
    from student_train.rounds import evaluate_onpolicy

    m = evaluate_onpolicy(str(resolve_model_dir(path)), teacher or DEFAULT_TEACHER, prompts, limit, str(out))
    return {"kl_reverse_own_text": m["kl_reverse_exact"], "teacher_logprob_own_text": m["teacher_logprob_per_token"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Measure causal LMs (parameters, disk, latency, throughput, peak RSS) on the CPU "
                    "for a teacher-versus-student report; each model in its own fresh process.")
    ap.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                    help="a Hugging Face model directory, or a training run holding one in student/ or model/")
    ap.add_argument("--names", help="comma-separated names, one per MODEL_DIR (default: directory names)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence (default 32)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences generated together for throughput")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats; the median is reported")
    ap.add_argument("--quality-json", help="JSON file: {name: {metric: value}}; adds columns and Pareto plots")
    ap.add_argument("--onpolicy-prompts", help="held-out prompts: each model answers them greedily, the teacher "
                    "scores the answers with --encoding full (student-onpolicy evaluate), adding the columns "
                    "kl_reverse_own_text and teacher_logprob_own_text")
    ap.add_argument("--onpolicy-limit", type=int, default=32, help="how many --onpolicy-prompts rows (default 32)")
    ap.add_argument("--teacher", default=None, help="the teacher that scores (default: the embedded one)")
    args = ap.parse_args(argv)

    names = args.names.split(",") if args.names else [Path(d).expanduser().resolve().name for d in args.model_dirs]
    if len(names) != len(args.model_dirs) or len(set(names)) != len(names):
        ap.error(f"--names: need {len(args.model_dirs)} distinct names, got {names}")
    quality = {}
    if args.quality_json:
        with open(args.quality_json) as f:
            quality = json.load(f)
        unknown = set(quality) - set(names)
        if unknown:
            print(f"note: --quality-json names {sorted(unknown)} are not measured here; ignored")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name, path in zip(names, args.model_dirs):
        print(f"measuring {name} ({path}) ...", flush=True)
        row = measure_model(path, name=name, new_tokens=args.new_tokens, batch_size=args.batch_size,
                            threads=args.threads, repeats=args.repeats)
        row.update(quality.get(name, {}))
        if args.onpolicy_prompts:
            row.update(onpolicy_columns(path, args.onpolicy_prompts, args.onpolicy_limit, out / f"onpolicy-{name}",
                                        args.teacher))
        rows.append(row)

    plots = {}
    for key in quality_keys(rows):
        png = out / f"model_report_{key}.png"
        front = pareto_plot(rows, str(png), quality_key=key, quality_label=QUALITY_LABELS.get(key, key),
                            lower_is_better=not higher_is_better(key))
        plots[key] = {"png": str(png), "pareto": front}

    machine = {"python": platform.python_version(), "platform": platform.platform(),
               "cpu_count": os.cpu_count(), "torch": rows[0]["torch"],
               "transformers": rows[0]["transformers"], "threads": rows[0]["threads"]}
    with open(out / "model_report.json", "w") as f:
        json.dump({"machine": machine, "models": rows, "plots": plots}, f, indent=1)
    table = markdown_table(rows)
    settings = (f"CPU, float32, torch {machine['torch']}, {machine['threads']} thread(s); "
                f"{args.new_tokens} new tokens, greedy; latency at batch 1 (after the first token), "
                f"throughput at batch {args.batch_size}; median of {args.repeats} repeat(s). "
                f"Peak RSS: the whole measuring process, model load included.")
    with open(out / "model_report.md", "w") as f:
        f.write("# Model report\n\n" + settings + "\n\n" + table)
        for key, p in plots.items():
            f.write(f"\n![{key} against throughput]({Path(p['png']).name})  "
                    f"Pareto-optimal: {', '.join(p['pareto'])}\n")
    print("\n" + table)
    print(f"wrote {out / 'model_report.json'} and {out / 'model_report.md'}"
          + (f" and {len(plots)} plot(s)" if plots else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
