"""`student-train`: distil a student from a logitcache cache. Thin: flags -> TrainConfig -> train()."""

from __future__ import annotations

import os

import click

from logitcache.cli.common import echo_json, handle_errors, parse_storage_options, storage_options_option


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("cache", required=False)
@click.option("--out", "-o", help="Run directory: checkpoint/, log.jsonl, tensorboard/, student/, report.json, curves.png.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="A JSON TrainConfig (every setting below by its long name); flags given override it.")
@click.option("--student", help="Student: a Hugging Face id, a local model directory, or a config.json (random init).")
@click.option("--keep-layers", help="Or derive the student from the cache's teacher, keeping these decoder layers: "
                                    "'0,2,4,...' or 'every:2' (weights copied).")
@click.option("--selection", type=click.Path(dir_okay=False),
              help="Train only on the samples of this selection file (logitcache select / query --out).")
@click.option("--where", help="Train only on samples matching this SQL condition over the samples view of `logitcache "
                              "query`, e.g. 'mean_entropy > 1.5 and response_tokens > 20'.")
@click.option("--seq-len", type=int, help="Tokens per packed row (documents never cross rows).  [default: 512]")
@click.option("--batch-size", type=int, help="Rows per micro-batch per process.  [default: 8]")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.  [default: 1]")
@click.option("--max-steps", type=int, help="Optimizer steps (default: --epochs over the data).")
@click.option("--epochs", type=int, help="[default: 1]")
@click.option("--lr", type=float, help="Peak AdamW learning rate; warmup then cosine.  [default: 3e-4]")
@click.option("--warmup-steps", type=int, help="[default: 10]")
@click.option("--weight-decay", type=float)
@click.option("--clip", type=float, help="Gradient norm clip.  [default: 1.0]")
@click.option("--loss", type=click.Choice(["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl",
                                           "generalized_jsd", "total_variation", "policy_gradient"]),
              help="forward_kl = KL(p_teacher||q_student), mode-covering (default); reverse_kl = KL(q||p), "
                   "mode-seeking; skew KLs (DistiLLM, --loss-arg alpha=0.1); generalized_jsd (GKD, "
                   "--loss-arg beta=0.5); total_variation; policy_gradient: reverse KL on the student's own "
                   "samples by policy gradient, on a round cache (student-onpolicy; --loss-arg discount=0 "
                   "clip=0.2).")
@click.option("--loss-arg", "loss_args", multiple=True, metavar="KEY=VALUE", help="Argument of the divergence.")
@click.option("--tail", type=click.Choice(["bucket", "renormalize"]),
              help="bucket: the teacher's mass outside the stored top-k is one extra outcome (default); "
                   "renormalize: compare on the top-k only (biased).")
@click.option("--full-targets/--no-full-targets", default=None,
              help="On a cache captured with --encoding full: train on every value of the teacher's distribution "
                   "(the divergence exact over the whole vocabulary; the dense reference), not its stored top-k.")
@click.option("--temperature", type=float, help="Distillation temperature T: both distributions softened by T, loss times T^2 (not the "
                   "capture's generation or proposal temperature).  [default: 1]")
@click.option("--ce-alpha", type=float, help="Weight of hard-label cross-entropy: alpha*CE + (1-alpha)*KD.  [default: 0]")
@click.option("--entropy-above", type=float, help="Distil only tokens whose teacher entropy (nats) is above this.")
@click.option("--entropy-below", type=float, help="... or below this.")
@click.option("--entropy-top-frac", type=float, help="... or only the top fraction of each batch's tokens by entropy.")
@click.option("--entropy-bottom-frac", type=float, help="... or the bottom fraction.")
@click.option("--token-select", type=click.Choice(["all", "teacher-entropy", "student-entropy", "random"]),
              help="Distil only the --top-frac of loss positions with the highest score: the student's entropy "
                   "(from the same forward pass; SE-KD), the teacher's stored entropy, or a random draw; CE "
                   "(--ce-alpha) stays on every position.  [default: all]")
@click.option("--top-frac", type=float, help="With --token-select: the share of positions distilled, e.g. 0.2.")
@click.option("--select-per", type=click.Choice(["batch", "sequence"]),
              help="With --token-select: the share counted over each micro-batch or each row.  [default: batch]")
@click.option("--offpolicy-cache", help="GKD mix: CACHE is a round cache of the student's samples and the rest of each "
                                         "batch comes from this teacher-response cache, trained with forward KL.")
@click.option("--onpolicy-frac", type=float, help="The share lambda of each batch's rows from CACHE when "
                                                  "--offpolicy-cache is given; loss = lambda L_on + (1 - lambda) "
                                                  "L_off.  [default: 1]")
@click.option("--teacher", "teachers", multiple=True,
              help="Multi-teacher: another cache over the same samples (same tokenizer), repeatable.")
@click.option("--teacher-weights", help="Comma-separated loss weights, main cache first (default: equal).")
@click.option("--layer-map", help="Feature distillation: student:teacher layer pairs, e.g. 2:12,5:-1 "
                                  "(the cache must hold those teacher layers).")
@click.option("--hidden-loss", type=click.Choice(["cosine", "mse"]))
@click.option("--hidden-weight", type=float)
@click.option("--attention-transfer", "attention_transfer",
              help="Attention transfer: student:teacher decoder block pairs, e.g. 3:11,7:23 (the cache must hold "
                   "those blocks' queries and keys: capture --attention-layers).")
@click.option("--attention-transfer-weight", type=float, help="Its weight beside the logit loss.  [default: 1.0]")
@click.option("--attention-relations", type=int,
              help="Relation heads per block (MiniLMv2; needed when head widths differ).  [default: the teacher's "
                   "query heads]")
@click.option("--eval-frac", type=float, help="Held-out share of the cache, chosen by sample id.  [default: 0.05]")
@click.option("--eval-cache", help="Evaluate on this cache instead of a held-out split (all of it is trained on); one "
                                   "captured with --encoding full adds the exact KL over the whole vocabulary.")
@click.option("--eval-every", type=int, help="Evaluate every N steps (0: at start and end).")
@click.option("--save-every", type=int, help="Checkpoint every N steps.  [default: 50]")
@click.option("--seed", type=int)
@click.option("--num-workers", type=int, help="DataLoader worker processes.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="auto: bf16 autocast on CUDA.")
@click.option("--attention", type=click.Choice(["auto", "flash", "flex", "sdpa", "dense"]),
              help="How packed documents are kept apart: flash (varlen kernels, CUDA + flash-attn), flex (block-sparse "
                   "mask, CUDA), sdpa (position restarts), dense (a (B,1,T,T) mask, any model); auto = the first of "
                   "these that passes a packed-vs-alone probe on the student (docs/training.md).  [default: auto]")
@click.option("--parallel", type=click.Choice(["ddp", "fsdp"]),
              help="Under torchrun: ddp (a full student per rank) or fsdp (FSDP2: parameters, gradients and optimizer "
                   "state sharded; checkpoints sharded).  [default: ddp]")
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=None,
              help="Recompute each decoder block's activations in backward (less memory, ~1/3 more compute).")
@click.option("--fused-loss", type=click.Choice(["auto", "on", "off"]),
              help="LM head and loss computed chunk by chunk of rows, never the (B, T, V) logits; auto = when a "
                   "micro-batch's logits would fill over a quarter of the device's memory and the student's head "
                   "allows it (docs/training.md).  [default: auto]")
@click.option("--cross-tokenizer-loss", type=click.Choice(["map+uld", "map", "uld"]),
              help="A --student whose tokenizer is not the teacher's: map = the --loss divergence over the teacher "
                   "entries that have a student token (same bytes), the rest of the mass as the tail bucket; uld = "
                   "Universal Logit Distillation (sorted probabilities, no mapping); map+uld = map where an entry "
                   "maps, ULD where none does (docs/training.md).  [default: map+uld]")
@click.option("--teacher-tokenizer", type=click.Path(file_okay=False),
              help="The teacher's tokenizer directory, for a student with another tokenizer when the cache's teacher "
                   "is not on this machine.  [default: the teacher's directory]")
@click.option("--resume/--no-resume", default=None, help="Continue from OUT/checkpoint if present (default) or start over.")
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
@storage_options_option
@handle_errors
def cli(cache, out, config_file, loss_args, layer_map, attention_transfer, teachers, teacher_weights, no_progress,
        as_json, storage_options, **flags):
    """Distil a student from CACHE (a logitcache directory or fsspec URL) without loading the teacher.

    Streams the cache's top-k log-probs (and hidden states with --layer-map), trains with an explicit
    loop (AdamW, warmup + cosine, accumulation, clipping), checkpoints every --save-every steps and
    resumes exactly when run again. Under torchrun each process is one DDP rank.

    \b
    Examples:
      student-train ./cache --out run1 --keep-layers every:2 --max-steps 200
      student-train ./cache --out run2 --student HuggingFaceTB/SmolLM2-135M --loss reverse_kl
      student-train ./cache --out run3 --keep-layers every:2 --selection hard.parquet
      torchrun --nproc-per-node 8 $(which student-train) s3://bucket/cache --out run4 --student ./student
    """
    from logitcache.format.errors import LogitcacheError

    from .config import TrainConfig, parse_layer_map
    from .train import train

    base = {}
    if config_file:
        base = TrainConfig.load(config_file)
    if cache:
        base["cache"] = cache
    if out:
        base["out"] = out
    for key, value in flags.items():
        if value is not None:
            base[key] = value
    options = parse_storage_options(storage_options)
    if options is not None:
        base["storage_options"] = options
    if loss_args:
        base["loss_args"] = dict(parse_loss_arg(a) for a in loss_args)
    if layer_map:
        base["layer_map"] = parse_layer_map(layer_map)
    if attention_transfer:
        base["attention_transfer"] = parse_layer_map(attention_transfer, "--attention-transfer")
    if teachers:
        base["teachers"] = list(teachers)
    if teacher_weights:
        try:
            base["teacher_weights"] = [float(w) for w in teacher_weights.split(",")]
        except ValueError:
            raise LogitcacheError(f"--teacher-weights {teacher_weights!r}: expected numbers such as 0.7,0.3") from None
    for required in ("cache", "out"):
        if not base.get(required):
            raise LogitcacheError(f"missing {'CACHE' if required == 'cache' else '--out'} (or give it in --config)")
    cfg = TrainConfig.from_dict(base)
    existed = os.path.exists(cfg.out)
    try:
        report = train(cfg, progress=not no_progress)
    except BaseException:
        if not existed and os.environ.get("RANK", "0") == "0":
            remove_failed_run(cfg.out)
        raise
    if not report:
        return                                   # not the main process
    if as_json:
        echo_json(report)
        return
    start, end = report["eval_start"] or {}, report["eval_end"] or {}
    click.echo(f"trained {report['steps']} steps on {report['train_samples']} samples: "
               f"{report['tokens_per_second']:.0f} tokens/s, peak memory {report['peak_memory_mb']:.0f} MB")
    if "kl_forward" in end:
        click.echo(f"held-out ({report['eval_samples']} samples): KL(teacher||student) "
                   f"{start.get('kl_forward', float('nan')):.3f} -> {end['kl_forward']:.3f} nats, "
                   f"perplexity {start.get('perplexity', float('nan')):.2f} -> {end['perplexity']:.2f}, "
                   f"top-1 agreement {start.get('top1_agreement', float('nan')):.3f} -> {end['top1_agreement']:.3f}")
    if "kl_forward_exact" in end:
        click.echo(f"exact over the full vocabulary: KL(teacher||student) {start.get('kl_forward_exact', float('nan')):.3f}"
                   f" -> {end['kl_forward_exact']:.3f}, KL(student||teacher) "
                   f"{start.get('kl_reverse_exact', float('nan')):.3f} -> {end['kl_reverse_exact']:.3f} nats")
    click.echo(f"student: {report['student_dir']} ({report['parameters'] / 1e6:.1f} M parameters); "
               f"curves: {report['plot']}")


def remove_failed_run(out: str) -> None:
    """A run that failed before its first checkpoint leaves nothing behind (a later run would otherwise
    append to its logs); one with a checkpoint is kept, to resume."""
    import shutil

    from .checkpoint import find_checkpoint

    if os.path.isdir(out) and find_checkpoint(out) is None:
        shutil.rmtree(out, ignore_errors=True)


def parse_loss_arg(item: str) -> tuple[str, float]:
    key, sep, value = item.partition("=")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise click.BadParameter(f"{item!r}: expected KEY=NUMBER, e.g. alpha=0.1", param_hint="--loss-arg") from None


if __name__ == "__main__":
    cli()
