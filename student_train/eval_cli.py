"""`student-eval`: the teacher and its students side by side (``eval_report``). Thin: flags (one per
``EvalReportConfig`` field) -> config -> ``eval_report.build_report`` -> a summary."""

from __future__ import annotations

import dataclasses

import click

from logitcache.cli.common import STORAGE_OPTIONS_HELP, echo_json, handle_errors, parse_storage_options

from .eval_report import EvalReportConfig

HELP = {
    "names": "Comma-separated names, the teacher's first (default: 'teacher' and the students' folder names).",
    "tasks": "A task: 'arithmetic' (shipped: 64 problems, exact match on the number), a JSON-lines file of "
             "prompt/answer rows, lm-eval:NAME, or an lm-eval task YAML (needs the extra logitcache[eval]); "
             "repeatable; 'none' for no task.",
    "task_limit": "Items per task at most (default: all).",
    "task_max_new_tokens": "Tokens each answer may take (greedy).",
    "eval_cache": "Fidelity on this cache (one captured with --encoding full gives the exact forward and reverse "
                  "KL); the models must use its tokenizer.",
    "seq_len": "Tokens per row of the fidelity pass (raised to the longest sample: samples are never cut).",
    "device": "cpu, cuda or cuda:N: where every model is measured.",
    "dtype": "float32, bfloat16 or float16: the weights' dtype for every measure.",
    "new_tokens": "Tokens generated per sequence for latency and throughput.",
    "batch_size": "Sequences generated together for throughput (and task answers per batch).",
    "repeats": "Timed repeats; the median is reported.",
    "threads": "torch CPU threads (default: torch's own choice).",
    "vllm": "Also measure vLLM's throughput (default: when vLLM is installed).",
    "onpolicy_prompts": "Held-out prompts: each model answers them greedily and the teacher scores the answers "
                        "(--encoding full), adding KL(model || teacher) on its own text.",
    "onpolicy_limit": "How many --onpolicy-prompts rows.",
    "storage_options": STORAGE_OPTIONS_HELP,
}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalReportConfig)
            if f.default is not dataclasses.MISSING}


def config_options(fn):
    for f in reversed(dataclasses.fields(EvalReportConfig)):
        if f.name in ("teacher", "students", "out"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "tasks":
            fn = click.option("--task", "tasks", multiple=True, help=HELP["tasks"] + "  [default: arithmetic]")(fn)
        elif f.name == "vllm":
            fn = click.option("--vllm/--no-vllm", "vllm", default=None, help=HELP["vllm"])(fn)
        elif f.name == "storage_options":
            fn = click.option(flag, f.name, help=HELP[f.name])(fn)
        else:
            kind = int if "int" in str(f.type) else str
            fn = click.option(flag, f.name, type=kind, default=DEFAULTS[f.name],
                              show_default=DEFAULTS[f.name] is not None, help=HELP[f.name])(fn)
    return fn


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("teacher")
@click.argument("students", nargs=-1)
@click.option("--out", "-o", required=True, help="Folder for report.json, report.md, the Pareto plots and the "
                                                 "tasks' per-item answers.")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def cli(teacher, students, out, tasks, storage_options, as_json, **fields):
    """Measure TEACHER and each STUDENT side by side: task accuracy, fidelity to the teacher, size,
    latency, throughput and memory, and which models are Pareto-optimal. TEACHER is an embedded
    teacher's name (smollm2-135m) or a model directory; a STUDENT is a model directory or a
    student-train run folder (its report.json is reused).

    \b
    Examples:
      student-eval smollm2-135m ./run --out ./report
      student-eval TEACHER_DIR ./run-a ./run-b --eval-cache ./eval-full --task arithmetic --task my_task.yaml
    """
    from .eval_report import build_report

    options = parse_storage_options(storage_options)
    tasks = [t for t in (tasks or ("arithmetic",)) if t != "none"]
    cfg = EvalReportConfig(teacher=teacher, students=list(students), out=out, tasks=tasks, storage_options=options,
                           **fields)
    report = build_report(cfg, log=(lambda m: click.echo(m, err=True)))
    if as_json:
        echo_json(report)
        return
    click.echo((cfg.out.rstrip("/") + "/report.md:\n") + open(f"{cfg.out}/report.md").read().split("\n## Pareto")[0])
    click.echo(f"wrote {out}/report.json, {out}/report.md and {sum(len(v) for v in report['pareto'].values())} plot(s)")


if __name__ == "__main__":
    cli()
