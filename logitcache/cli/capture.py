"""`logitcache capture`: flags -> CaptureJob -> run_capture -> summary."""

from __future__ import annotations

import contextlib
import os
import sys

import click

from ..format.encodings import DEFAULT_ENCODING, names as encoding_names
from ..format.errors import InputError
from .common import echo_json, handle_errors, parse_storage_options, storage_options_option


def _layers(ctx, param, value: str | None) -> list[int]:
    if not value:
        return []
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers such as 4,12,-1") from None


def _engine_args(ctx, param, values: tuple[str, ...]) -> dict:
    import json

    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _rollout_info(path: str | None) -> dict | None:
    """The JSON object of ``--rollout-info FILE.json`` (the manifest's ``rollout``), or a one-line error."""
    import json

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise InputError(f"--rollout-info {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--rollout-info {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"--rollout-info {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(value, dict):
        raise InputError(f"--rollout-info {path}: must hold a JSON object, not {type(value).__name__}")
    return value


def _worker_default(names: tuple[str, ...], fallback: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            try:
                return int(os.environ[name])
            except ValueError:
                raise click.UsageError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None
    return fallback


@click.command(context_settings={"max_content_width": 100})
@click.argument("cache")
@click.option("--teacher", default="smollm2-135m", show_default=True,
              help="Embedded teacher name, local Hugging Face model directory, or hub id.")
@click.option("--backend", type=click.Choice(["auto", "vllm", "hf"]), default="auto", show_default=True,
              help="Inference engine: vllm (fast) or hf (transformers); auto: vllm when installed, else hf. "
                   "Both capture every encoding. The choice and its reason are printed (and in --json).")
@click.option("--mode", type=click.Choice(["generate", "score"]), default="generate", show_default=True,
              help="generate: the teacher writes responses (response / chain-of-thought distillation). "
                   "score: teacher forcing over given text or prompt+response pairs.")
@click.option("--input", "source", default="builtin", show_default=True,
              help="jsonl/json/parquet/csv file, a `datasets` name, or 'builtin' (300 shipped prompts).")
@click.option("--split", default="train", show_default=True, help="Dataset split (datasets names only).")
@click.option("--prompt-column", default=None, help="Column with the user prompt (default: 'prompt').")
@click.option("--messages-column", default=None, help="Column with chat messages [{role, content}, ...].")
@click.option("--text-column", default=None, help="Score mode: column with plain text (default: 'text').")
@click.option("--response-column", default=None, help="Score mode: column with the response to score after the prompt. "
                   "Token ids instead of text: columns prompt_ids and response_ids (used verbatim; found by "
                   "name, before text columns), optionally behaviour_logprobs (one per response token).")
@click.option("--source-name", default=None,
              help="Name sample ids are derived from (default: the file name or dataset name).")
@click.option("--limit", type=int, default=None, help="Use only the first N rows.")
@click.option("--encoding", type=click.Choice(encoding_names()),
              default=DEFAULT_ENCODING, show_default=True,
              help="How the distribution is stored (docs/format.md, 'Encodings'; which to pick: docs/results.md). "
                   "topk: k ids + fp16 log-probs (the 1.1 layout). adaptive: per token the fewest ids with mass >= --keep-mass, at "
                   "most --top-k. compact: adaptive with ids delta-coded and --bits-bit log-scale values. sampled: "
                   "--draws ids drawn from the teacher (unbiased; forward KL / CE only). hybrid: exact top-k head + "
                   "draws from the tail. full: every value (small evaluation sets: exact KL in training reports).")
@click.option("--top-k", type=int, default=None,
              help="Ids kept per token: k of topk/full (64), the cap of adaptive (128) and compact (64), the head of "
                   "hybrid (16).")
@click.option("--keep-mass", type=float, default=None, help="adaptive/compact: mass to reach per token, recorded as the encoding's top_p [0.99].")
@click.option("--bits", type=int, default=None, help="compact/hybrid: bits per log-prob code [8 / 10].")
@click.option("--draws", type=int, default=None, help="sampled/hybrid: draws per token [64].")
@click.option("--proposal-temperature", type=float, default=None,
              help="sampled: draw from softmax(logits / T), T >= 1, with importance weights, recorded as the "
                   "encoding's temperature; not --temperature [1].")
@click.option("--logprob-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--with-prompt", is_flag=True, help="Generate mode: store distributions over prompt tokens too.")
@click.option("--hidden-layers", callback=_layers, default=None,
              help="Hidden states to store, e.g. 4,12,-1 (0 = embeddings, -1 = final layer after its norm).")
@click.option("--hidden-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Storage dtype of hidden states and of --attention-layers' queries and keys.")
@click.option("--attention-layers", callback=_layers, default=None,
              help="Decoder blocks whose attention queries and keys to store (post-rotary, per head: the "
                   "attention is rebuilt per document at training time), e.g. 0,15,29 or -1 (the last block). "
                   "hf backend.")
@click.option("--system-prompt", default=None, help="System message for generate mode (default: the template's).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="Generate mode: sampling temperature of the responses, 0 = greedy decoding. The stored "
                   "distributions are always at T=1 (the proposal of `sampled` is --proposal-temperature).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Generate mode: nucleus sampling of the responses. Not the stored mass (that is --keep-mass).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (each shard derives its own).")
@click.option("--num-samples", "-n", type=int, default=1, show_default=True, help="Responses per prompt.")
@click.option("--max-length", "--max-model-len", "max_length", type=int, default=None, help="Context limit in tokens (default: the teacher's).")
@click.option("--truncate", is_flag=True, help="Cut over-long sequences instead of skipping them (recorded).")
@click.option("--samples-per-shard", type=int, default=None,
              help="Input rows per shard: the unit of commit, resume and work split [256; 8 for --encoding full].")
@click.option("--num-workers", type=int, default=None,
              help="Workers sharing this input [default: $WORLD_SIZE, $SLURM_NTASKS or 1].")
@click.option("--worker-index", type=int, default=None,
              help="This worker's index [default: $RANK, $SLURM_PROCID, $JOB_COMPLETION_INDEX (Kubernetes) or 0].")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Who runs the engines. local: this process, one engine (many machines: --num-workers). ray: one "
                   "engine per Ray actor; a free actor takes the next shard, a shard whose actor dies is retried on "
                   "another; the driver records every shard (docs/distributed.md). Needs logitcache[ray]; "
                   "--num-workers and the worker variables ($RANK, ...) do not apply.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="--executor ray: the cluster to join, e.g. ray://head:10001, or auto (the one `ray start` runs "
                   "on this machine) [default: $RAY_ADDRESS, else a new local Ray with this machine's CPUs and GPUs].")
@click.option("--ray-actors", type=int, default=None,
              help="--executor ray: engines to start [default: as many as the cluster's GPUs hold at "
                   "--ray-gpus-per-actor each; on a cluster without GPUs, its CPUs at --ray-cpus-per-actor].")
@click.option("--ray-gpus-per-actor", type=float, default=None,
              help="--executor ray: GPUs of each engine [default: --tensor-parallel-size on a cluster with GPUs, "
                   "else 0].")
@click.option("--ray-cpus-per-actor", type=float, default=1.0, show_default=True,
              help="--executor ray: CPUs of each engine (its torch threads when it runs on CPUs).")
@click.option("--ray-max-retries", type=int, default=3, show_default=True,
              help="--executor ray: further attempts of a shard whose actor died or failed, before the run stops "
                   "(the same command resumes).")
@click.option("--dtype", default="auto", show_default=True, help="Teacher compute dtype: auto, float32, bfloat16, float16.")
@click.option("--device", default="auto", show_default=True, help="hf backend device: auto, cpu, cuda, cuda:1, ...")
@click.option("--batch-tokens", type=int, default=8192, show_default=True,
              help="hf backend: padded tokens per forward pass.")
@click.option("--tensor-parallel-size", "-tp", type=int, default=1, show_default=True,
              help="vllm backend: GPUs per engine (tensor parallel).")
@click.option("--gpu-memory-utilization", type=float, default=None, help="vllm backend: share of GPU memory to use.")
@click.option("--engine-arg", "engine_args", multiple=True, callback=_engine_args, metavar="KEY=VALUE",
              help="vllm backend: any vllm.LLM argument, repeatable (VALUE parsed as JSON when it can be), "
                   "e.g. --engine-arg enforce_eager=true --engine-arg max_num_seqs=64.")
@click.option("--positions-from", "positions_from", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Store the teacher's distribution only where this student (a model directory with the teacher's "
                   "tokenizer) is most unsure: per sample the --keep-frac scored rows of highest student entropy; "
                   "other rows keep token, entropy and target log-prob (format 1.6, docs/format.md).")
@click.option("--keep-frac", "keep_frac", type=float, default=None,
              help="With --positions-from: the share of each sample's scored rows that keep a distribution.  "
                   "[default: 0.2]")
@click.option("--rollout-info", "rollout_info", default=None, metavar="FILE.json",
              help="Score mode, on-policy rounds: a JSON object recorded as the manifest's `rollout` (round, "
                   "student fingerprint, sampling settings, ...); a cache holds one round.")
@click.option("--codec", type=click.Choice(["auto", "blosc-zstd-shuffle", "blosc-zstd-bitshuffle", "zstd"]),
              default="auto", show_default=True,
              help="Compression of the arrays; auto = the measured best per array (docs/format.md).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@storage_options_option
@handle_errors
def capture(cache, as_json, no_progress, num_workers, worker_index, rollout_info, storage_options, **opts):
    """Capture a teacher's per-token statistics into CACHE (a directory or fsspec URL).

    For every scored token: the teacher's next-token distribution in the chosen --encoding (by
    default compact: the most probable ids up to 99% of the mass, at most 64, with 8-bit log-prob
    codes and the exact remaining mass; log-softmax over the full vocabulary at T=1), the exact
    entropy, the actual next token's log-probability and, with --hidden-layers, hidden states.

    Re-running the same command resumes: committed shards are skipped. Many workers (nodes, GPUs)
    can write one cache: each takes the shards j with j % num_workers == worker_index, and the last
    one to finish writes manifest.json. With --executor ray, one command drives engines on a Ray
    cluster instead: free actors take the next shard, and a failed shard is retried elsewhere.

    \b
    Examples:
      logitcache capture ./cache --limit 50
      logitcache capture ./cache --mode score --input corpus.parquet --text-column text --hidden-layers -1
      logitcache capture ./round0 --mode score --input rollouts.jsonl --rollout-info round0.json
      srun logitcache capture s3://bucket/cache --input prompts.jsonl   # workers from $SLURM_*
      logitcache capture s3://bucket/cache --input prompts.jsonl --executor ray --ray-address ray://head:10001
    """
    from ..teacher.capture import CaptureJob, run_capture

    rollout = _rollout_info(rollout_info)
    if opts["executor"] == "ray":         # Ray hands out the shards: the worker variables do not apply
        num_workers = 1 if num_workers is None else num_workers
        worker_index = 0 if worker_index is None else worker_index
    if (num_workers is None and os.environ.get("JOB_COMPLETION_INDEX", "").strip()
            and not any(os.environ.get(v, "").strip() for v in ("WORLD_SIZE", "SLURM_NTASKS"))):
        raise click.UsageError("JOB_COMPLETION_INDEX is set (a Kubernetes indexed Job) but the number of workers is "
                               "not: pass --num-workers with the Job's completions")
    job = CaptureJob(
        cache=cache, progress=not no_progress, rollout=rollout, storage_options=parse_storage_options(storage_options),
        num_workers=num_workers if num_workers is not None else _worker_default(("WORLD_SIZE", "SLURM_NTASKS"), 1),
        worker_index=worker_index if worker_index is not None else _worker_default(
            ("RANK", "SLURM_PROCID", "JOB_COMPLETION_INDEX"), 0),
        **opts)
    # stdout carries the summary alone: what engines or Ray print meanwhile (Ray prints a dead worker's
    # message to stdout) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_capture(job)
    if as_json:
        echo_json(summary.to_dict())
        return
    s = summary
    who = "ray" if job.executor == "ray" else f"worker {s.worker_index}/{s.num_workers}"
    click.echo(f"{who}: wrote {s.shards_written} shard(s), "
               f"{s.shards_already_committed} already committed; {s.samples} samples, {s.tokens} tokens "
               f"({s.scored_tokens} scored), {s.skipped} skipped; {s.wall_seconds:.1f} s: "
               f"{s.tokens_per_second:.0f} tokens/s, {s.scored_tokens / max(s.wall_seconds, 1e-9):.0f} scored tokens/s")
    if s.complete:
        click.echo(f"cache complete: {s.cache}")
        click.echo("bytes/token: " + ", ".join(f"{k} {v:.1f}" for k, v in s.bytes_per_token.items()))
    else:
        click.echo("cache not complete yet: other workers still have shards to write "
                   "(the last one writes manifest.json; or run `logitcache finalize`)")
