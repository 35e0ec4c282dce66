"""Distil SmolLM2-135M into a student with another tokenizer, from one cache (issue 20).

There is no second pretrained model here, so the student's tokenizer is made: a byte-level BPE of
``--vocab`` tokens trained with `tokenizers` on the text the cache holds (prompts and responses of
the training samples), with the chat template's special tokens. The student is the teacher cut to
``--keep-layers`` and re-embedded into that vocabulary: each new token's embedding (tied to the LM
head) is the mean of the teacher embeddings of the teacher tokens of its text.

At equal steps, one seed, the same rows: CE only, and cross-tokenizer KD with each
``--cross-tokenizer-loss`` (map, uld, map+uld), each with CE at ``--ce-alpha``. Held-out: the same
held-out split of the cache for every run: the student's perplexity on its own tokens and the forward
KL over the mapped entries (one measure for every run, docs/training.md). Writes
benchmarks/results/cross_tokenizer.json and .md.

    python benchmarks/cross_tokenizer.py --cache /work/lc-quality/cache-compact --work /tmp/xtok
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def make_tokenizer(cache, vocab: int, teacher_tok, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    table = cache.samples.select(["prompt", "response"]).to_pylist()
    texts = [t for row in table for t in (row["prompt"], row["response"]) if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") if t in teacher_tok.get_vocab()]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = teacher_tok.chat_template
    fast.save_pretrained(out)
    return fast


def make_student(teacher_dir: str, keep: str, new_tok, teacher_tok, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from logitcache.align import TokenBytes
    from student_train.model import drop_layers, parse_keep_layers

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = drop_layers(teacher, parse_keep_layers(keep, teacher.config.num_hidden_layers))
    old = student.get_input_embeddings().weight.detach().clone()
    table = TokenBytes.from_tokenizer(new_tok)
    rows, empty = [], 0
    for i in range(len(new_tok)):
        text = table.piece(i).decode("utf-8", errors="replace")
        ids = teacher_tok(text, add_special_tokens=False)["input_ids"] if text else []
        if not ids:
            empty += 1
        rows.append(old[ids].mean(0) if ids else old.mean(0))
    student.resize_token_embeddings(len(new_tok))
    with torch.no_grad():
        student.get_input_embeddings().weight.copy_(torch.stack(rows))
    student.config.vocab_size = len(new_tok)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(student.config, name, getattr(new_tok, name))
    student.generation_config.eos_token_id = new_tok.eos_token_id
    student.generation_config.bos_token_id = new_tok.bos_token_id
    student.generation_config.pad_token_id = new_tok.pad_token_id
    student.save_pretrained(out)
    new_tok.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in student.parameters()), "tokens_without_text": empty}


def train(cache: str, student: Path, out: Path, args, loss: str | None) -> dict:
    flags = ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
             "--lr", str(args.lr), "--warmup-steps", "4", "--eval-frac", str(args.eval_frac), "--seed", str(args.seed),
             "--no-resume", "--no-progress", "--json", "--fused-loss", "off"]
    flags += ["--ce-alpha", "1.0"] if loss is None else ["--ce-alpha", str(args.ce_alpha),
                                                         "--cross-tokenizer-loss", loss]
    cmd = [str(BIN / "student-train"), cache, "--out", str(out), "--student", str(student), *flags]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    report = json.loads(res.stdout[res.stdout.index("{"):])
    return {"loss": loss or "ce", "wall_s": time.perf_counter() - t0, "eval_start": report["eval_start"],
            "eval_end": report["eval_end"], "cross_tokenizer": report["cross_tokenizer"],
            "seconds_per_step": report["seconds_this_run"] / max(report["steps"], 1)}


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"Teacher SmolLM2-135M-Instruct (V = {s['teacher_vocab']}); student: the teacher's layers "
             f"`{s['keep_layers']}` re-embedded into a byte-level BPE of {s['student_vocab']} tokens trained on the "
             f"cache's text ({s['student_parameters'] / 1e6:.1f}M parameters). {s['steps']} steps of "
             f"{s['batch_size']} x {s['seq_len']}, lr {s['lr']}, seed {s['seed']}, CPU (2 cores), "
             f"{s['vocab_mapped']} of the teacher's ids have a student token.",
             "",
             "| run | held-out perplexity (student tokens) | held-out mapped KL (nats) | aligned share | "
             "positions by map / ULD | teacher mass mapped | s/step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    start = result["runs"][0]["eval_start"]
    lines.append(f"| start (re-embedded, untrained) | {start['perplexity']:.1f} | {start['kl_forward']:.3f} | | | | |")
    for r in result["runs"]:
        e, c = r["eval_end"], r["cross_tokenizer"]
        name = "CE only" if r["loss"] == "ce" else f"KD `{r['loss']}` + CE (alpha {s['ce_alpha']})"
        split = "-" if r["loss"] == "ce" else f"{c['aligned'] - c['uld']} / {c['uld']}"
        lines.append(f"| {name} | {e['perplexity']:.1f} | {e['kl_forward']:.3f} | {c['aligned_share']:.3f} | {split} | "
                     f"{c['mapped_mass']:.3f} | {r['seconds_per_step']:.2f} |")
    lines += ["", "One seed. s/step is wall time on a machine other jobs shared: not a speed comparison. Every run "
                  "puts rows into the student's tokens the same way; only the loss differs."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--keep-layers", default="every:3")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ce-alpha", type=float, default=0.5)
    ap.add_argument("--eval-frac", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--losses", default="ce,map,uld,map+uld")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md and docs/results.md from the JSON")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads((RESULTS / "cross_tokenizer.json").read_text()), not args.no_docs)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from logitcache.align import TokenBytes, VocabMap
    from logitcache.store.reader import open_cache
    from student_train.model import teacher_directory

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = open_cache(args.cache)
    teacher_dir = teacher_directory(cache.manifest)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_dir)
    new_tok = make_tokenizer(cache, args.vocab, teacher_tok, work / "tokenizer")
    info = make_student(teacher_dir, args.keep_layers, new_tok, teacher_tok, work / "student")
    vm = VocabMap.build(TokenBytes.from_tokenizer(teacher_tok, cache.manifest.teacher.vocab_size),
                        TokenBytes.from_tokenizer(new_tok))
    runs = []
    for loss in args.losses.split(","):
        print(f"training: {loss}", flush=True)
        runs.append(train(args.cache, work / "student", work / f"run-{loss}", args, None if loss == "ce" else loss))
        print(json.dumps(runs[-1]["eval_end"]), flush=True)
    result = {"setup": {"cache": args.cache, "teacher_vocab": cache.manifest.teacher.vocab_size,
                        "student_vocab": len(new_tok), "keep_layers": args.keep_layers,
                        "student_parameters": info["parameters"], "tokens_without_text": info["tokens_without_text"],
                        "vocab_mapped": int((vm.to_student >= 0).sum()), "steps": args.steps,
                        "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                        "ce_alpha": args.ce_alpha, "seed": args.seed, "eval_frac": args.eval_frac},
              "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cross_tokenizer.json").write_text(json.dumps(result, indent=1))
    render(result, not args.no_docs)


def render(result: dict, docs: bool) -> None:
    md = markdown(result)
    (RESULTS / "cross_tokenizer.md").write_text(md)
    if docs:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from generated import write_block

        write_block(ROOT / "docs" / "results.md", "cross-tokenizer", md,
                    heading="## A student with another tokenizer (benchmarks/cross_tokenizer.py)")
    print(md)


if __name__ == "__main__":
    main()
