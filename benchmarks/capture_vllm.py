"""Benchmark of the vLLM capture backend: what top-k + exact entropy (+ hidden states) cost over plain
vLLM generation of the same responses.

Each configuration runs in its own process (one vLLM engine per process), over the same token ids,
greedy, so every configuration generates the very same tokens (checked). Configurations are
interleaved round by round (`--rounds`) and the best time of each is kept: other load on the
machine can only add time. Engine load is timed apart and left out of tokens/s.

  plain        vLLM generate, no logprobs (the baseline)
  logprobs     vLLM generate with logprobs=65 in flat form, no entropy hook (vLLM's own cost)
  capture      VLLMBackend.run: top-64 + exact entropy + target log-prob, converted to arrays
  capture+hid  the same with hidden layer -1 (extract_hidden_states)

Results: `<out>/capture_vllm.json` and `.md` (printed at the end).

    python benchmarks/capture_vllm.py            # 32 prompts, 64 new tokens
    python benchmarks/capture_vllm.py --quick    # 4 prompts, 8 new tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

TOP_K = 64
CONFIGS = ("plain", "logprobs", "capture", "capture+hid")


def prompt_ids(teacher_path: str, limit: int) -> list[list[int]]:
    """The builtin prompts tokenised exactly as a generate-mode capture tokenises them."""
    from transformers import AutoTokenizer

    from logitcache.teacher.inputs import load_input
    from logitcache.teacher.prepare import Tokenize

    roles = {"prompt": None, "messages": None, "text": None, "response": None}
    table = load_input("builtin", "train", roles, "generate", limit)
    tk = Tokenize(AutoTokenizer.from_pretrained(teacher_path), None)
    return [tk.chat_prompt([{"role": "user", "content": r["prompt"]}]) for r in table.rows(0, table.num_rows)]


def worker(config: str, teacher: str, limit: int, max_new_tokens: int, repeats: int) -> dict:
    """One configuration in this process: load, warm up, time `repeats` runs, report the best."""
    from logitcache.teacher.backend import GenerationSettings, SequenceRequest
    from logitcache.teacher.capture import _generation_eos
    from logitcache.teacher.identity import resolve_teacher
    from logitcache.teacher.vllm_backend import VLLMBackend, configure_environment

    resolved = resolve_teacher(teacher)
    ids = prompt_ids(str(resolved.path), limit)
    eos = _generation_eos(resolved.path)
    max_len = 2048
    t0 = time.perf_counter()
    if config.startswith("capture"):
        backend = VLLMBackend(resolved, "float32", max_len, TOP_K, hidden_layers=[30] if config == "capture+hid" else [])
        gen = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=0, eos_token_ids=eos)
        reqs = [SequenceRequest(prompt_ids=p, response_ids=None, score_from=len(p) - 1, max_new_tokens=max_new_tokens)
                for p in ids]

        def run(n=None):
            out = backend.run(reqs[:n], TOP_K, backend.hidden_layers, gen)
            return [c.tokens[c.prompt_len:].tolist() for c in out]
    else:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        on_cpu = configure_environment()
        llm = LLM(model=str(resolved.path), dtype="float32", max_model_len=max_len, seed=0, enforce_eager=on_cpu,
                  max_logprobs=TOP_K + 1)
        extra = dict(logprobs=TOP_K + 1, flat_logprobs=True) if config == "logprobs" else {}
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=eos, detokenize=False,
                                **extra)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]

        def run(n=None):
            return [list(o.outputs[0].token_ids) for o in llm.generate(prompts[:n], params, use_tqdm=False)]
    load_s = time.perf_counter() - t0
    run(2)                                                   # warm-up: first-call allocations
    times, responses = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        responses = run()
        times.append(time.perf_counter() - t)
    tokens = sum(len(r) for r in responses)
    return dict(config=config, load_s=load_s, times_s=times, best_s=min(times), tokens=tokens,
                tokens_per_s=tokens / min(times), responses=responses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine load")
    ap.add_argument("--rounds", type=int, default=2, help="engine loads per configuration, interleaved")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.limit, a.max_new_tokens, a.repeats, a.rounds = 4, 8, 1, 1
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.teacher, a.limit, a.max_new_tokens, a.repeats)))
        return

    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for rnd in range(a.rounds):
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--worker", config, "--limit", str(a.limit), "--max-new-tokens",
                   str(a.max_new_tokens), "--repeats", str(a.repeats), "--teacher", a.teacher]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                sys.exit(f"{config} failed:\n{p.stderr[-4000:]}")
            res = json.loads(line[-1][len("RESULT "):])
            print(f"round {rnd + 1} {config:12s} {res['tokens_per_s']:8.1f} tok/s (load {res['load_s']:.1f} s)",
                  flush=True)
            runs[config].append(res)

    best = {c: max(r, key=lambda x: x["tokens_per_s"]) for c, r in runs.items()}
    reference = best["plain"]["responses"]
    same = {c: b["responses"] == reference for c, b in best.items()}
    base = best["plain"]["tokens_per_s"]
    import torch
    import vllm

    result = dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__, vllm=vllm.__version__,
                     cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
        settings=dict(teacher=a.teacher, prompts=a.limit, max_new_tokens=a.max_new_tokens, top_k=TOP_K,
                      repeats=a.repeats, rounds=a.rounds, dtype="float32", decoding="greedy"),
        configs={c: dict(tokens=b["tokens"], best_tokens_per_s=b["tokens_per_s"],
                         overhead_vs_plain=base / b["tokens_per_s"] - 1, same_responses_as_plain=same[c],
                         load_s=[r["load_s"] for r in runs[c]],
                         all_tokens_per_s=[r["tokens"] / t for r in runs[c] for t in r["times_s"]])
                 for c, b in best.items()})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture_vllm.json").write_text(json.dumps(result, indent=1))
    lines = [f"# vLLM capture cost ({a.teacher}, {a.limit} prompts x {a.max_new_tokens} new tokens, greedy, "
             f"float32, top-{TOP_K})", "",
             f"Machine: {result['machine']['platform']}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"vLLM {vllm.__version__}" + (f", GPU {result['machine']['cuda']}" if result['machine']['cuda'] else ""),
             "", "| configuration | generated tokens | tokens/s (best) | overhead vs plain | same responses |",
             "|---|---|---|---|---|"]
    names = {"plain": "plain vLLM generate (no logprobs)", "logprobs": "vLLM logprobs=65 (flat), no entropy",
             "capture": "capture: top-64 + exact entropy", "capture+hid": "capture + hidden layer -1"}
    for c in CONFIGS:
        r = result["configs"][c]
        lines.append(f"| {names[c]} | {r['tokens']} | {r['best_tokens_per_s']:.1f} | "
                     f"{100 * r['overhead_vs_plain']:+.1f}% | {'yes' if r['same_responses_as_plain'] else 'NO'} |")
    lines += ["", "Overhead = plain tokens/s / configuration tokens/s - 1 (time per token); best of "
              f"{a.rounds} engine loads x {a.repeats} timed runs each, after a warm-up run."]
    (out / "capture_vllm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
