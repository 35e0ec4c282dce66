"""What a model costs to keep and to run: parameters, disk, latency, throughput and peak memory, each
measured in a fresh process on the device and in the dtype the caller names.

For a model directory (a Hugging Face directory, or a training run whose ``student/`` or ``model/``
subdirectory holds one, as ``student_train`` writes it), ``measure_model`` spawns one process that loads
the model and measures:

* ``parameters`` (tied embeddings counted once), ``non_embedding_parameters``, and ``disk_bytes`` (the
  weight files: ``*.safetensors`` and ``*.bin``; measured here, without loading);
* ``latency_ms_per_token``: batch 1, greedy, with the KV cache, time per generated token after the
  first (the prefill is timed on its own as ``prefill_tokens_per_s``);
* ``throughput_tokens_per_s``: ``batch_size`` left-padded prompts generated together with
  ``model.generate`` (greedy, exactly ``new_tokens`` each), generated tokens / wall time;
* memory: on the CPU ``peak_rss_mb``, the peak resident memory of that process (load included),
  ``peak_rss_generate_mb`` the peak from after loading to the end (Linux only, else None), and
  ``rss_before_load_mb`` the runtime alone (python, torch, transformers), to subtract; on CUDA
  ``peak_memory_mb``, torch's peak allocated device memory (weights, activations, KV cache), and
  ``peak_rss_mb`` as on the CPU.

``vllm_throughput`` measures the same batch under vLLM (``vllm_throughput_tokens_per_s``) in its own
fresh process, where vLLM can load the model. Every row states its ``device`` and ``dtype``.

A fresh process per model keeps one model's memory and warm caches out of the next one's numbers.
Timings are the median over ``repeats``; every repeat is kept under ``details``.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# Short English prompts for models that ship a tokenizer; a few sentences each, so the prefill
# is not all per-call overhead.
DEFAULT_PROMPTS = [
    "The history of the printing press begins in the fifteenth century. Explain in a few sentences "
    "how movable type changed the way books were made and who could read them.",
    "Write a short, friendly email to a colleague asking whether the team meeting on Thursday can "
    "be moved to the afternoon, and suggest two possible times.",
    "A train leaves the station at nine in the morning and travels at sixty miles per hour. How far "
    "has it gone by half past eleven? Show the steps of the calculation.",
    "List three simple ways to save water at home, and for each one say briefly why it helps and "
    "how much difference it can make over a year.",
]
RANDOM_PROMPT_COUNT, RANDOM_PROMPT_LEN, RANDOM_SEED = 4, 32, 0

WEIGHT_SUFFIXES = (".safetensors", ".bin")
NOT_WEIGHTS = {"training_args.bin"}          # HF Trainer's pickled arguments, not a weight file
MB = 1e6
DTYPES = ("float32", "bfloat16", "float16")


# --- model directory and static sizes ------------------------------------------------------------

def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The Hugging Face directory behind ``path``: itself, or the run's ``student/`` or ``model/``."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    for sub in ("student", "model"):
        if (path / sub / "config.json").is_file():
            return path / sub
    found = [p for p in path.iterdir() if (p / "config.json").is_file()] if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(f"{path}: no config.json here nor in one subdirectory "
                            f"(expected a Hugging Face model directory or a training run holding one)")


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The weight files of a model directory (sharded or not), in name order."""
    return sorted(p for p in Path(model_dir).iterdir()
                  if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and p.name not in NOT_WEIGHTS)


def disk_bytes(model_dir: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in weight_files(model_dir))


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, non-embedding parameters); a tied input/output embedding counts once."""
    embedding = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                 if m is not None for p in m.parameters()}
    params = list(model.parameters())           # already de-duplicated: shared tensors appear once
    total = sum(p.numel() for p in params)
    return total, total - sum(p.numel() for p in params if id(p) in embedding)


def default_prompt_ids(model_dir: str | os.PathLike) -> tuple[list[list[int]], str]:
    """Fixed prompts: DEFAULT_PROMPTS through the model's tokenizer if it has one, else seeded
    random ids. The same directory always gives the same ids, so teacher and student (which share a
    tokenizer) are timed on the same tokens."""
    model_dir = Path(model_dir)
    if any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        return [tok(text, add_special_tokens=True)["input_ids"] for text in DEFAULT_PROMPTS], "tokenizer"
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    rng = random.Random(RANDOM_SEED)
    return [[rng.randrange(vocab) for _ in range(RANDOM_PROMPT_LEN)]
            for _ in range(RANDOM_PROMPT_COUNT)], "random"


# --- the measurement, in a fresh process ---------------------------------------------------------

def _rss_kb(field: str) -> int | None:
    """A /proc/self/status memory field (VmRSS, VmHWM) in KiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), so later peaks leave out the load (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _left_pad(prompts: list[list[int]], pad_id: int):
    """A left-padded batch (ids, attention mask): generation continues from every row's last token."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def _sync(device) -> None:
    """Wait for the device's queued work, so a wall-clock reading covers it (CUDA runs asynchronously)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_timed(model, prompt: list[int], new_tokens: int, device) -> tuple[float, float]:
    """(prefill seconds, decode seconds for tokens 2..new_tokens): greedy, batch 1, KV cache.

    Our own loop rather than ``generate``: the prefill and the per-token steps are timed apart."""
    import torch

    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    past = out.past_key_values
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _measure_here(model_dir: str, prompt_ids: list[list[int]], new_tokens: int, batch_size: int,
                  threads: int | None, repeats: int, device_name: str, dtype_name: str) -> dict:
    """Load and measure one model in this process (meant to be a fresh one: see measure_model)."""
    import resource

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    rss_before_load = _rss_kb("VmRSS")          # the runtime alone (python, torch, transformers)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name)).to(device).eval()
    load_s = time.perf_counter() - t
    rss_after_load = _rss_kb("VmRSS")           # safetensors weights are mmapped: not all resident yet
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a spawned child
    # would report its parent's peak when the parent is the larger (a report that has loaded models).
    hwm_load_kb = _rss_kb("VmHWM")
    hwm_reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total, non_embedding = parameter_counts(model)

    cfg = model.config
    pad_id = next(v for v in (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None), 0)
                  if v is not None)
    pad_id = pad_id[0] if isinstance(pad_id, list) else pad_id
    batch = [prompt_ids[i % len(prompt_ids)] for i in range(batch_size)]
    ids, mask = (t.to(device) for t in _left_pad(batch, pad_id))
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=pad_id, attention_mask=mask)

    prefill_s, decode_s, batch_s = [], [], []
    with torch.inference_mode():
        _decode_timed(model, prompt_ids[0], 3, device)               # warm-up: first-call costs
        model.generate(ids, **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})
        for _ in range(repeats):                                     # interleaved, so drift hits both
            p, d = _decode_timed(model, prompt_ids[0], new_tokens, device)
            prefill_s.append(p)
            decode_s.append(d)
            _sync(device)
            t = time.perf_counter()
            out = model.generate(ids, **gen)
            _sync(device)
            batch_s.append(time.perf_counter() - t)
            assert out.shape == (batch_size, ids.shape[1] + new_tokens), out.shape

    hwm_kb = _rss_kb("VmHWM") if hwm_reset else None
    if hwm_load_kb is not None:                                      # Linux: this process's own peaks
        peak_kb = max(hwm_load_kb, _rss_kb("VmHWM") or 0)
    else:                                                            # elsewhere: KiB on Linux, bytes on macOS
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kb_to_mb = lambda kb: None if kb is None else kb * 1024 / MB
    prompt_len = len(prompt_ids[0])
    row = {
        "parameters": total,
        "non_embedding_parameters": non_embedding,
        "latency_ms_per_token": statistics.median(decode_s) * 1e3 / (new_tokens - 1),
        "prefill_tokens_per_s": prompt_len / statistics.median(prefill_s),
        "throughput_tokens_per_s": batch_size * new_tokens / statistics.median(batch_s),
        "peak_rss_mb": kb_to_mb(peak_kb),
        "peak_rss_generate_mb": kb_to_mb(hwm_kb),
        "rss_before_load_mb": kb_to_mb(rss_before_load),
        "rss_after_load_mb": kb_to_mb(rss_after_load),
        "device": device_name if device.type == "cpu" else f"{device_name} ({torch.cuda.get_device_name(device)})",
        "dtype": dtype_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "details": {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
                    "batch_generate_s": batch_s, "latency_prompt_tokens": prompt_len,
                    "batch_prompt_width": int(ids.shape[1]), "model_class": type(model).__name__},
    }
    if device.type == "cuda":
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / MB
    return row


def check_settings(new_tokens: int, batch_size: int, repeats: int, device: str, dtype: str) -> None:
    """Refuse settings that cannot be measured, naming the setting (ValueError)."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens {new_tokens}: must be >= 2 (latency is the time per token after the first)")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size {batch_size}, repeats {repeats}: both must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"device {device!r}: choose cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA device (torch.cuda.is_available() is "
                             "False); use cpu")


def _spawned(fn, *args):
    """``fn(*args)`` in one fresh spawned process (its own memory peak, no warm caches)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measure_model(path: str, *, name: str, prompt_ids: list[list[int]] | None = None,
                  new_tokens: int = 32, batch_size: int = 8, threads: int | None = None,
                  repeats: int = 2, device: str = "cpu", dtype: str = "float32") -> dict:
    """Size, speed and memory of one causal LM (see the module docstring), measured in a fresh
    spawned process so that models never share memory peaks or warm caches."""
    check_settings(new_tokens, batch_size, repeats, device, dtype)
    model_dir = resolve_model_dir(path)
    prompt_source = "given"
    if prompt_ids is None:
        prompt_ids, prompt_source = default_prompt_ids(model_dir)
    if not prompt_ids or not all(prompt_ids):
        raise ValueError("prompt_ids: need at least one non-empty prompt")
    measured = _spawned(_measure_here, str(model_dir), [list(map(int, p)) for p in prompt_ids],
                        new_tokens, batch_size, threads, repeats, device, dtype)
    return {"name": name, "path": str(path), "model_dir": str(model_dir),
            "disk_bytes": disk_bytes(model_dir), **measured, "new_tokens": new_tokens,
            "batch_size": batch_size, "repeats": repeats, "prompt_source": prompt_source}


# --- vLLM's throughput ---------------------------------------------------------------------------

def _vllm_here(model_dir: str, prompt_ids: list[list[int]], new_tokens: int, batch_size: int, repeats: int,
               dtype_name: str) -> dict:
    from logitcache.teacher.vllm_backend import configure_environment

    # vLLM's CPU build writes pages of warnings to the terminal; this child's stderr goes nowhere, so the
    # report's own progress stays readable (a failure still comes back: as the exception, in vllm_error)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)

    on_cpu = configure_environment(1)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    batch = [TokensPrompt(prompt_token_ids=prompt_ids[i % len(prompt_ids)]) for i in range(batch_size)]
    longest = max(len(p) for p in prompt_ids) + new_tokens
    llm = LLM(model=model_dir, dtype=dtype_name, max_model_len=longest, seed=0,
              **({"enforce_eager": True} if on_cpu else {}))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    try:
        llm.generate(batch[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)   # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            outs = llm.generate(batch, params, use_tqdm=False)
            times.append(time.perf_counter() - t)
            assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # already down
            pass
    import vllm

    return {"vllm_throughput_tokens_per_s": batch_size * new_tokens / statistics.median(times),
            "vllm": vllm.__version__, "vllm_generate_s": times}


def vllm_throughput(path: str, *, prompt_ids: list[list[int]] | None = None, new_tokens: int = 32,
                    batch_size: int = 8, repeats: int = 2, dtype: str = "float32") -> dict:
    """Generated tokens/s of ``batch_size`` prompts generated together by vLLM (greedy, exactly
    ``new_tokens`` each, the same prompts as ``measure_model``), in a fresh process. Where vLLM is
    missing or cannot load the model, ``{"vllm_error": why}`` instead: the report says so and goes on."""
    from logitcache.teacher.vllm_backend import vllm_available

    if not vllm_available():
        return {"vllm_error": "vLLM is not installed"}
    model_dir = resolve_model_dir(path)
    if prompt_ids is None:
        prompt_ids, _ = default_prompt_ids(model_dir)
    try:
        return _spawned(_vllm_here, str(model_dir), [list(map(int, p)) for p in prompt_ids], new_tokens,
                        batch_size, repeats, dtype)
    except Exception as e:                       # the engine's own failure, reported beside the numbers
        return {"vllm_error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"}
