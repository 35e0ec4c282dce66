"""A round's samples: the student answers prompts, and each sampled token's log-probability under the
student that sampled it (the behaviour policy) is kept beside it.

The rows written (JSON lines) are what ``logitcache capture --mode score`` reads as token ids, so the
teacher scores exactly the student's tokens (docs/format.md, "Score inputs as token ids"):

    {"prompt": text, "prompt_ids": [...], "response_ids": [...], "behaviour_logprobs": [...], "response": text}

``behaviour_logprobs[i]`` = log q(response_ids[i] | prompt, response_ids[:i]) at temperature 1 (the
model's own distribution): with transformers, recomputed by one teacher-forced forward pass over each
finished sequence; with vLLM (``generator="vllm"``, the default where a GPU and vLLM are present), vLLM's
own ``raw_logprobs`` of the sampled token (log-softmax of the logits at T = 1, before any sampling
processor), each request seeded on its own so its tokens do not depend on the batch. Both are the
value the policy gradient's importance ratio and advantage need. When sampling at another
temperature or top-p, the tokens come from that sampling distribution (recorded in the provenance), not
from q; on-policy rounds sample at temperature 1, top-p 1 by default, where the two are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch

from logitcache.format.errors import LogitcacheError


@dataclass
class SamplingSettings:
    """How the student samples: ``temperature`` 0 = greedy (evaluation)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise LogitcacheError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise LogitcacheError(f"--temperature {self.temperature} / --top-p {self.top_p}: need temperature >= 0 "
                                  "and 0 < top-p <= 1")
        if self.batch_size < 1:
            raise LogitcacheError(f"--generate-batch-size must be >= 1, got {self.batch_size}")


def student_fingerprint(student_dir: str) -> str:
    """Which student sampled a round: the teacher's recipe (``identity.weights_fingerprint``: config.json and,
    per weight file, name, size and first and last MiB)."""
    from pathlib import Path

    from logitcache.teacher.identity import weights_fingerprint

    return weights_fingerprint(Path(student_dir))


def read_prompts(source: str, limit: int | None, offset: int = 0, system_prompt: str | None = None) -> list[dict]:
    """Prompt rows (``prompt`` or ``messages`` column, as ``logitcache capture`` reads them) [offset, offset +
    limit) of ``source``, each as {"row", "messages", "prompt"}; rows that are empty are left out."""
    from logitcache.teacher.inputs import load_input
    from logitcache.teacher.prepare import parse_row

    table = load_input(source, "train", {"prompt": None, "messages": None}, "generate")
    stop = table.num_rows if limit is None else min(table.num_rows, offset + limit)
    out = []
    for i, values in enumerate(table.rows(offset, stop) if offset < stop else []):
        parsed = parse_row(values, "generate", f"{table.source}, row {offset + i}")
        if not parsed.skip:
            out.append({"row": offset + i, "messages": parsed.messages, "prompt": parsed.prompt_text})
    return out


def load_student(student_dir: str, device: str = "cpu", dtype: str = "float32"):
    """(model in eval mode on ``device`` in ``dtype``, tokenizer) of a Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
        model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=getattr(torch, dtype)).to(device).eval()
    except OSError as e:
        raise LogitcacheError(f"student {student_dir}: cannot load it as a Hugging Face model ({e})") from None
    return model, tokenizer


def eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


@torch.no_grad()
def token_logprobs(model, sequences: list[tuple[list[int], list[int]]], device: str = "cpu") -> list[list[float]]:
    """log q(response[i] | prompt, response[:i]) at temperature 1 for each (prompt_ids, response_ids), from
    one right-padded forward pass over the batch (padding after a sequence cannot change it: causal)."""
    lengths = [len(p) + len(r) for p, r in sequences]
    T = max(lengths)
    ids = torch.zeros(len(sequences), T, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for b, (p, r) in enumerate(sequences):
        ids[b, :lengths[b]] = torch.tensor(p + r)
        mask[b, :lengths[b]] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    out = []
    for b, (p, r) in enumerate(sequences):
        rows = logits[b, len(p) - 1:len(p) - 1 + len(r)]                         # row j predicts token j + 1
        lp = torch.log_softmax(rows, -1).gather(-1, torch.tensor(r, device=rows.device)[:, None])[:, 0]
        out.append(lp.cpu().tolist())
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: list[dict], settings: SamplingSettings, system_prompt: str | None = None,
             device: str = "cpu", progress: bool = False) -> list[dict]:
    """The student's responses to ``prompts`` (``read_prompts``) with their behaviour log-probs: one row per
    prompt, ready for ``logitcache capture --mode score``. Batches of ``settings.batch_size`` prompts in
    order, batch i sampled with seed (settings.seed, i): the same rows for the same settings."""
    from logitcache.teacher.prepare import Tokenize

    tk = Tokenize(tokenizer, system_prompt)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="student samples", unit="prompt")
    for i in range(0, len(prompts), settings.batch_size):
        chunk = prompts[i:i + settings.batch_size]
        prompt_ids = [tk.chat_prompt(p["messages"]) for p in chunk]
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, p in enumerate(prompt_ids):                                       # left padding
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        torch.manual_seed(int(hashlib.blake2b(f"{settings.seed}:{i // settings.batch_size}".encode(),
                                              digest_size=4).hexdigest(), 16))
        sample = settings.temperature > 0
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=sample,
                             temperature=settings.temperature if sample else None,
                             top_p=settings.top_p if sample else None, top_k=0 if sample else None,
                             max_new_tokens=settings.max_new_tokens, eos_token_id=eos or None, pad_token_id=pad)
        new = out[:, width:].cpu().tolist()
        responses = []
        for seq in new:
            end = next((j + 1 for j, t in enumerate(seq) if t in eos), len(seq))   # through the first end token
            responses.append(seq[:end])
        keep = [(p, r) for p, r in zip(prompt_ids, responses) if r]
        lps = iter(token_logprobs(model, keep, device)) if keep else iter(())
        for p, prompt, r in zip(chunk, prompt_ids, responses):
            if not r:
                continue
            rows.append(sample_row(p, prompt, r, next(lps), tokenizer))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return rows


GENERATORS = ("auto", "transformers", "vllm")


def choose_generator(name: str, device: str) -> str:
    """``auto``: vLLM where the student samples on a GPU and vLLM is importable, else transformers (on the
    CPU vLLM's engine start costs more than a round's sampling saves)."""
    if name not in GENERATORS:
        raise LogitcacheError(f"--generator {name!r}: choose {', '.join(GENERATORS)}")
    if name != "auto":
        return name
    from logitcache.teacher.vllm_backend import vllm_available

    return "vllm" if device.startswith("cuda") and torch.cuda.is_available() and vllm_available() else "transformers"


def request_seed(seed: int, index: int) -> int:
    return int(hashlib.blake2b(f"{seed}:request:{index}".encode(), digest_size=4).hexdigest(), 16) & 0x7FFFFFFF


def generate_vllm(student_dir: str, prompts: list[dict], settings: SamplingSettings,
                  system_prompt: str | None = None) -> list[dict]:
    """As ``generate``, with vLLM on the student's directory: request i seeded with (seed, i); the sampled
    tokens' log-probs are vLLM's raw log-probs at T = 1. vLLM starts worker processes: call this from a
    program's main (the ``student-onpolicy`` command is one)."""
    from transformers import AutoTokenizer

    from logitcache.teacher.prepare import Tokenize
    from logitcache.teacher.vllm_backend import configure_environment

    on_cpu = configure_environment(1)
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise LogitcacheError(f"--generator vllm: vLLM is not importable ({e}); use --generator transformers") from None
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    tk = Tokenize(tokenizer, system_prompt)
    prompt_ids = [tk.chat_prompt(p["messages"]) for p in prompts]
    longest = max(len(p) for p in prompt_ids) + settings.max_new_tokens
    llm = LLM(model=student_dir, dtype="float32" if on_cpu else "auto", seed=settings.seed, max_model_len=longest,
              max_logprobs=1, logprobs_mode="raw_logprobs", **({"enforce_eager": True} if on_cpu else {}))
    try:
        greedy = settings.temperature == 0
        params = [SamplingParams(temperature=settings.temperature, top_p=1.0 if greedy else settings.top_p,
                                 max_tokens=settings.max_new_tokens, seed=request_seed(settings.seed, i), logprobs=0)
                  for i in range(len(prompts))]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # already down
            pass
    rows = []
    for p, ids, out in zip(prompts, prompt_ids, outs):
        c = out.outputs[0]
        response = list(c.token_ids)
        if not response:
            continue
        lps = [float(step[t].logprob) for step, t in zip(c.logprobs, response)]
        rows.append(sample_row(p, ids, response, lps, tokenizer))
    return rows


def sample_row(prompt: dict, prompt_ids: list[int], response_ids: list[int], behaviour: list[float], tokenizer) -> dict:
    """One row as ``logitcache capture --mode score`` reads it (token ids, behaviour log-probs) plus texts."""
    return {"prompt": prompt["prompt"], "prompt_ids": prompt_ids, "response_ids": response_ids,
            "behaviour_logprobs": behaviour, "response": tokenizer.decode(response_ids, skip_special_tokens=False),
            "prompt_row": prompt["row"]}


def write_rows(rows: list[dict], path: str) -> None:
    """JSON lines, written in one step (``CacheFS.write_atomic``): a crash leaves no half file."""
    write_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def write_json(obj, path: str) -> None:
    write_file(path, json.dumps(obj, indent=1).encode())


def write_file(path: str, data: bytes) -> None:
    from logitcache.store.fs import CacheFS

    parent, name = os.path.split(os.path.abspath(path))
    CacheFS(parent).write_atomic(name, data)


def rollout(student_dir: str, prompts: list[dict], settings: SamplingSettings, out_path: str, *,
            round_index: int | None = None, source: str = "", system_prompt: str | None = None,
            device: str = "cpu", progress: bool = False, generator: str = "auto") -> dict:
    """Sample ``prompts`` with the student (``generator``: ``choose_generator``), write the rows to
    ``out_path`` and their provenance (what the round cache's manifest records as ``rollout``) to
    ``out_path`` + ``.info.json``; returns it."""
    generator = choose_generator(generator, device)
    if generator == "vllm":
        rows = generate_vllm(student_dir, prompts, settings, system_prompt)
    else:
        model, tokenizer = load_student(student_dir, device)
        rows = generate(model, tokenizer, prompts, settings, system_prompt, device, progress)
    if not rows:
        raise LogitcacheError(f"the student {student_dir} gave no non-empty response to {len(prompts)} prompt(s)")
    info = {"round": round_index, "student": os.path.abspath(student_dir),
            "student_fingerprint": student_fingerprint(student_dir), "generator": generator,
            "sampling": asdict(settings), "prompts": {"source": source, "first_row": prompts[0]["row"] if prompts else None,
                        "last_row": prompts[-1]["row"] if prompts else None, "count": len(prompts)},
            "samples": len(rows), "response_tokens": sum(len(r["response_ids"]) for r in rows)}
    write_json(info, out_path + ".info.json")
    write_rows(rows, out_path)           # last: its presence marks the step done
    return info
