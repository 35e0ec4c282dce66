"""Benchmark of the vLLM capture backend: what each encoding (top-k + exact entropy, compact's exact
tail, hybrid's and sampled's draws, all computed in vLLM's worker) and one hidden layer cost over plain
vLLM generation of the same responses.

Each configuration runs in its own process (one vLLM engine per process), over the same token ids,
greedy, so every configuration generates the very same tokens (checked). Configurations are
interleaved round by round (`--rounds`) and the best time of each is kept: other load on the
machine can only add time. Engine load is timed apart and left out of tokens/s.

  plain           vLLM generate, no logprobs (the baseline)
  logprobs        vLLM generate with logprobs=65 in flat form, no hook (vLLM's own cost)
  plain+extract   plain generate with vLLM's extract_hidden_states method on for the last layer (files
                  written by its connector, not read): what the speculative detour costs by itself
  topk            VLLMBackend.run, --encoding topk: top-64 + exact entropy + target log-prob
  compact         the same for compact (its default top-k) + the exact tail
  hybrid          hybrid: top-16 head + exact tail + 64 keyed draws from the tail
  sampled         sampled: 64 keyed draws (vLLM asked for no top-k)
  topk+hid        topk + hidden layer -1 through forward hooks in the worker (the CPU default)
  topk+hid-extract  topk + hidden layer -1 through extract_hidden_states (the GPU default)

On a GPU the forward-hook configuration is left out (CUDA graphs skip Python hooks; the backend uses
extract_hidden_states there). Results: `<out>/capture_vllm.json` and `.md` (printed at the end).

    python benchmarks/capture_vllm.py                          # 32 prompts, 64 new tokens, SmolLM2
    python benchmarks/capture_vllm.py --quick                  # 4 prompts, 8 new tokens
    python benchmarks/capture_vllm.py --model /models/Qwen3-8B # any local teacher directory (GPU: bf16)
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
# configuration -> (encoding, hidden-state method); None: vLLM alone
CONFIGS = {"plain": None, "logprobs": None, "plain+extract": None, "topk": ("topk", None),
           "compact": ("compact", None), "hybrid": ("hybrid", None), "sampled": ("sampled", None),
           "topk+hid": ("topk", "hook"), "topk+hid-extract": ("topk", "extract")}
NAMES = {"plain": "plain vLLM generate (no logprobs)", "logprobs": "vLLM logprobs=65 (flat), no hook",
         "plain+extract": "plain + extract_hidden_states on (vLLM alone)",
         "topk": "topk: top-64 + exact entropy", "compact": "compact: + exact tail (worker)",
         "hybrid": "hybrid: top-16 head + tail + 64 keyed draws", "sampled": "sampled: 64 keyed draws",
         "topk+hid": "topk + hidden layer -1 (forward hooks)",
         "topk+hid-extract": "topk + hidden layer -1 (extract_hidden_states)"}


def prompt_ids(teacher_path: str, limit: int) -> list[list[int]]:
    """The builtin prompts tokenised exactly as a generate-mode capture tokenises them."""
    from transformers import AutoTokenizer

    from logitcache.teacher.inputs import load_input
    from logitcache.teacher.prepare import Tokenize

    roles = {"prompt": None, "messages": None, "text": None, "response": None}
    table = load_input("builtin", "train", roles, "generate", limit)
    tk = Tokenize(AutoTokenizer.from_pretrained(teacher_path), None)
    return [tk.chat_prompt([{"role": "user", "content": r["prompt"]}]) for r in table.rows(0, table.num_rows)]


def worker(config: str, teacher: str, limit: int, max_new_tokens: int, repeats: int, dtype: str) -> dict:
    """One configuration in this process: load, warm up, time `repeats` runs, report the best."""
    import tempfile

    from logitcache.format.encodings import encoding_class
    from logitcache.teacher.backend import GenerationSettings, SequenceRequest
    from logitcache.teacher.capture import _generation_eos
    from logitcache.teacher.identity import resolve_teacher
    from logitcache.teacher.vllm_backend import VLLMBackend, configure_environment

    resolved = resolve_teacher(teacher)
    ids = prompt_ids(str(resolved.path), limit)
    eos = _generation_eos(resolved.path)
    layers = json.loads((Path(resolved.path) / "config.json").read_text())["num_hidden_layers"]
    max_len = 2048
    t0 = time.perf_counter()
    if CONFIGS[config] is not None:
        name, hidden = CONFIGS[config]
        if hidden:
            os.environ["LOGITCACHE_VLLM_HIDDEN"] = hidden
        cls = encoding_class(name)
        top_k = TOP_K if name == "topk" else cls.default_top_k
        encoding = cls.resolve()
        backend = VLLMBackend(resolved, dtype, max_len, top_k, hidden_layers=[layers] if hidden else [],
                              encoding=encoding)
        gen = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=0, eos_token_ids=eos)
        reqs = [SequenceRequest(prompt_ids=p, response_ids=None, score_from=len(p) - 1, max_new_tokens=max_new_tokens,
                                draw_key=i) for i, p in enumerate(ids)]

        def run(n=None):
            out = backend.run(reqs[:n], top_k, backend.hidden_layers, gen, encoding=encoding)
            return [c.tokens[c.prompt_len:].tolist() for c in out]
    else:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        from logitcache.teacher import vllm_hidden

        on_cpu = configure_environment()
        extract = vllm_hidden.engine_config([layers], tempfile.mkdtemp()) if config == "plain+extract" else {}
        llm = LLM(model=str(resolved.path), dtype=dtype, max_model_len=max_len, seed=0, enforce_eager=on_cpu,
                  max_logprobs=TOP_K + 1, **extract)
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
    ap.add_argument("--teacher", "--model", dest="teacher", default="smollm2-135m",
                    help="embedded teacher name or a local Hugging Face model directory")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.limit, a.max_new_tokens, a.repeats, a.rounds = 4, 8, 1, 1
    import torch

    on_gpu = torch.cuda.is_available()
    if a.dtype == "auto":
        a.dtype = "bfloat16" if on_gpu else "float32"
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a.teacher, a.limit, a.max_new_tokens, a.repeats, a.dtype)))
        return
    configs = [c for c in a.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or "plain" not in configs:
        sys.exit(f"--configs: {unknown or 'plain is needed (the baseline)'}; choose from {', '.join(CONFIGS)}")
    if on_gpu and "topk+hid" in configs:
        configs.remove("topk+hid")                 # CUDA graphs skip Python hooks: not a GPU configuration

    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for rnd in range(a.rounds):
        for config in configs:
            cmd = [sys.executable, __file__, "--worker", config, "--limit", str(a.limit), "--max-new-tokens",
                   str(a.max_new_tokens), "--repeats", str(a.repeats), "--teacher", a.teacher, "--dtype", a.dtype]
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
    import vllm

    result = dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__, vllm=vllm.__version__,
                     cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
        settings=dict(teacher=a.teacher, prompts=a.limit, max_new_tokens=a.max_new_tokens, top_k=TOP_K,
                      repeats=a.repeats, rounds=a.rounds, dtype=a.dtype, decoding="greedy"),
        configs={c: dict(tokens=b["tokens"], best_tokens_per_s=b["tokens_per_s"],
                         overhead_vs_plain=base / b["tokens_per_s"] - 1, same_responses_as_plain=same[c],
                         load_s=[r["load_s"] for r in runs[c]],
                         all_tokens_per_s=[r["tokens"] / t for r in runs[c] for t in r["times_s"]])
                 for c, b in best.items()})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture_vllm.json").write_text(json.dumps(result, indent=1))
    lines = [f"# vLLM capture cost ({a.teacher}, {a.limit} prompts x {a.max_new_tokens} new tokens, greedy, "
             f"{a.dtype})", "",
             f"Machine: {result['machine']['platform']}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"vLLM {vllm.__version__}" + (f", GPU {result['machine']['cuda']}" if result['machine']['cuda'] else ""),
             "", "| configuration | generated tokens | tokens/s (best) | overhead vs plain | same responses |",
             "|---|---|---|---|---|"]
    for c in configs:
        r = result["configs"][c]
        lines.append(f"| {NAMES[c]} | {r['tokens']} | {r['best_tokens_per_s']:.1f} | "
                     f"{100 * r['overhead_vs_plain']:+.1f}% | {'yes' if r['same_responses_as_plain'] else 'NO'} |")
    lines += ["", "Overhead = plain tokens/s / configuration tokens/s - 1 (time per token); best of "
              f"{a.rounds} engine loads x {a.repeats} timed runs each, after a warm-up run."]
    (out / "capture_vllm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
