"""student_train/fidelity.py: every measure equals a direct full-vocabulary computation from the cache's
stored rows and the model's own logits, sample by sample; the teacher against its own cache is ~0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logitcache import open_cache
from logitcache.format.arrays import FULL_LOGPROBS
from logitcache.format.errors import LogitcacheError
from student_train.fidelity import fidelity
from tests.student.conftest import other_model

def direct(model_dir, cache_url) -> dict:
    """Each sample alone through the model; every scored row against the stored full distribution."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cache = open_cache(cache_url)
    fwd = rev = nll = agree = n = 0.0
    for s in cache.samples.to_pylist():
        start = s["token_offset"]
        rows = cache.read_rows(s["shard"], start, start + s["num_tokens"], ["tokens", FULL_LOGPROBS])
        with torch.no_grad():
            logits = model(torch.as_tensor(rows["tokens"].astype(np.int64))[None]).logits[0].double()
        for t in range(s["scored_start"], s["scored_end"]):
            logp = torch.log_softmax(torch.as_tensor(rows[FULL_LOGPROBS][t], dtype=torch.float64), -1)
            logq = torch.log_softmax(logits[t], -1)
            fwd += float((logp.exp() * (logp - logq)).sum())
            rev += float((logq.exp() * (logq - logp)).sum())
            nll -= float(logq[int(rows["tokens"][t + 1])])
            agree += float(logq.argmax() == logp.argmax())
            n += 1
    return {"kl_forward_exact": fwd / n, "kl_reverse_exact": rev / n, "perplexity": math.exp(nll / n),
            "top1_agreement": agree / n, "tokens": int(n)}


def test_a_student_against_a_direct_computation(tmp_path, full_cache, smollm2_dir):
    student = other_model(tmp_path / "s", smollm2_dir)
    got = fidelity(str(student), full_cache)
    want = direct(str(student), full_cache)
    assert got["exact"] is True and got["samples"] == 7 and got["tokens"] == want["tokens"]
    for key in ("kl_forward_exact", "kl_reverse_exact", "perplexity", "top1_agreement"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert want["kl_forward_exact"] > 0.5           # a different model: far from the teacher


def test_the_teacher_against_its_own_cache(tiny_teacher, full_cache):
    got = fidelity(str(tiny_teacher), full_cache)
    assert got["kl_forward_exact"] < 1e-5 and got["kl_reverse_exact"] < 1e-5 and got["top1_agreement"] == 1.0
    assert got["perplexity"] == pytest.approx(direct(str(tiny_teacher), full_cache)["perplexity"], rel=1e-5)


def test_another_tokenizer_is_refused_naming_both(tmp_path, full_cache, smollm2_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    student = other_model(tmp_path / "s", smollm2_dir, vocab=300)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (student / f).unlink()
    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w0").save_pretrained(student)
    with pytest.raises(LogitcacheError, match=f"model {student} on evaluation cache {full_cache}: the student's "
                                              "tokenizer differs from the teacher tokenizer"):
        fidelity(str(student), full_cache)
