"""On-policy distillation in rounds, with caches as the transport: the recipe of ``student-onpolicy run``.

    for round r = 0 .. R-1:
        samples   the current student answers this round's prompts; each sampled token's log-probability
                  under it is kept (``rollout``)                             -> round-r/rollouts.jsonl
        score     the teacher scores exactly those tokens (``logitcache capture --mode score``, any
                  encoding): its distribution and the exact target_logprob of every student token; the
                  round's provenance goes into the manifest's ``rollout``    -> round-r/cache/
        train     the student trains on that cache (``student-train``: --loss policy_gradient, a
                  divergence such as reverse_kl, or a GKD mix with --offpolicy-cache)  -> round-r/train/
        evaluate  (with --eval-prompts) the trained student answers held-out prompts greedily; the teacher
                  scores them with --encoding full; exact KL(q || p) and KL(p || q) on the student's own
                  text and the teacher's log-likelihood per token of it     -> round-r/eval/metrics.json

The teacher and the student never share a process: scoring and training run as their own commands
(written to commands.sh as they run, so any step can be repeated by hand). Every step's output marks
it done (a renamed file, a finalized cache, a report.json), and scoring and training resume themselves,
so running the same command again after a crash at any point continues where it stopped and ends
with the same student. Round r's student is round r-1's trained one (round 0: --student, or the
teacher with --keep-layers, cut once into initial-student/).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from logitcache.format.encodings import DEFAULT_ENCODING
from logitcache.format.encodings.full import Full
from logitcache.format.errors import LogitcacheError
from logitcache.teacher.embedded import DEFAULT_TEACHER

from .rollout import SamplingSettings, choose_generator, read_prompts, rollout, write_json

SETTINGS = "settings.json"


@dataclass
class RoundsConfig:
    """Everything a run of rounds needs (``student-onpolicy run``'s flags, by field name)."""

    out: str
    teacher: str = DEFAULT_TEACHER              # what scores (logitcache capture --teacher)
    student: str | None = None                  # the starting student (a Hugging Face directory) ...
    keep_layers: str | None = None              # ... or the teacher keeping these layers
    prompts: str = "builtin"                    # prompt rows (as logitcache capture --input reads them)
    prompts_per_round: int = 64                 # round r samples rows [r * n, (r + 1) * n) (wrapping around)
    rounds: int = 2
    steps_per_round: int = 20
    encoding: str = DEFAULT_ENCODING            # how the teacher's scores are stored
    backend: str = "auto"                       # the teacher's engine for scoring
    loss: str = "policy_gradient"
    loss_args: dict = field(default_factory=dict)
    offpolicy_cache: str | None = None          # GKD mix: the rest of each batch from this cache (forward KL)
    onpolicy_frac: float = 1.0
    eval_prompts: str | None = None             # held-out prompts for the on-policy measures
    eval_limit: int = 32
    eval_offset: int = 0                        # the first row of --eval-prompts
    eval_cache: str | None = None               # teacher text captured with --encoding full: exact KL per round
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    generate_batch_size: int = 16
    generator: str = "auto"                     # the student's sampler: auto (vLLM on a GPU), transformers, vllm
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 2
    seed: int = 0
    train_config: str | None = None             # more student-train settings (a JSON TrainConfig)
    device: str = "cpu"

    def __post_init__(self):
        if (self.student is None) == (self.keep_layers is None):
            raise LogitcacheError("give exactly one of --student (a Hugging Face directory) and --keep-layers "
                                  "(cut from the teacher)")
        for name in ("prompts_per_round", "rounds", "steps_per_round", "eval_limit", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise LogitcacheError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        choose_generator(self.generator, "cpu")
        if self.eval_offset < 0:
            raise LogitcacheError(f"--eval-offset must be >= 0, got {self.eval_offset}")
        if "://" in self.out:
            raise LogitcacheError(f"--out {self.out!r}: a run of rounds is written to a local directory")
        self.sampling()

    def sampling(self, round_index: int = 0) -> SamplingSettings:
        return SamplingSettings(self.max_new_tokens, self.temperature, self.top_p, self.seed * 1000 + round_index,
                                self.generate_batch_size)


def _python(module_cli: str) -> list[str]:
    return [sys.executable, "-c", f"from {module_cli} import cli; cli()"]


COMMANDS = {"logitcache": _python("logitcache.cli.main"), "student-train": _python("student_train.cli")}


class Rounds:
    """One run directory; ``run()`` does whatever is not done yet."""

    def __init__(self, cfg: RoundsConfig, progress: bool = True, log=print):
        self.cfg, self.progress, self.log = cfg, progress, log
        self.out = cfg.out

    # ---- paths ---------------------------------------------------------------------------------
    def round_dir(self, r: int) -> str:
        return os.path.join(self.out, f"round-{r:03d}")

    def student_after(self, r: int) -> str:
        """The student that round r + 1 samples with (r = -1: the starting student)."""
        if r < 0:
            return self.cfg.student or os.path.join(self.out, "initial-student")
        return os.path.join(self.round_dir(r), "train", "student")

    # ---- the recipe ----------------------------------------------------------------------------
    def run(self) -> dict:
        self.check_settings()
        if self.cfg.keep_layers is not None:
            self.cut_initial_student()
        rounds = []
        initial = self.evaluate_step(self.student_after(-1), os.path.join(self.out, "eval-initial"))
        for r in range(self.cfg.rounds):
            d = self.round_dir(r)
            os.makedirs(d, exist_ok=True)
            info = self.sample_step(r)
            capture = self.score_step(r)
            train = self.train_step(r)
            metrics = self.evaluate_step(self.student_after(r), os.path.join(d, "eval"))
            rounds.append({"round": r, "rollout": info, "capture": capture, "train": train, "onpolicy_eval": metrics})
            self.log(f"round {r}: {info['samples']} samples, {info['response_tokens']} tokens; "
                     f"train loss {train['final_loss']:.4f}" + (f"; on-policy KL(q||p) {metrics['kl_reverse_exact']:.3f}, "
                     f"teacher log-lik {metrics['teacher_logprob_per_token']:.3f}" if metrics else ""))
        report = {"settings": asdict(self.cfg), "initial_eval": initial, "rounds": rounds,
                  "student_dir": self.student_after(self.cfg.rounds - 1)}
        write_json(report, os.path.join(self.out, "report.json"))
        plot_rounds(report, os.path.join(self.out, "rounds.png"))
        return report

    def check_settings(self) -> None:
        """A run continues only with the settings it started with."""
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, SETTINGS)
        mine = asdict(self.cfg)
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            changed = [k for k in mine if k not in ("out", "device") and saved.get(k) != mine[k]]   # a moved run continues
            if changed:
                k = changed[0]
                raise LogitcacheError(f"{self.out} was started with {k} = {saved.get(k)!r}, this run has {mine[k]!r}: "
                                      "use the same settings to continue it, or another --out")
        else:
            write_json(mine, path)

    def cut_initial_student(self) -> None:
        path = self.student_after(-1)
        if os.path.exists(os.path.join(path, "config.json")):
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from logitcache.teacher.identity import resolve_teacher

        from .model import drop_layers, parse_keep_layers

        import torch

        source = str(resolve_teacher(self.cfg.teacher).path)
        teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        keep = parse_keep_layers(self.cfg.keep_layers, teacher.config.num_hidden_layers)
        tmp = path + ".tmp"
        drop_layers(teacher, keep).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        os.replace(tmp, path)

    def round_prompts(self, r: int) -> list[dict]:
        n = self.cfg.prompts_per_round
        every = read_prompts(self.cfg.prompts, None)
        if not every:
            raise LogitcacheError(f"--prompts {self.cfg.prompts}: no prompt rows")
        start = (r * n) % len(every)
        return [every[(start + i) % len(every)] for i in range(min(n, len(every)))]

    def sample_step(self, r: int) -> dict:
        path = os.path.join(self.round_dir(r), "rollouts.jsonl")
        if not os.path.exists(path):
            rollout(self.student_after(r - 1), self.round_prompts(r), self.cfg.sampling(r), path, round_index=r,
                    source=self.cfg.prompts, device=self.cfg.device, progress=self.progress,
                    generator=self.cfg.generator)
        with open(path + ".info.json") as f:
            return json.load(f)

    def score_step(self, r: int) -> dict:
        d = self.round_dir(r)
        rollouts = os.path.join(d, "rollouts.jsonl")
        return self.command("logitcache", ["capture", os.path.join(d, "cache"), "--mode", "score", "--input", rollouts,
                                           "--source-name", f"round-{r:03d}", "--teacher", self.cfg.teacher,
                                           "--backend", self.cfg.backend, "--encoding", self.cfg.encoding,
                                           "--rollout-info", rollouts + ".info.json"])

    def train_step(self, r: int) -> dict:
        d = self.round_dir(r)
        out = os.path.join(d, "train")
        report_path = os.path.join(out, "report.json")
        if not os.path.exists(report_path):
            c = self.cfg
            args = [os.path.join(d, "cache"), "--out", out, "--student", self.student_after(r - 1),
                    "--max-steps", str(c.steps_per_round), "--loss", c.loss, "--seq-len", str(c.seq_len),
                    "--batch-size", str(c.batch_size), "--lr", str(c.lr), "--warmup-steps", str(c.warmup_steps),
                    "--seed", str(c.seed * 1000 + r), "--eval-frac", "0", "--save-every", str(max(1, c.steps_per_round // 4))]
            for k, v in c.loss_args.items():
                args += ["--loss-arg", f"{k}={v}"]
            if c.offpolicy_cache:
                args += ["--offpolicy-cache", c.offpolicy_cache, "--onpolicy-frac", str(c.onpolicy_frac)]
            if c.eval_cache:
                args += ["--eval-cache", c.eval_cache]
            if c.train_config:
                args += ["--config", c.train_config]
            self.command("student-train", args)
        with open(report_path) as f:
            report = json.load(f)
        return {"steps": report["steps"], "final_loss": report["final_train"]["loss"],
                "final_train": report["final_train"], "eval_start": report.get("eval_start"),
                "eval_end": report.get("eval_end"),
                "student_dir": report["student_dir"], "tokens_per_second": report["tokens_per_second"]}

    def evaluate_step(self, student: str, out: str) -> dict | None:
        if not self.cfg.eval_prompts:
            return None
        return evaluate_onpolicy(student, self.cfg.teacher, self.cfg.eval_prompts, self.cfg.eval_limit, out,
                                 offset=self.cfg.eval_offset, generator=self.cfg.generator, max_new_tokens=self.cfg.max_new_tokens, seq_len=self.cfg.seq_len,
                                 command=self.command, device=self.cfg.device, progress=self.progress,
                                 backend=self.cfg.backend)

    def command(self, name: str, args: list[str]) -> dict:
        return run_command(name, args, self.out)


def run_command(name: str, args: list[str], log_dir: str) -> dict:
    """Run ``name args --json --no-progress`` in its own process (appended to log_dir/commands.sh first);
    its JSON result, or an error naming the step, its exit status and how to continue."""
    args = [*args, "--json", "--no-progress"]
    with open(os.path.join(log_dir, "commands.sh"), "a") as f:
        f.write(shlex.join([name, *args]) + "\n")
    done = subprocess.run([*COMMANDS[name], *args], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise LogitcacheError(f"{name} {args[0]} failed (exit status {done.returncode}); fix the cause and run the "
                              "same command again: it continues from there")
    return json.loads(done.stdout)


def evaluate_onpolicy(student: str, teacher: str, prompts: str, limit: int, out: str, *, offset: int = 0,
                      generator: str = "auto", max_new_tokens: int = 128, seq_len: int = 512, command=None,
                      device: str = "cpu", progress: bool = False, backend: str = "auto") -> dict:
    """What on-policy training is for, measured on the student's own text: it answers ``limit`` prompts of
    ``prompts`` (from row ``offset``) greedily, the teacher scores the answers with ``--encoding full`` (out/cache), and

    - ``kl_reverse_exact``: exact KL(q_student || p_teacher) over the whole vocabulary, mean per response token;
    - ``kl_forward_exact``: exact KL(p || q) on the same tokens;
    - ``teacher_logprob_per_token``: the teacher's mean log-likelihood of the student's response tokens;
    - ``response_tokens``: how many tokens that is (the mean response length in ``mean_response_tokens``).

    Written to out/metrics.json (its presence marks the step done)."""
    path = os.path.join(out, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    os.makedirs(out, exist_ok=True)
    rollouts = os.path.join(out, "rollouts.jsonl")
    if not os.path.exists(rollouts):
        rollout(student, read_prompts(prompts, limit, offset), SamplingSettings(max_new_tokens, 0.0, 1.0, 0, 16), rollouts,
                source=prompts, device=device, progress=progress, generator=generator)
    args = ["capture", os.path.join(out, "cache"), "--mode", "score", "--input", rollouts, "--source-name", "eval",
            "--teacher", teacher, "--backend", backend, "--encoding", Full.name, "--rollout-info", rollouts + ".info.json"]
    if command is None:
        run_command("logitcache", args, out)
    else:
        command("logitcache", args)
    metrics = measure_onpolicy(student, os.path.join(out, "cache"), seq_len, device)
    write_json(metrics, path)
    return metrics


def measure_onpolicy(student: str, cache_url: str, seq_len: int = 512, device: str = "cpu") -> dict:
    """The measures of ``evaluate_onpolicy`` from a full-encoding cache of the student's own responses."""
    from logitcache.store.reader import open_cache

    from .fidelity import fidelity

    samples = open_cache(cache_url).samples.to_pylist()
    scored = sum(s["scored_end"] - s["scored_start"] for s in samples)
    loglik = sum(s["teacher_logprob_sum"] for s in samples)
    metrics = fidelity(student, cache_url, device=device, seq_len=seq_len)
    return {"kl_reverse_exact": metrics["kl_reverse_exact"], "kl_forward_exact": metrics["kl_forward_exact"],
            "top1_agreement": metrics["top1_agreement"], "teacher_logprob_per_token": loglik / scored,
            "response_tokens": scored, "mean_response_tokens": scored / len(samples), "samples": len(samples)}


def plot_rounds(report: dict, path: str) -> None:
    """The on-policy measures after each round (round 0 = the starting student)."""
    evals = [report["initial_eval"]] + [r["onpolicy_eval"] for r in report["rounds"]]
    if any(e is None for e in evals):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(evals)))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(x, [e["kl_reverse_exact"] for e in evals], "o-", label="KL(student || teacher)")
    ax[0].plot(x, [e["kl_forward_exact"] for e in evals], "s--", label="KL(teacher || student)")
    ax[0].set_ylabel("nats per token")
    ax[0].legend()
    ax[1].plot(x, [e["teacher_logprob_per_token"] for e in evals], "o-", color="tab:green")
    ax[1].set_ylabel("teacher log-likelihood, nats per token")
    for a, title in zip(ax, ("exact KL on the student's own greedy responses", "teacher's view of those responses")):
        a.set_xlabel("rounds trained")
        a.set_xticks(x)
        a.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rounds_config(**values) -> RoundsConfig:
    names = {f.name for f in dataclasses.fields(RoundsConfig)}
    return RoundsConfig(**{k: v for k, v in values.items() if k in names and v is not None})

