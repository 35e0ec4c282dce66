"""The transformers backend runs the backend conformance class on a tiny random Llama (SmolLM2's
tokenizer), plus what only it does: generate mode without prompt rows scored."""

import json
import os

import torch

from logitcache import open_cache
from logitcache.teacher.capture import CaptureJob, run_capture
from tests.teacher.backend_conformance import BackendTests


class TestHFBackend(BackendTests):
    backend = "hf"
    teacher = "tiny_teacher"

    def test_without_with_prompt_only_response_rows_are_scored(self, tmp_path, teacher_dir, model):
        from transformers import AutoTokenizer

        run_capture(CaptureJob(cache=str(tmp_path / "c"), teacher=str(teacher_dir), backend="hf", progress=False,
                               encoding="topk", top_k=8, samples_per_shard=3, limit=5, max_new_tokens=12,
                               system_prompt="Be brief.", hidden_layers=[0, 1, -1]))
        cache = open_cache(str(tmp_path / "c"))
        tok = AutoTokenizer.from_pretrained(teacher_dir)
        prompts = [json.loads(line)["prompt"] for line in open(os.path.join(
            os.path.dirname(__import__("logitcache").__file__), "data", "prompts.jsonl"))][:5]
        for rec, prompt in zip(cache.samples.to_pylist(), prompts):
            text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=[2],
                                     pad_token_id=2)[0, len(ids):].tolist()
            stop = ref.index(2) + 1 if 2 in ref else len(ref)
            tokens = cache.sample(rec["sample_id"])["tokens"].tolist()
            assert tokens[:len(ids)] == ids and tokens[len(ids):] == ref[:stop]
            assert rec["prompt_tokens"] == len(ids) and rec["scored_start"] == len(ids) - 1
            assert rec["finish_reason"] == ("stop" if 2 in ref else "length")
            assert rec["prompt"] == prompt
        self.check_against_direct(cache, model, generate=True)
