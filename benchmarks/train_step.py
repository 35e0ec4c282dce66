"""One training step of distillation against one of plain next-token training, on the same student and
the same packed batch: time and peak memory, with each way of keeping documents apart (a dense
(B, 1, T, T) mask against the packed kernels) and with the LM head + loss fused or not.

Configurations (each run in a fresh process, so its peak memory is its own):

- ``ce``: the plain step a user compares against: ``model(...).logits`` and cross-entropy on them
  (what transformers' own loss does: the logits cast to float32), backward;
- ``kd``: our objective (``objective.compute_loss``): forward KL over a compact-like sparse teacher
  row (64 ids, log-probs, exact tail) per token, on the full logits, backward;
- ``kd-fused``: the same objective with the LM head and loss fused (``objective.LossHead``), never the
  (B, T, V) logits;

each with ``--attention dense`` and with the packed attention ``auto`` picks on the device (sdpa on
the CPU; flex, or flash when flash-attn is installed, on CUDA). The student is a Llama of the preset's
shape with random weights (no download); the batch packs documents of random lengths into rows.
Timed: ``--steps`` steps after 2 warm-up steps, the median reported. Peak memory: CUDA's
``max_memory_allocated`` during the steps; on the CPU the process's peak resident size (ru_maxrss),
which includes the Python runtime and the model.

    python benchmarks/train_step.py                       # CPU preset (a few minutes on 2 cores)
    python benchmarks/train_step.py --preset gpu          # a ~1B student, T = 4096, bf16, on CUDA

Writes OUT/train_step_<device>.json and .md, and the table into docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    # a SmolLM2-135M-shaped student cut to 8 layers: the embedded teacher's vocabulary
    "cpu": dict(vocab=49152, hidden=576, layers=8, heads=9, kv_heads=3, ffn=1536, batch=2, seq_len=1024,
                dtype="float32", device="cpu", k=64),
    # smoke run
    "tiny": dict(vocab=4096, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, batch=2, seq_len=256,
                 dtype="float32", device="cpu", k=16),
    # a Llama-3.2-1B-shaped student (vocabulary 128k), bf16 autocast
    "gpu": dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, batch=4, seq_len=4096,
                dtype="bfloat16", device="cuda", k=64),
}
CONFIGS = [("ce", "dense"), ("ce", "auto"), ("kd", "dense"), ("kd", "auto"), ("kd-fused", "dense"),
           ("kd-fused", "auto")]


def make_batch(p: dict, seed: int = 0) -> dict:
    """A packed batch: documents of 64..1024 tokens end to end, positions restarting per document, and a
    sparse teacher row (k ids by descending log-prob, their log-probs and the exact tail) per token."""
    import torch

    from student_train.targets import SparseTargets

    g = torch.Generator().manual_seed(seed)
    B, T, V, k = p["batch"], p["seq_len"], p["vocab"], p["k"]
    ids = torch.randint(0, V, (B, T), generator=g)
    pos, docs = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for r in range(B):
        s, d = 0, 1
        while s < T:
            n = min(int(torch.randint(64, 1025, (1,), generator=g)), T - s)
            pos[r, s:s + n], docs[r, s:s + n] = torch.arange(n), d
            s, d = s + n, d + 1
    start = torch.randint(0, V, (B, T, 1), generator=g)                 # k distinct ids per row
    t_ids = (start + torch.arange(k) * (V // k)) % V
    lp = torch.log_softmax(torch.randn(B, T, k + 1, generator=g) * 2, -1)[..., :k].sort(-1, descending=True).values
    tail = (1 - lp.exp().sum(-1)).clamp_min(0)
    labels = torch.roll(ids, -1, 1)
    return {"input_ids": ids, "position_ids": pos, "document_ids": docs, "loss_mask": torch.ones(B, T, dtype=torch.bool),
            "labels": labels, "teacher": SparseTargets(t_ids, lp, tail)}


def run_one(p: dict, kind: str, attention: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, LlamaConfig

    from student_train.attention import choose_attention
    from student_train.config import TrainConfig
    from student_train.losses import device_chunk_rows
    from student_train.objective import compute_loss, forward, install_loss_head

    device = torch.device(p["device"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["ffn"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                      tie_word_embeddings=True, max_position_embeddings=max(4096, p["seq_len"]))
    with device:                                   # initialised where it runs (a 1B model in seconds)
        model = AutoModelForCausalLM.from_config(cfg).train()
    amp = torch.bfloat16 if p["dtype"] == "bfloat16" else None
    att = choose_attention(model, attention, device, amp)
    head = None
    if kind == "kd-fused":
        head, why = install_loss_head(model)
        assert head is not None, why
    tc = TrainConfig(cache="unused", out="/tmp/unused-run")
    kd = dataclasses.replace(tc.objective(), chunk_rows=device_chunk_rows(p["vocab"], device))   # as training does
    batch = {k: v.to(device) for k, v in make_batch(p).items()}

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if kind == "ce":
                logits = forward(model, batch, False, att).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
            else:
                loss, _ = compute_loss(tc, kd, model, batch, None, [], att, head if kind == "kd-fused" else None)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ms = statistics.median(times) * 1e3
    tokens = p["batch"] * p["seq_len"]
    return {"kind": kind, "attention_asked": attention, "attention": att.to_dict(), "step_ms": ms,
            "step_ms_all": [t * 1e3 for t in times], "tokens_per_second": tokens / (ms / 1e3), "peak_memory_mb": peak}


def table(res: dict) -> str:
    rows = res["runs"]
    base = {r["attention_asked"]: r for r in rows if r["kind"] == "ce"}
    lines = ["| step | attention | ms/step | tokens/s | peak memory (MiB) | time vs CE (same attention) | "
             "memory vs CE |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["attention_asked"])
        att = r["attention"]["mode"] + (f" ({r['attention']['implementation']})" if r["attention"]["mode"] != "dense"
                                        else "")
        lines.append(f"| {r['kind']} | {att} | {r['step_ms']:.0f} | {r['tokens_per_second']:.0f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['step_ms'] / b['step_ms']:.2f}x | "
                     f"{r['peak_memory_mb'] / b['peak_memory_mb']:.2f}x |")
    p = res["preset"]
    head = (f"{res['device_name']}; student Llama {p['layers']} layers, hidden {p['hidden']}, vocabulary {p['vocab']}; "
            f"batch {p['batch']} x {p['seq_len']} tokens; {p['dtype']}; median of {res['steps']} steps "
            f"(benchmarks/train_step.py, {res['date']}).")
    skipped = sorted({r["attention"]["reason"] for r in rows if r["attention_asked"] == "auto" and r["attention"]["reason"]})
    notes = "".join(f"\n\n`--attention auto` skipped {x}." for x in skipped)
    return head + "\n\n" + "\n".join(lines) + notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--only", help=argparse.SUPPRESS)          # KIND:ATTENTION, run in a child process
    ap.add_argument("--no-docs", action="store_true", help="Do not rewrite docs/training.md.")
    ap.add_argument("--docs-from", metavar="JSON", help="Only rewrite docs/training.md's table from a results file "
                                                        "(e.g. one written on a GPU machine).")
    args = ap.parse_args()
    if args.docs_from:
        res = json.loads(Path(args.docs_from).read_text())
        write_docs(res)
        return
    p = PRESETS[args.preset]
    if args.only:
        kind, attention = args.only.split(":")
        print(json.dumps(run_one(p, kind, attention, args.steps)))
        return
    runs = []
    for kind, attention in CONFIGS:
        r = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
                            "--only", f"{kind}:{attention}"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{kind} / {attention} failed:\n{r.stderr[-3000:]}")
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{kind:9s} {attention:6s} {runs[-1]['step_ms']:8.0f} ms  {runs[-1]['peak_memory_mb']:8.0f} MiB  "
              f"({runs[-1]['attention']['mode']})", flush=True)
    import torch

    name = torch.cuda.get_device_name() if p["device"] == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    res = {"preset": p, "steps": args.steps, "device_name": name, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_step_{p['device']}.json").write_text(json.dumps(res, indent=1))
    (out / f"train_step_{p['device']}.md").write_text(table(res) + "\n")
    print(table(res))
    if not args.no_docs:
        write_docs(res)


def write_docs(res: dict) -> None:
    from generated import write_block

    write_block(ROOT / "docs" / "training.md", f"train-step-{res['preset']['device']}", table(res),
                heading="## Step time and memory: distillation against plain training")


if __name__ == "__main__":
    main()
