"""Benchmark of the hf capture backend on the embedded teacher (CPU): what capturing costs over plain
inference, how many bytes a token takes on storage, and which codec each array should use.

Every ratio is measured side by side in this one run, on one loaded model and the same token ids:
  1. generate mode: plain ``model.generate`` vs ``HFBackend.run`` (top-k, entropy, optional hidden);
  2. score mode: plain forward pass (full logits) vs ``HFBackend.run`` on score requests;
  3. bytes per token of each array of a cache written end to end by ``run_capture``;
  4. every codec of ``CODEC_CHOICES`` on that cache's real arrays: size, write and read speed.
Results go to ``<out>/capture_hf.json`` and ``<out>/capture_hf.md``; the markdown is printed.

    python benchmarks/capture_hf.py            # ~32 prompts, 64 new tokens (a few minutes on 2 cores)
    python benchmarks/capture_hf.py --quick    # smoke run: 4 prompts, 8 new tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from logitcache.format import layout  # noqa: E402
from logitcache.format.arrays import chunk_rows  # noqa: E402
from logitcache.store import codecs as codec_lib  # noqa: E402
from logitcache.store.reader import open_cache  # noqa: E402
from logitcache.teacher.backend import GenerationSettings, SequenceRequest  # noqa: E402
from logitcache.teacher import capture as capture_mod  # noqa: E402
from logitcache.teacher.capture import CaptureJob, _generation_eos, resolve_layers, run_capture  # noqa: E402
from logitcache.teacher.hf_backend import HFBackend  # noqa: E402
from logitcache.teacher.identity import resolve_teacher, tokenizer_info  # noqa: E402
from logitcache.teacher.inputs import load_input  # noqa: E402
from logitcache.teacher.prepare import Tokenize  # noqa: E402

TOP_K = 64
TOKEN_COUNT_NOTE = ("generated tokens = response tokens per sequence, up to and including the first EOS, "
                    "capped at max_new_tokens; counted the same way for plain generate and capture")
SCORE_COUNT_NOTE = "score tokens = every token of every sequence fed to the forward pass (prompt + response)"


# ---- inputs -----------------------------------------------------------------------------------
def prompt_ids(tokenizer, limit: int) -> list[list[int]]:
    """Token ids exactly as a generate-mode capture of the builtin prompts builds them."""
    roles = {"prompt": None, "messages": None, "text": None, "response": None}
    table = load_input("builtin", "train", roles, "generate", limit)
    tk = Tokenize(tokenizer, None)
    return [tk.chat_prompt([{"role": "user", "content": r["prompt"]}]) for r in table.rows(0, table.num_rows)]


# ---- plain baselines (same model object, same batching as the backend) --------------------------
@torch.no_grad()
def plain_generate(backend: HFBackend, prompts: list[list[int]], max_new: int, eos: list[int]) -> list[np.ndarray]:
    """``model.generate`` with the backend's batching (length-sorted, left-padded, pad id 0, greedy);
    returns each prompt's response cut after its first EOS, so counts match the capture's."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos), pad_token_id=0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[np.ndarray | None] = [None] * len(prompts)
    for b in range(0, len(order), backend.generate_batch_size):
        idx = order[b:b + backend.generate_batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        seqs = backend.model.generate(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device),
                                      generation_config=config)[:, width:].cpu().numpy()
        seqs = seqs[:, :max_new]
        hit = np.isin(seqs, eos)
        lengths = np.where(hit.any(1), hit.argmax(1) + 1, seqs.shape[1])
        for r, i in enumerate(idx):
            out[i] = seqs[r, :lengths[r]]
    return out  # type: ignore[return-value]


@torch.no_grad()
def plain_forward(backend: HFBackend, seqs: list[np.ndarray]) -> None:
    """One forward pass per batch returning full logits: the cheapest way to get the same numbers
    without the backend (same length-sorted, right-padded batches as ``HFBackend._score``)."""
    lengths = [len(s) for s in seqs]
    for batch in backend._batches(lengths):
        width = max(lengths[i] for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, :lengths[i]] = torch.from_numpy(seqs[i].astype(np.int64))
            mask[r, :lengths[i]] = 1
        logits = backend.model(input_ids=ids.to(backend.device), attention_mask=mask.to(backend.device),
                               use_cache=False).logits
        logits[0, 0, 0].item()  # make sure the work is done (matters on GPUs)


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


# ---- 1 + 2: inference timings -------------------------------------------------------------------
def bench_inference(backend: HFBackend, prompts: list[list[int]], max_new: int, eos: list[int],
                    repeats: int) -> tuple[dict, dict, list[np.ndarray]]:
    """Plain and captured runs interleaved per repeat so that drifts in machine load hit all alike;
    the best time per variant is reported (other load on the machine only ever adds time)."""
    last = resolve_layers([-1], backend.num_layers)
    gen = GenerationSettings(max_new, 0.0, 1.0, 0, eos)
    gen_requests = [SequenceRequest(p, None, len(p) - 1, max_new) for p in prompts]

    # warm-up: first-call costs (allocator, kernels, the backend's one-time LM-head check) stay out
    plain_generate(backend, prompts[:1], 2, eos)
    backend.run(gen_requests[:1], TOP_K, last, GenerationSettings(2, 0.0, 1.0, 0, eos))

    gen_times: dict[str, list[float]] = {"plain": [], "capture": [], "capture_hidden": []}
    score_times: dict[str, list[float]] = {"plain": [], "capture": [], "capture_hidden": []}
    plain_resp = captured = None
    for _ in range(repeats):
        t, plain_resp = timed(lambda: plain_generate(backend, prompts, max_new, eos))
        gen_times["plain"].append(t)
        t, captured = timed(lambda: backend.run(gen_requests, TOP_K, [], gen))
        gen_times["capture"].append(t)
        t, _ = timed(lambda: backend.run(gen_requests, TOP_K, last, gen))
        gen_times["capture_hidden"].append(t)

        seqs = [c.tokens for c in captured]
        score_requests = [SequenceRequest([], s.tolist(), 0) for s in seqs]
        t, _ = timed(lambda: plain_forward(backend, seqs))
        score_times["plain"].append(t)
        t, _ = timed(lambda: backend.run(score_requests, TOP_K, [], None))
        score_times["capture"].append(t)
        t, _ = timed(lambda: backend.run(score_requests, TOP_K, last, None))
        score_times["capture_hidden"].append(t)

    plain_n = int(sum(len(r) for r in plain_resp))
    cap_resp = [c.tokens[c.prompt_len:] for c in captured]
    cap_n = int(sum(len(r) for r in cap_resp))
    same = plain_n == cap_n and all(np.array_equal(a, b) for a, b in zip(plain_resp, cap_resp))
    score_n = int(sum(len(c.tokens) for c in captured))

    def rows(times: dict[str, list[float]], counts: dict[str, int]) -> dict:
        best = {k: min(v) for k, v in times.items()}
        base = counts["plain"] / best["plain"]
        return {k: {"seconds": best[k], "seconds_all": times[k], "tokens": counts[k],
                    "tokens_per_second": counts[k] / best[k],
                    "overhead_vs_plain": base / (counts[k] / best[k])} for k in times}

    generate = {"token_count": TOKEN_COUNT_NOTE, "sequences": len(prompts), "max_new_tokens": max_new,
                "identical_tokens_plain_vs_capture": bool(same), "hidden_layers_resolved": last,
                **rows(gen_times, {"plain": plain_n, "capture": cap_n, "capture_hidden": cap_n})}
    score = {"token_count": SCORE_COUNT_NOTE, "sequences": len(captured), "hidden_layers_resolved": last,
             **rows(score_times, {k: score_n for k in score_times})}
    return generate, score, [c.tokens for c in captured]


# ---- 3: an end-to-end capture and its bytes per token -------------------------------------------
def bench_run_capture(teacher: str, cache_dir: str, limit: int, max_new: int,
                      expected_tokens: list[np.ndarray]) -> tuple[dict, dict]:
    job = CaptureJob(cache=cache_dir, teacher=teacher, mode="generate", source="builtin", limit=limit,
                     top_k=TOP_K, hidden_layers=[-1], max_new_tokens=max_new, device="cpu", progress=False)
    # run_capture loads its own model: time that load where it happens, so it can be taken out
    loads: list[float] = []
    make_backend = capture_mod._make_backend

    def timed_make_backend(*args, **kwargs):
        t, backend = timed(lambda: make_backend(*args, **kwargs))
        loads.append(t)
        return backend

    capture_mod._make_backend = timed_make_backend
    try:
        wall, summary = timed(lambda: run_capture(job))
    finally:
        capture_mod._make_backend = make_backend
    load = sum(loads)
    cache = open_cache(cache_dir)
    samples = cache.samples
    generated = int(sum(samples.column("response_tokens").to_pylist()))
    scored = int(sum(s.scored_tokens for s in cache.shards))
    tokens = cache.manifest.num_tokens
    offsets = samples.column("token_offset").to_pylist()
    counts = samples.column("num_tokens").to_pylist()
    shard_of = samples.column("shard").to_pylist()
    same = len(expected_tokens) == len(offsets) and all(
        np.array_equal(cache.read_rows(sh, o, o + n, ["tokens"])["tokens"], e)
        for sh, o, n, e in zip(shard_of, offsets, counts, expected_tokens))
    run = {"wall_seconds": wall, "summary_wall_seconds": summary.wall_seconds, "model_load_seconds": load,
           "wall_minus_model_load_seconds": wall - load,
           "generated_tokens_per_second_without_model_load": generated / (wall - load), "samples": summary.samples,
           "tokens": tokens, "scored_tokens": scored, "generated_tokens": generated,
           "generated_tokens_per_second_end_to_end": generated / wall,
           "identical_tokens_vs_backend_run": bool(same), "codec": job.codec, "hidden_layers": job.hidden_layers,
           "note": "wall includes resolving the teacher, loading its own model, generating, scoring, writing and "
                   "finalizing"}
    stored = cache.stored_bytes()
    sizes = {name: {"bytes": b, "per_token": b / max(tokens, 1), "per_scored_token": b / max(scored, 1)}
             for name, b in stored.items()}
    total = sum(stored.values())
    sizes["total"] = {"bytes": total, "per_token": total / max(tokens, 1), "per_scored_token": total / max(scored, 1)}
    return run, sizes


# ---- 4: codecs on the real arrays ------------------------------------------------------------
def _dir_bytes(path: Path) -> tuple[int, int]:
    """(chunk data bytes, metadata bytes) of one zarr array on disk."""
    files = [f for f in path.rglob("*") if f.is_file()]
    meta = sum(f.stat().st_size for f in files if f.name == "zarr.json")
    return sum(f.stat().st_size for f in files) - meta, meta


def bench_codecs(cache_dir: str, work: Path, min_seconds: float) -> dict:
    """Writes each array of the cache with each codec, laid out as ``write_shard`` lays it out (one
    storage object per array, ``chunk_rows`` rows per compressed chunk), and reads it back. Times
    are the best of as many repeats as fit in ``min_seconds`` (at least 3): small arrays are noisy."""
    import zarr

    cache = open_cache(cache_dir)
    scored = int(sum(s.scored_tokens for s in cache.shards))
    raw: dict[str, list[np.ndarray]] = {name: [] for name in cache.array_names}
    for s in cache.shards:
        g = cache.group(s.name)
        for name in cache.array_names:
            raw[name].append(g[name][...])                 # storage form (bf16 as uint16 bits)
    data = {name: np.concatenate(parts) for name, parts in raw.items()}

    def best_of(fn) -> float:
        times, t_end = [], time.perf_counter() + min_seconds
        while len(times) < 3 or time.perf_counter() < t_end:
            times.append(timed(fn)[0])
        return min(times)

    out: dict[str, dict] = {}
    for name, arr in data.items():
        spec = cache.manifest.arrays[name]
        rows = chunk_rows(spec)
        n = arr.shape[0]
        mb = arr.nbytes / 1e6
        out[name] = {"raw_bytes": int(arr.nbytes), "rows": int(n), "chunk_rows": rows, "codecs": {}}
        for choice in [c for c in codec_lib.CODEC_CHOICES if c != "auto"]:   # auto = a per-array pick of these
            path = work / choice / name.replace("/", "_")

            def write(path=path, choice=choice):
                z = zarr.create_array(zarr.storage.LocalStore(path), shape=arr.shape, dtype=spec.storage_dtype,
                                      chunks=(rows, *spec.row_shape),
                                      shards=(max(-(-n // rows), 1) * rows, *spec.row_shape),
                                      compressors=codec_lib.compressors(spec, choice), fill_value=spec.fill,
                                      zarr_format=3, overwrite=True)
                z[...] = arr

            def read(path=path):
                return zarr.open_array(zarr.storage.LocalStore(path, read_only=True), mode="r")[...]

            t_write = best_of(write)
            t_read = best_of(read)
            back = read()
            if not np.array_equal(back, arr, equal_nan=arr.dtype.kind == "f"):
                raise AssertionError(f"{name} with {choice}: read back differs from what was written")
            nbytes, meta = _dir_bytes(path)
            out[name]["codecs"][choice] = {
                "bytes": nbytes, "metadata_bytes": meta, "per_scored_token": nbytes / max(scored, 1), "ratio": arr.nbytes / max(nbytes, 1),
                "write_MBps": mb / t_write, "read_MBps": mb / t_read}
    used = {name: cache.manifest.codecs[name]["codec"] for name in out}
    for name, r in out.items():                             # cross-check: our layout is write_shard's
        in_cache = sum(_dir_bytes(Path(cache_dir) / layout.shard_arrays(s.name) / name)[0] for s in cache.shards)
        r["cache_codec"] = used[name]
        r["same_bytes_as_cache"] = r["codecs"][used[name]]["bytes"] == in_cache
        c = r["codecs"]
        smallest = min(v["bytes"] for v in c.values())
        near = [k for k, v in c.items() if v["bytes"] <= smallest * 1.01]   # ties: within 1%
        r["winner"] = max(near, key=lambda k: c[k]["read_MBps"])
        r["winner_rule"] = "smallest; codecs within 1% of the smallest are a tie, broken by read speed"
    return {"scored_tokens": scored, "arrays": out, "default_codec": codec_lib.DEFAULT_CODEC,
            "cache_codec": used,
            "note": "bytes = the array's chunk data on disk (its zarr.json, about the same for every codec, is "
                    "left out); speeds are MB/s of raw data, best of repeats"}


# ---- report -------------------------------------------------------------------------------------
def machine_info() -> dict:
    import transformers
    import zarr

    return {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "transformers": transformers.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__}


def to_markdown(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    lines = [
        "# capture_hf benchmark", "",
        f"Teacher `{s['teacher']}` ({s['dtype']}, {s['device']}), {s['prompts']} builtin prompts, "
        f"max_new_tokens {s['max_new_tokens']}, top_k {s['top_k']}, best of {s['repeats']} repeat(s), "
        f"quick={s['quick']}.  ",
        f"Machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), torch {m['torch']} with "
        f"{m['torch_threads']} threads, transformers {m['transformers']}, zarr {m['zarr']}.  ",
        f"Model load (HFBackend, once, not in any timing below): {r['model_load_seconds']:.2f} s. "
        f"Total benchmark wall: {r['total_seconds']:.1f} s.", "",
    ]

    def speed_table(title: str, sec: dict, labels: dict[str, str], note: str) -> None:
        lines.extend([f"## {title}", "", note + ".", "",
                      "| run | seconds | tokens | tokens/s | overhead vs plain |", "|---|---:|---:|---:|---:|"])
        for key, label in labels.items():
            v = sec[key]
            lines.append(f"| {label} | {v['seconds']:.2f} | {v['tokens']} | {v['tokens_per_second']:.1f} | "
                         f"{v['overhead_vs_plain']:.2f}x |")
        lines.append("")

    g = r["generate"]
    speed_table("Generate mode", g, {"plain": "plain `model.generate`", "capture": f"backend.run, top_k {TOP_K}",
                                     "capture_hidden": f"backend.run, top_k {TOP_K} + hidden layer -1"},
                f"Tokens counted: {g['token_count']}. Plain and captured responses identical: "
                f"{g['identical_tokens_plain_vs_capture']}")
    sc = r["score"]
    speed_table("Score mode", sc, {"plain": "plain forward (full logits)", "capture": f"backend.run, top_k {TOP_K}",
                                   "capture_hidden": f"backend.run, top_k {TOP_K} + hidden layer -1"},
                f"Sequences: the {sc['sequences']} prompt+response sequences of generate mode; {sc['token_count']}")

    rc = r["run_capture"]
    lines.extend([
        "## End-to-end run_capture", "",
        f"One `run_capture` (generate, top_k {TOP_K}, hidden layer -1, codec `{rc['codec']}`): "
        f"{rc['wall_seconds']:.2f} s wall ({rc['note']}); its model load took {rc['model_load_seconds']:.2f} s, "
        f"the rest {rc['wall_minus_model_load_seconds']:.2f} s. {rc['generated_tokens']} generated tokens: "
        f"{rc['generated_tokens_per_second_end_to_end']:.1f} generated tokens/s end to end, "
        f"{rc['generated_tokens_per_second_without_model_load']:.1f} without the model load; "
        f"{rc['tokens']} tokens stored, {rc['scored_tokens']} scored. "
        f"Tokens identical to backend.run: {rc['identical_tokens_vs_backend_run']}.", "",
        "### Bytes per token on storage", "",
        "| array | bytes | per token | per scored token |", "|---|---:|---:|---:|"])
    for name, v in r["bytes_per_token"].items():
        lines.append(f"| {name} | {v['bytes']} | {v['per_token']:.1f} | {v['per_scored_token']:.1f} |")
    lines.append("")

    c = r["codecs"]
    lines.extend(["## Codecs on the real arrays", "",
                  f"Each array of the cache above written with each codec, laid out as write_shard lays it out. "
                  f"Note: {c['note']}; on arrays of a few hundred KB the speeds are mostly per-call overhead. "
                  f"Winner rule: {next(iter(c['arrays'].values()))['winner_rule']}. "
                  f"Current default: `{c['default_codec']}` (per array: "
                  + ", ".join(f"{k} `{v}`" for k, v in c["cache_codec"].items())
                  + "). Same bytes as the cache for its codec (layout check): "
                  f"{all(a['same_bytes_as_cache'] for a in c['arrays'].values())}.", "",
                  "| array | raw KB | codec | bytes / scored token | ratio | write MB/s | read MB/s |",
                  "|---|---:|---|---:|---:|---:|---:|"])
    for name, a in c["arrays"].items():
        for choice, v in a["codecs"].items():
            mark = (" **(winner)**" if choice == a["winner"] else "") + (" (used)" if choice == a["cache_codec"] else "")
            lines.append(f"| {name} | {a['raw_bytes'] / 1e3:.1f} | {choice}{mark} | {v['per_scored_token']:.2f} | "
                         f"{v['ratio']:.2f} | {v['write_MBps']:.3g} | {v['read_MBps']:.3g} |")
    lines.extend(["", "Winner per array: " + ", ".join(f"{n}: `{a['winner']}`" for n, a in c["arrays"].items()) + ".",
                  ""])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 prompts, 8 new tokens, 1 repeat")
    ap.add_argument("--out", default="benchmarks/results", help="folder for capture_hf.json and capture_hf.md")
    ap.add_argument("--limit", type=int, default=None, help="builtin prompts to use (default 32; quick 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64; quick 8")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 2; quick 1)")
    ap.add_argument("--teacher", default="smollm2-135m")
    args = ap.parse_args(argv)
    limit = args.limit if args.limit is not None else (4 if args.quick else 32)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else (8 if args.quick else 64)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    from transformers import AutoTokenizer

    resolved = resolve_teacher(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    eos = tokenizer_info(tokenizer, _generation_eos(resolved.path)).eos_token_ids
    prompts = prompt_ids(tokenizer, limit)
    print(f"[bench] {len(prompts)} prompts, max_new_tokens {max_new}, repeats {repeats}", file=sys.stderr)

    load_s, backend = timed(lambda: HFBackend(resolved, dtype="float32", device="cpu"))
    try:
        print("[bench] generate + score timings", file=sys.stderr)
        generate, score, seqs = bench_inference(backend, prompts, max_new, eos, repeats)
    finally:
        backend.close()

    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        print("[bench] end-to-end run_capture", file=sys.stderr)
        cache_dir = os.path.join(tmp, "cache")
        run, sizes = bench_run_capture(args.teacher, cache_dir, limit, max_new, seqs)
        print("[bench] codecs", file=sys.stderr)
        codecs = bench_codecs(cache_dir, Path(tmp) / "codecs", 0.1 if args.quick else 0.5)

    result = {
        "benchmark": "capture_hf",
        "settings": {"teacher": args.teacher, "teacher_path": str(resolved.path), "dtype": "float32",
                     "device": "cpu", "prompts": len(prompts), "source": "builtin (first rows)",
                     "max_new_tokens": max_new, "top_k": TOP_K, "repeats": repeats, "quick": args.quick,
                     "generate_batch_size": backend.generate_batch_size, "batch_tokens": backend.batch_tokens},
        "machine": machine_info(),
        "model_load_seconds": load_s,
        "generate": generate,
        "score": score,
        "run_capture": run,
        "bytes_per_token": sizes,
        "codecs": codecs,
        "total_seconds": time.perf_counter() - t_start,
    }
    (out / "capture_hf.json").write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    (out / "capture_hf.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
