"""The teacher losses on the accelerator: ULD (``losses.uld_loss``), the cross-tokenizer loss
(``objective.cross_tokenizer_loss``: the divergence over the mapped entries + ULD where marked) and
forward KL on a fifth of the positions (``--token-select student-entropy`` / ``random --top-frac 0.2``)
against the forward-KL sparse loss on every position (``losses.distillation_loss``, top-k + tail
bucket), side by side in one run.

For every logits dtype (float32, bfloat16) and every ``chunk_rows`` (the trainer's
``losses.device_chunk_rows(V, device)`` and ``losses.DEFAULT_CHUNK_ROWS``), each loss runs forward +
backward w.r.t. the (B, T, V) student logits: median time of ``--repeats`` runs after ``--warmup``
ones (``torch.cuda.synchronize`` around each), the peak device memory above the inputs
(``torch.cuda.max_memory_allocated``; the logits' gradient included), and the value, checked finite
(the gradient too).

Inputs (seeded): student logits ``3 * randn``; the teacher a correlated distribution (student logits +
``2 * randn``) stored as its top-k log-probs in rank order (topk encoding: no stored tail). Cross-
tokenizer targets: each teacher entry has a student token with probability 0.8 (a random permutation of
the vocabulary; unmapped entries give their mass to the tail), and a quarter of the positions, drawn at
random, are marked for ULD (``map+uld`` with many positions where nothing maps: both paths run).

Before timing, on the first rows, the losses on the device are checked against the same call on the
CPU in float64 and ULD against a direct computation (sort the student's softmax, compare ranks then tails).

    python benchmarks/gpu_losses.py                 # CUDA: B*T = 8*1024, V = 49152, k = 64
    python benchmarks/gpu_losses.py --small         # smoke run (the CPU without a GPU): 2*64, V = 2048, k = 16

Writes OUT (default benchmarks/results/gpu_losses.json): every number, the device and the settings.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository root, for a plain checkout

from student_train import losses  # noqa: E402
from student_train.objective import cross_tokenizer_loss  # noqa: E402
from student_train.targets import CrossTokenizerTargets  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(B: int, T: int, V: int, k: int, device: torch.device, seed: int = 0) -> dict:
    """float32 student logits and the teacher's top-k / cross-tokenizer targets, on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = 3 * torch.randn(B, T, V, generator=g, device=device)
    n = B * T
    ids = torch.empty(n, k, dtype=torch.int64, device=device)
    lp = torch.empty(n, k, dtype=torch.float32, device=device)
    zz = z.view(n, V)
    for s in range(0, n, 1024):                       # the teacher, chunked: no second (N, V) tensor
        t = torch.log_softmax(zz[s:s + 1024] + 2 * torch.randn(zz[s:s + 1024].shape, generator=g, device=device), -1)
        lp[s:s + 1024], ids[s:s + 1024] = t.topk(k, -1)
    mask = torch.rand(B, T, generator=g, device=device) < 0.95
    # cross-tokenizer: a random permutation as the vocabulary map, 80% of the entries map
    perm = torch.randperm(V, generator=g, device=device)
    ok = torch.rand(n, k, generator=g, device=device) < 0.8
    order = torch.argsort((~ok).to(torch.int8), dim=-1, stable=True)      # mapped entries first, in rank order
    ok_s = ok.gather(1, order)
    m_ids = torch.where(ok_s, perm[ids].gather(1, order), torch.full_like(ids, -1))
    m_lp = torch.where(ok_s, lp.gather(1, order), torch.full_like(lp, -math.inf))
    p = lp.double().exp()
    tail = ((1 - p.sum(-1)).clamp_min(0) + torch.where(ok, 0.0, p).sum(-1)).float()
    uld = torch.rand(B, T, generator=g, device=device) < 0.25
    ct = CrossTokenizerTargets(m_ids.view(B, T, k), m_lp.view(B, T, k), tail.view(B, T), lp.view(B, T, k), None, uld)
    return {"z": z, "ids": ids.view(B, T, k), "lp": lp.view(B, T, k), "mask": mask, "ct": ct}


def losses_of(inp: dict, chunk_rows: int | None) -> dict:
    kd = losses.DistillationConfig(kind="forward_kl", chunk_rows=chunk_rows)
    return {
        "forward_kl_sparse": lambda z: losses.distillation_loss(z, inp["ids"], inp["lp"], inp["mask"], **kd.kd_kwargs()),
        "uld": lambda z: losses.uld_loss(z, inp["lp"], inp["mask"], chunk_rows=chunk_rows),
        "cross_tokenizer_map_uld": lambda z: cross_tokenizer_loss(z, inp["ct"], inp["mask"].float(), kd),
    }


def selection_losses_of(inp: dict, chunk_rows: int | None, frac: float = 0.2) -> dict:
    """Forward KL on a fifth of the positions (``--token-select``): chosen by the student's entropy from the
    same logits (``losses.student_entropy`` + ``losses.top_fraction``: what the trainer adds to a step),
    and a fixed random fifth (the loss on fewer rows alone, without choosing them)."""
    kd = losses.DistillationConfig(kind="forward_kl", chunk_rows=chunk_rows)
    g = torch.Generator(device=inp["mask"].device).manual_seed(1)
    rand = losses.top_fraction(torch.rand(inp["mask"].shape, generator=g, device=inp["mask"].device), inp["mask"], frac)

    def student_entropy_top(z):
        w = losses.top_fraction(losses.student_entropy(z, inp["mask"], chunk_rows), inp["mask"], frac)
        return losses.distillation_loss(z, inp["ids"], inp["lp"], w, **kd.kd_kwargs())

    return {"forward_kl_student_entropy_top20": student_entropy_top,
            "forward_kl_random20": lambda z: losses.distillation_loss(z, inp["ids"], inp["lp"], rand, **kd.kd_kwargs())}


def uld_direct(z: torch.Tensor, lp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ULD the obvious way, in float64 on whole rows (top-k: ranks 1..k, then the two tails)."""
    z, lp, w = z.reshape(-1, z.shape[-1]).double(), lp.reshape(-1, lp.shape[-1]).double(), w.reshape(-1).double()
    p = lp.exp().sort(-1, descending=True).values
    q = torch.softmax(z, -1).sort(-1, descending=True).values[:, :p.shape[-1]]
    per = (p - q).abs().sum(-1) + ((1 - p.sum(-1)).clamp_min(0) - (1 - q.sum(-1))).abs()
    return (per * w).sum() / w.sum()


def check_against_cpu(inp: dict, b: int, t: int) -> dict:
    """The first ``b`` x ``t`` positions: each loss and its gradient on the device (float32) against
    the same call on the CPU in float64; ULD against ``uld_direct``."""
    sub = {"z": inp["z"][:b, :t], "ids": inp["ids"][:b, :t], "lp": inp["lp"][:b, :t], "mask": inp["mask"][:b, :t],
           "ct": CrossTokenizerTargets(*(None if getattr(inp["ct"], f) is None else getattr(inp["ct"], f)[:b, :t]
                                         for f in ("ids", "logprobs", "tail", "ranked_logprobs", "ranked_tail", "uld")))}
    cpu = {"z": sub["z"].double().cpu(), "ids": sub["ids"].cpu(), "lp": sub["lp"].cpu(), "mask": sub["mask"].cpu(),
           "ct": sub["ct"].to("cpu")}
    out = {}
    dev_fns, cpu_fns = losses_of(sub, None), losses_of(cpu, None)
    for name in dev_fns:
        zd = sub["z"].detach().clone().requires_grad_(True)
        zc = cpu["z"].detach().clone().requires_grad_(True)
        ld, lc = dev_fns[name](zd), cpu_fns[name](zc)
        ld.backward()
        lc.backward()
        gd, gc = zd.grad.double().cpu(), zc.grad
        out[name] = {"device": ld.item(), "cpu_float64": lc.item(), "abs_diff": abs(ld.item() - lc.item()),
                     "grad_max_abs_diff": (gd - gc).abs().max().item(), "grad_max_abs": gc.abs().max().item(),
                     "ok": bool(abs(ld.item() - lc.item()) <= 1e-4 * max(1.0, abs(lc.item()))
                                and (gd - gc).abs().max().item() <= 1e-4 * max(gc.abs().max().item(), 1e-8) + 1e-7)}
    direct = uld_direct(cpu["z"], cpu["lp"], cpu["mask"].double()).item()
    out["uld"]["direct_float64"] = direct
    out["uld"]["ok"] = out["uld"]["ok"] and abs(out["uld"]["cpu_float64"] - direct) <= 1e-9
    return out


def measure(fn, z0: torch.Tensor, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int) -> dict:
    z = z0.to(dtype).detach().requires_grad_(True)
    times, value, grad_ok = [], None, True
    if device.type == "cuda":
        torch.cuda.empty_cache()
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + repeats):
        z.grad = None
        sync(device)
        t0 = time.perf_counter()
        loss = fn(z)
        loss.backward()
        sync(device)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        value = loss.item()
        grad_ok = grad_ok and bool(torch.isfinite(z.grad).all())
    row = {"value": value, "finite": math.isfinite(value) and grad_ok, "median_ms": 1e3 * statistics.median(times),
           "times_ms": [round(1e3 * t, 3) for t in times]}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_mb"] = peak / 2**20                           # the inputs included
        row["peak_above_inputs_mb"] = (peak - base) / 2**20     # the loss's own: grad, chunks, saved tensors
    del z
    return row


def table(report: dict) -> str:
    """The results as a markdown table, each loss's time and memory also as a ratio to forward KL's."""
    base = {(r["dtype"], r["chunk_rows"]): r for r in report["results"] if r["loss"] == "forward_kl_sparse"}
    mem = report["device_type"] == "cuda"
    lines = [f"{report['device']}, N = {report['shape']['N']}, V = {report['shape']['V']}, k = {report['shape']['k']}",
             "", "| loss | logits | chunk_rows | fwd+bwd ms (median) | x forward KL |"
             + (" peak above inputs MiB | x forward KL |" if mem else "") + " value | finite |",
             "|---|---|---|---|---|" + ("---|---|" if mem else "") + "---|---|"]
    for r in report["results"]:
        b = base[(r["dtype"], r["chunk_rows"])]
        cells = [r["loss"], r["dtype"], str(r["chunk_rows"]), f"{r['median_ms']:.2f}", f"{r['median_ms'] / b['median_ms']:.2f}"]
        if mem:
            cells += [f"{r['peak_above_inputs_mb']:.0f}", f"{r['peak_above_inputs_mb'] / b['peak_above_inputs_mb']:.2f}"]
        cells += [f"{r['value']:.5f}", str(r["finite"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="smoke sizes: B*T = 2*64, V = 2048, k = 16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_losses.json"))
    a = ap.parse_args()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.small:
        a.batch, a.seq_len, a.vocab, a.top_k = 2, 64, 2048, 16
    B, T, V, k = a.batch, a.seq_len, a.vocab, a.top_k
    torch.manual_seed(0)
    inp = make_inputs(B, T, V, k, device)
    checks = check_against_cpu(inp, min(B, 2), min(T, 128))     # float64 on the CPU: a few rows only
    chunks = {"device_chunk_rows": losses.device_chunk_rows(V, device)}    # what student-train passes
    if chunks["device_chunk_rows"] != losses.DEFAULT_CHUNK_ROWS:
        chunks["default_chunk_rows"] = losses.DEFAULT_CHUNK_ROWS
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for chunk_name, chunk_rows in chunks.items():
            for loss_name, fn in {**losses_of(inp, chunk_rows), **selection_losses_of(inp, chunk_rows)}.items():
                row = measure(fn, inp["z"], dtype, device, a.warmup, a.repeats)
                row.update({"loss": loss_name, "dtype": str(dtype).removeprefix("torch."), "chunk_rows": chunk_rows,
                            "chunk_setting": chunk_name})
                results.append(row)
                print(f"{loss_name:24s} {row['dtype']:9s} chunk {chunk_rows:5d}: {row['median_ms']:9.2f} ms"
                      + (f"  peak +{row['peak_above_inputs_mb']:8.1f} MiB" if "peak_mb" in row else "")
                      + f"  value {row['value']:.6f}  finite {row['finite']}", flush=True)
    report = {
        "benchmark": "gpu_losses",
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "shape": {"B": B, "T": T, "N": B * T, "V": V, "k": k},
        "warmup": a.warmup, "repeats": a.repeats,
        "checks_against_cpu_float64": checks,
        "results": results,
    }
    print(json.dumps(checks, indent=1))
    print(table(report))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    bad = [r for r in results if not r["finite"]] + [n for n, c in checks.items() if not c["ok"]]
    if bad:
        print(f"FAILED: {bad}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
