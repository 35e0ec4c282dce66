"""`student-onpolicy`: on-policy distillation in rounds (``rounds``), and its steps on their own. Thin:
flags (made from ``RoundsConfig``'s fields) -> config -> the recipe."""

from __future__ import annotations

import dataclasses

import click

from logitcache.cli.common import echo_json, handle_errors

from .cli import parse_loss_arg
from .rounds import RoundsConfig

HELP = {
    "teacher": "The teacher that scores the student's samples (logitcache capture --teacher).",
    "student": "The starting student: a Hugging Face model directory with the teacher's tokenizer.",
    "keep_layers": "Or cut the starting student from the teacher: '0,2,4,...' or 'every:3' (weights copied).",
    "prompts": "Prompt rows: builtin, a jsonl/json/parquet/csv file with a prompt or messages column, or a dataset.",
    "prompts_per_round": "Prompts each round samples: rows [r*n, (r+1)*n) of --prompts, wrapping around.",
    "rounds": "Rounds of sample -> score -> train.",
    "steps_per_round": "Optimizer steps of student-train per round (a fresh optimizer and schedule each round).",
    "encoding": "How the teacher's scores are stored (logitcache capture --encoding).",
    "backend": "The teacher's engine: auto (vLLM when installed), hf or vllm.",
    "loss": "policy_gradient (reverse KL by policy gradient on the sampled tokens), or a divergence over the stored "
            "distribution: reverse_kl, skew_reverse_kl, generalized_jsd, forward_kl, ... (student-train --loss).",
    "offpolicy_cache": "GKD mix: the rest of each batch from this teacher-response cache, with forward KL.",
    "onpolicy_frac": "The share lambda of each batch from the round's samples when --offpolicy-cache is given.",
    "eval_prompts": "Held-out prompts: after each round the student answers --eval-limit of them greedily and the "
                    "teacher scores the answers with --encoding full (exact KL(q||p), teacher log-likelihood).",
    "eval_limit": "How many --eval-prompts rows.",
    "eval_offset": "The first --eval-prompts row (e.g. held-out rows at the end of the training prompts).",
    "eval_cache": "A cache of teacher text captured with --encoding full: exact KL(p||q) on it after each round.",
    "max_new_tokens": "Longest student response.",
    "temperature": "The student's sampling temperature (1: its own distribution, what on-policy means).",
    "top_p": "The student's nucleus sampling threshold.",
    "generate_batch_size": "Prompts sampled at once (transformers).",
    "generator": "The student's sampler: auto (vLLM where the student samples on a GPU and vLLM is installed, "
                 "else transformers), transformers or vllm.",
    "seq_len": "student-train --seq-len.",
    "batch_size": "student-train --batch-size.",
    "lr": "student-train --lr.",
    "warmup_steps": "student-train --warmup-steps, each round.",
    "seed": "Seeds sampling (round r: seed*1000 + r) and training.",
    "train_config": "A JSON file of further student-train settings (student-train --config).",
    "device": "Where the student samples and is evaluated: cpu or cuda.",
}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(RoundsConfig)}


def config_options(fn):
    """One click option per ``RoundsConfig`` field (``--loss-arg`` for its dict), defaults shown."""
    for f in reversed(dataclasses.fields(RoundsConfig)):
        if f.name == "out":
            continue
        if f.name == "loss_args":
            fn = click.option("--loss-arg", "loss_args", multiple=True, metavar="KEY=VALUE",
                              help="Argument of the loss (student-train --loss-arg), repeatable.")(fn)
            continue
        default = DEFAULTS[f.name]
        kind = {"int": int, "float": float}.get(type(default).__name__, str)
        shown = "" if default is None or default is dataclasses.MISSING else f"  [default: {default}]"
        fn = click.option("--" + f.name.replace("_", "-"), f.name, type=kind, default=None,
                          help=HELP.get(f.name, "") + shown)(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """On-policy distillation in rounds: the student samples, the teacher scores exactly those tokens into a
    cache, the student trains on it (docs/training.md, "On-policy rounds")."""


@cli.command()
@click.argument("out")
@config_options
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@handle_errors
def run(out, loss_args, no_progress, as_json, **flags):
    """Run (or continue) the rounds into directory OUT: round-NNN/{rollouts.jsonl, cache/, train/, eval/},
    commands.sh (every scoring and training command as it ran), report.json, rounds.png.

    \b
    Examples:
      student-onpolicy run rounds --keep-layers every:3 --rounds 2 --eval-prompts held_out.jsonl
      student-onpolicy run rounds2 --student ./student --loss reverse_kl --encoding compact
      student-onpolicy run gkd --student ./student --loss generalized_jsd --loss-arg beta=0.5 \\
          --offpolicy-cache ./teacher_cache --onpolicy-frac 0.5
    """
    from .config import TrainConfig
    from .rounds import Rounds, rounds_config

    args = {k: v for k, v in flags.items() if v is not None}
    if loss_args:
        args["loss_args"] = {k: v for k, v in (parse_loss_arg(a) for a in loss_args)}
    cfg = rounds_config(out=out, **args)
    TrainConfig(cache="-", out="-", student="-", loss=cfg.loss, loss_args=dict(cfg.loss_args),   # checked up front
                offpolicy_cache=cfg.offpolicy_cache, onpolicy_frac=cfg.onpolicy_frac)
    report = Rounds(cfg, progress=not no_progress, log=lambda m: click.echo(m, err=True)).run()
    if as_json:
        echo_json(report)
    else:
        click.echo(f"student after {cfg.rounds} round(s): {report['student_dir']}; report: {out}/report.json")


@cli.command()
@click.argument("student")
@click.option("--prompts", default="builtin", show_default=True, help=HELP["prompts"])
@click.option("--limit", type=int, help="How many prompt rows (default: all).")
@click.option("--offset", type=int, default=0, show_default=True, help="The first prompt row.")
@click.option("--out", "-o", required=True, help="The rows to score: a .jsonl file (and OUT.info.json).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--generate-batch-size", type=int, default=16, show_default=True)
@click.option("--generator", type=click.Choice(["auto", "transformers", "vllm"]), default="auto", show_default=True,
              help=HELP["generator"])
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def generate(student, prompts, limit, offset, out, max_new_tokens, temperature, top_p, seed, generate_batch_size,
             generator, device, no_progress, as_json):
    """STUDENT answers prompts; writes the rows `logitcache capture --mode score --input OUT` reads as token ids
    (prompt_ids, response_ids, behaviour_logprobs) and their provenance (`--rollout-info OUT.info.json`)."""
    from .rollout import SamplingSettings, read_prompts, rollout

    if not out.endswith(".jsonl"):
        raise click.BadParameter(f"{out!r}: the rows are JSON lines; name the file *.jsonl", param_hint="--out")
    settings = SamplingSettings(max_new_tokens, temperature, top_p, seed, generate_batch_size)
    info = rollout(student, read_prompts(prompts, limit, offset), settings, out, source=prompts, device=device,
                   progress=not no_progress, generator=generator)
    if as_json:
        echo_json(info)
    else:
        click.echo(f"{info['samples']} responses, {info['response_tokens']} tokens -> {out}")


@cli.command()
@click.argument("student")
@click.option("--teacher", default=DEFAULTS["teacher"], show_default=True, help=HELP["teacher"])
@click.option("--prompts", required=True, help="Held-out prompt rows (as --prompts).")
@click.option("--limit", type=int, default=32, show_default=True)
@click.option("--offset", type=int, default=0, show_default=True, help="The first prompt row.")
@click.option("--out", "-o", required=True, help="Directory: rollouts.jsonl, cache/ (--encoding full), metrics.json.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "vllm", "hf"]), default="auto", show_default=True,
              help="The teacher's engine for scoring (logitcache capture --backend).")
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def evaluate(student, teacher, prompts, limit, offset, out, max_new_tokens, device, backend, no_progress, as_json):
    """The on-policy measures of STUDENT (any student, on-policy trained or not): its greedy answers to held-out
    prompts, scored by the teacher over the whole vocabulary: exact KL(q||p) and KL(p||q) per token of its own
    text, and the teacher's log-likelihood per token of it."""
    from .rounds import evaluate_onpolicy

    metrics = evaluate_onpolicy(student, teacher, prompts, limit, out, offset=offset, max_new_tokens=max_new_tokens,
                                device=device, progress=not no_progress, backend=backend)
    if as_json:
        echo_json(metrics)
    else:
        click.echo(f"KL(student||teacher) {metrics['kl_reverse_exact']:.3f}, KL(teacher||student) "
                   f"{metrics['kl_forward_exact']:.3f} nats/token on {metrics['response_tokens']} tokens of its own "
                   f"text; teacher log-likelihood {metrics['teacher_logprob_per_token']:.3f} nats/token")


if __name__ == "__main__":
    cli()
