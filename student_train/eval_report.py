"""The evaluation report: a teacher and its students side by side on task accuracy, fidelity to the
teacher, size, speed and memory, with the Pareto view. ``student-eval`` is its command line.

For each model (the teacher first; a student is a Hugging Face directory or a training run folder):

1. **training**: a run folder's ``report.json`` is reused (steps, its held-out evaluation at the end);
2. **cost** (``cost.py``): parameters, disk, latency, throughput, peak memory, in a fresh process on
   ``device`` in ``dtype``; vLLM's throughput where vLLM can load the model;
3. **tasks** (``tasks/``): accuracy on each ``--task`` (the shipped ``arithmetic`` by default);
4. **fidelity** (``fidelity.py``) on ``--eval-cache``: exact forward and reverse KL, top-1 agreement and
   perplexity on the teacher's responses (a run's own held-out numbers stand in when no cache is given);
5. **on-policy** (``--onpolicy-prompts``): its greedy answers scored by the teacher
   (``rounds.evaluate_onpolicy``).

Then, for each quality measure, the Pareto front against latency and against size. Writes
``report.json``, ``report.md``, ``pareto_<quality>_vs_<cost>.png`` and the per-item task answers
(``tasks/<model>/<task>.jsonl``) to ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from logitcache.format.errors import LogitcacheError

from .pareto import pareto_plot

# The cost axes of the Pareto plots: speed, then size.
PARETO_COSTS = ("latency_ms_per_token", "parameters")
# Quality columns every report may carry (task accuracies are added per task):
# row key -> (table header, plot label, lower is better).
QUALITY = {
    "kl_forward_exact": ("KL fwd", "KL(teacher || model), exact, nats/token", True),
    "kl_reverse_exact": ("KL rev", "KL(model || teacher), exact, nats/token", True),
    "kl_forward": ("KL fwd (encoding)", "KL(teacher || model) from the cache's encoding, nats/token", True),
    "top1_agreement": ("top-1", "Top-1 agreement with the teacher", False),
    "perplexity": ("ppl", "Perplexity on the teacher's tokens", True),
    "kl_reverse_own_text": ("KL rev (own text)", "KL(model || teacher) on its own greedy answers, nats/token", True),
    "teacher_logprob_own_text": ("teacher log-lik (own text)", "Teacher log-likelihood of its own answers, "
                                 "nats/token", False),
}
# What each quality column means, for the report's text (only the columns present are explained).
LEGEND = {
    "kl_forward_exact": "**KL fwd** = exact KL(teacher ‖ model) over the whole vocabulary, nats per scored token",
    "kl_reverse_exact": "**KL rev** = exact KL(model ‖ teacher)",
    "kl_forward": "**KL fwd (encoding)** = forward KL as the cache's encoding gives it (stored entries and tail bucket)",
    "top1_agreement": "**top-1** = share of tokens where the model's most likely next token is the teacher's",
    "perplexity": "**ppl** = the model's perplexity on the cached (teacher's) tokens",
    "kl_reverse_own_text": "**KL rev (own text)** = exact KL(model ‖ teacher) on the model's own greedy answers",
    "teacher_logprob_own_text": "**teacher log-lik (own text)** = the teacher's mean log-probability per token of "
                                "those answers",
}
# The measures a training run's report.json holds at its last evaluation.
RUN_EVAL_KEYS = ("kl_forward_exact", "kl_reverse_exact", "kl_forward", "top1_agreement", "perplexity")
MB = 1e6


@dataclass
class EvalReportConfig:
    """What ``student-eval`` measures, one field per flag."""

    teacher: str = ""
    students: list[str] = field(default_factory=list)
    out: str = ""
    names: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    task_limit: int | None = None
    task_max_new_tokens: int = 64
    eval_cache: str | None = None
    seq_len: int = 512
    device: str = "cpu"
    dtype: str = "float32"
    new_tokens: int = 32
    batch_size: int = 8
    repeats: int = 2
    threads: int | None = None
    vllm: bool | None = None
    onpolicy_prompts: str | None = None
    onpolicy_limit: int = 32
    storage_options: dict | None = None

    def model_names(self) -> list[str]:
        paths = [self.teacher, *self.students]
        if self.names:
            names = [n.strip() for n in self.names.split(",")]
        else:
            names = ["teacher"] + [Path(s).expanduser().resolve().name or s for s in self.students]
        if len(names) != len(paths) or len(set(names)) != len(names) or not all(names):
            raise LogitcacheError(f"--names: need {len(paths)} distinct non-empty names (teacher first), got {names}")
        return names


# --- one model -----------------------------------------------------------------------------------

def model_directory(path: str) -> Path:
    """The Hugging Face directory of a teacher or student argument: an embedded teacher's name, a model
    directory, or a training run folder holding one (``cost.resolve_model_dir``)."""
    from logitcache.teacher.embedded import EMBEDDED, embedded_teacher_dir

    from .cost import resolve_model_dir

    if path in EMBEDDED:
        return embedded_teacher_dir(path)
    if not Path(path).expanduser().exists():
        raise LogitcacheError(f"{path}: no such model directory or training run")
    try:
        return resolve_model_dir(path)
    except FileNotFoundError as e:
        raise LogitcacheError(str(e)) from None


def training_summary(path: str) -> dict | None:
    """A training run's own ``report.json`` (steps, tokens, its last held-out evaluation), or None for a
    plain model directory."""
    report = Path(path).expanduser() / "report.json"
    if not report.is_file():
        return None
    try:
        data = json.loads(report.read_text())
    except json.JSONDecodeError as e:
        raise LogitcacheError(f"{report}: not JSON ({e.msg}); is the run finished?") from None
    end = data.get("eval_end") or {}
    cfg = data.get("config") or {}
    return {"report": str(report), "steps": end.get("step") or cfg.get("max_steps"),
            "loss": cfg.get("loss"), "eval_end": {k: end[k] for k in ("step", "tokens", *RUN_EVAL_KEYS) if k in end}}


def measure_one(cfg: EvalReportConfig, name: str, path: str, role: str, tasks: list, out: Path,
                log: Callable[[str], None]) -> dict:
    """Every measure of one model, as one report row."""
    from .cost import measure_model, vllm_throughput
    from .fidelity import fidelity
    from .tasks import TaskSettings

    model_dir = model_directory(path)
    row: dict = {"name": name, "role": role, "path": str(path), "model_dir": str(model_dir)}
    training = training_summary(path)
    if training:
        row["training"] = training

    log(f"[{name}] cost: size, latency, throughput, memory on {cfg.device} ({cfg.dtype})")
    row.update(measure_model(str(model_dir), name=name, new_tokens=cfg.new_tokens, batch_size=cfg.batch_size,
                             threads=cfg.threads, repeats=cfg.repeats, device=cfg.device, dtype=cfg.dtype))
    if use_vllm(cfg):
        log(f"[{name}] cost: vLLM throughput")
        row.update(vllm_throughput(str(model_dir), new_tokens=cfg.new_tokens, batch_size=cfg.batch_size,
                                   repeats=cfg.repeats, dtype=cfg.dtype))

    row["tasks"] = {}
    settings = TaskSettings(cfg.device, cfg.dtype, cfg.task_limit, cfg.batch_size, cfg.task_max_new_tokens)
    for task in tasks:
        log(f"[{name}] task {task.name}")
        result = task.run(str(model_dir), settings)
        row[task.column] = result.value
        row["tasks"][task.column] = result.summary()
        if result.items:
            items = out / "tasks" / name / f"{task.name}.jsonl"
            items.parent.mkdir(parents=True, exist_ok=True)
            items.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.items))
            row["tasks"][task.column]["items"] = str(items)

    if cfg.eval_cache:
        log(f"[{name}] fidelity on {cfg.eval_cache}")
        measured = fidelity(str(model_dir), cfg.eval_cache, device=cfg.device, dtype=cfg.dtype, seq_len=cfg.seq_len,
                            storage_options=cfg.storage_options)
        row["fidelity"] = {"source": cfg.eval_cache, **measured}
        row.update({k: measured[k] for k in RUN_EVAL_KEYS if k in measured})
    elif training and training["eval_end"]:
        row["fidelity"] = {"source": f"{training['report']} (the run's own held-out evaluation)",
                           **training["eval_end"]}
        row.update({k: training["eval_end"][k] for k in RUN_EVAL_KEYS if k in training["eval_end"]})

    if cfg.onpolicy_prompts:
        from .rounds import evaluate_onpolicy

        log(f"[{name}] on-policy: its greedy answers to {cfg.onpolicy_prompts}, scored by the teacher")
        m = evaluate_onpolicy(str(model_dir), cfg.teacher, cfg.onpolicy_prompts, cfg.onpolicy_limit,
                              str(out / "onpolicy" / name), device=cfg.device)
        row.update(kl_reverse_own_text=m["kl_reverse_exact"], teacher_logprob_own_text=m["teacher_logprob_per_token"])
    return row


def use_vllm(cfg: EvalReportConfig) -> bool:
    if cfg.vllm is not None:
        return cfg.vllm
    from logitcache.teacher.vllm_backend import vllm_available

    return vllm_available()


# --- the report ----------------------------------------------------------------------------------

def quality_columns(rows: list[dict], tasks: list) -> list[tuple[str, str, str, bool]]:
    """(row key, table header, plot label, lower is better) of every quality measure some row carries,
    tasks first; the encoding's KL is left out where the exact one is measured."""
    cols = [(t.column, f"{t.name} {t.metric}", f"{t.name}: {t.metric}", not t.higher_is_better) for t in tasks]
    cols += [(k, short, label, lower) for k, (short, label, lower) in QUALITY.items()]
    present = {c[0] for c in cols if any(r.get(c[0]) is not None for r in rows)}
    if "kl_forward_exact" in present:
        present.discard("kl_forward")
    return [c for c in cols if c[0] in present]


def pareto_measures(columns: list[tuple[str, str, str, bool]]) -> list[tuple[str, str, str, bool]]:
    """The quality measures plotted: task accuracies and the main KL (exact when measured)."""
    keys = [c[0] for c in columns]
    kl = "kl_forward_exact" if "kl_forward_exact" in keys else ("kl_forward" if "kl_forward" in keys else None)
    return [c for c in columns if c[0] == kl or c[0] not in QUALITY]


def write_pareto(rows: list[dict], columns: list[tuple[str, str, str, bool]], out: Path) -> dict:
    """One plot per (quality, cost) pair; returns {quality: {cost: {"png": path, "front": names}}}."""
    fronts: dict = {}
    for key, _, label, lower in pareto_measures(columns):
        for cost in PARETO_COSTS:
            if sum(1 for r in rows if r.get(key) is not None and r.get(cost) is not None) < 1:
                continue
            png = out / f"pareto_{key}_vs_{cost}.png"
            front = pareto_plot(rows, str(png), quality_key=key, quality_label=label, cost_key=cost,
                                lower_is_better=lower)
            fronts.setdefault(key, {})[cost] = {"png": png.name, "front": front,
                                                "quality_label": label}
    return fronts


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    """report.md: the settings, one table row per model, the Pareto fronts with their plots."""
    rows, cols, s = report["models"], report["quality_columns"], report["settings"]
    memory_key = "peak_memory_mb" if any(r.get("peak_memory_mb") is not None for r in rows) else "peak_rss_mb"
    memory_label = "peak GPU memory MB" if memory_key == "peak_memory_mb" else "peak RSS MB"
    with_vllm = any(r.get("vllm_throughput_tokens_per_s") is not None for r in rows)
    header = ["model", "parameters (M)", "disk (MB)", "latency ms/token", "throughput tok/s"]
    header += ["vLLM tok/s"] if with_vllm else []
    header += [memory_label] + [short for _, short, _, _ in cols] + ["Pareto-optimal for"]
    lines = [f"# Evaluation report: {rows[0]['name']} and {len(rows) - 1} student(s)", "",
             f"Cost measured on **{rows[0].get('device', s['device'])}** in **{s['dtype']}**, each model in a fresh "
             f"process (torch {report['machine']['torch']}, {rows[0].get('threads')} thread(s)): latency = ms per "
             f"generated token at batch 1 (greedy, KV cache, prefill excluded); throughput = generated tokens/s at "
             f"batch {s['batch_size']}, {s['new_tokens']} new tokens each"
             + (" (vLLM: the same batch under vLLM)" if with_vllm else "") + "; memory = "
             + ("torch's peak allocated GPU memory" if memory_key == "peak_memory_mb" else
                "the peak resident memory of the measuring process, load included") + "; "
             f"median of {s['repeats']} repeat(s).", ""]
    legend = [LEGEND[k] for k, _, _, _ in cols if k in LEGEND]
    lines += ["; ".join(legend) + ".", ""] if legend else []
    for t in report["tasks"]:
        lines.append(f"Task **{t['task']}** ({t['kind']}): {t['metric']} over {t['n']} items, greedy answers "
                     f"(at most {s['task_max_new_tokens']} new tokens).")
    if s["eval_cache"]:
        lines.append(f"Fidelity on `{s['eval_cache']}` ({rows[0]['fidelity']['tokens']} scored tokens"
                     + (", every value of the teacher's distribution: exact KLs" if rows[0]['fidelity'].get('exact')
                        else "") + ").")
    elif any("fidelity" in r for r in rows):
        lines.append("Fidelity: each training run's own held-out evaluation at its end (no --eval-cache given).")
    lines += [""]
    fronts = report["pareto"]
    headers = {k: short for k, short, _, _ in cols}
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"]
    for r in rows:
        cells = [r["name"], _fmt(r.get("parameters") and r["parameters"] / 1e6, ".2f"),
                 _fmt(r.get("disk_bytes") and r["disk_bytes"] / MB, ".1f"), _fmt(r.get("latency_ms_per_token"), ".2f"),
                 _fmt(r.get("throughput_tokens_per_s"), ".1f")]
        cells += [_fmt(r.get("vllm_throughput_tokens_per_s"), ".1f")] if with_vllm else []
        cells += [_fmt(r.get(memory_key), ".0f")] + [_fmt(r.get(k), ".4g") for k, _, _, _ in cols]
        on = []
        for q, by_cost in fronts.items():
            axes = [("latency" if c.startswith("latency") else "size") for c, f in by_cost.items()
                    if r["name"] in f["front"]]
            if axes:
                on.append(f"{headers[q]} by {' and '.join(axes)}")
        cells.append("; ".join(on))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"{r['name']}: {r['vllm_error']}" for r in rows if r.get("vllm_error")]
    if errors:
        lines += ["", "vLLM could not measure: " + "; ".join(errors)]
    lines += ["", "## Pareto fronts", "",
              "A model is Pareto-optimal when no other model is at least as good on both axes and better on one."]
    for key, by_cost in fronts.items():
        for cost, f in by_cost.items():
            lines += ["", f"**{f['quality_label']} against {cost.replace('_', ' ')}**: {', '.join(f['front'])}", "",
                      f"![{key} against {cost}]({f['png']})"]
    return "\n".join(lines) + "\n"


def build_report(cfg: EvalReportConfig, log: Callable[[str], None] = print) -> dict:
    """Measure every model of ``cfg`` and write the report (module docstring); returns it."""
    from .cost import check_settings
    from .tasks import parse_task

    names = cfg.model_names()
    if not cfg.out:
        raise LogitcacheError("--out is required: the folder for report.json, report.md and the plots")
    if "://" in cfg.out:
        raise LogitcacheError(f"--out {cfg.out}: the report is written to a local folder")
    try:
        check_settings(cfg.new_tokens, cfg.batch_size, cfg.repeats, cfg.device, cfg.dtype)
    except ValueError as e:
        raise LogitcacheError(str(e)) from None
    dirs = [model_directory(path) for path in [cfg.teacher, *cfg.students]]   # all checked before any work
    tasks = [parse_task(t) for t in cfg.tasks]
    if cfg.eval_cache:
        from logitcache.store.reader import open_cache

        from .fidelity import check_tokenizer

        cache = open_cache(cfg.eval_cache, storage_options=cfg.storage_options)
        for d in dirs:
            check_tokenizer(str(d), cache)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = [measure_one(cfg, name, path, "teacher" if i == 0 else "student", tasks, out, log)
            for i, (name, path) in enumerate(zip(names, [cfg.teacher, *cfg.students]))]
    columns = quality_columns(rows, tasks)
    import torch

    report = {"settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "storage_options"},
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__},
              "tasks": [{"task": t.name, "kind": t.kind, "metric": t.metric, "column": t.column,
                         "n": rows[0]["tasks"][t.column]["n"]} for t in tasks],
              "quality_columns": columns, "models": rows}
    report["pareto"] = write_pareto(rows, columns, out)
    (out / "report.md").write_text(markdown(report))
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / "report.json")
    return report
