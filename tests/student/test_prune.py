"""student-prune: importance scores against a direct, hook-free computation of a tiny Llama's forward
pass; pruned weights equal the teacher's kept slices and load in transformers; the command end to end
and its bad flags."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from logitcache.format import LogitcacheError
from student_train.model import drop_layers
from student_train.prune import (PruneConfig, keep_blocks, measure_importance, prune, prune_model, top)
from tests.conftest import copy_tokenizer


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory, smollm2_dir):
    """A 4-layer Llama, d=32, 4 query heads in 2 KV groups, FFN 64, untied head, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40)
        for b in model.model.layers:            # blocks of different strength, so the rankings mean something
            b.mlp.down_proj.weight.mul_(1 + 3 * torch.rand(()))
    out = tmp_path_factory.mktemp("tiny4")
    model.save_pretrained(out)
    copy_tokenizer(smollm2_dir, out)
    return out


@pytest.fixture(scope="module")
def calib_cache(tmp_path_factory, tiny4):
    from logitcache.teacher.capture import CaptureJob, run_capture

    d = tmp_path_factory.mktemp("calib")
    texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
             "Water boils at 100 degrees Celsius at sea level.", "Paris is the capital of France."]
    (d / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run_capture(CaptureJob(cache=str(d / "c"), teacher=str(tiny4), backend="hf", mode="score", source=str(d / "t.jsonl"),
                           progress=False, encoding="topk", top_k=4))
    return str(d / "c")


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def direct_scores(model, ids):
    """The importance scores of one sequence from the weights alone: the Llama forward pass written out
    (RMSNorm, rotary attention with grouped KV, SwiGLU), no hooks."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg, body = model.config, model.model
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    dh, T = cfg.hidden_size // H, ids.shape[1]
    x = body.embed_tokens(ids)[0].double()
    cos, sin = body.rotary_emb(x[None].float(), torch.arange(T)[None])
    mask = torch.full((T, T), float("-inf")).triu(1).double()
    bi, neurons, groups, channels = [], [], [], torch.zeros(cfg.hidden_size, dtype=torch.float64)

    def rms(norm, v):
        out = norm.weight.double() * v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        channels.add_(out.abs().sum(0))
        return out

    def lin(layer, v):
        return v @ layer.weight.double().T

    for b in body.layers:
        h = rms(b.input_layernorm, x)
        q = lin(b.self_attn.q_proj, h).view(T, H, dh).transpose(0, 1)[None]
        k = lin(b.self_attn.k_proj, h).view(T, K, dh).transpose(0, 1)[None]
        v = lin(b.self_attn.v_proj, h).view(T, K, dh).transpose(0, 1)
        q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
        k = k[0].repeat_interleave(H // K, 0)
        v = v.repeat_interleave(H // K, 0)
        att = torch.softmax(q[0] @ k.transpose(1, 2) / math.sqrt(dh) + mask, -1) @ v      # (H, T, dh)
        o = att.transpose(0, 1)                                                           # (T, H, dh)
        groups.append(o.norm(dim=-1).sum(0).reshape(K, H // K).sum(-1))
        mid = x + lin(b.self_attn.o_proj, o.reshape(T, H * dh))
        n2 = rms(b.post_attention_layernorm, mid)
        a = torch.nn.functional.silu(lin(b.mlp.gate_proj, n2)) * lin(b.mlp.up_proj, n2)
        neurons.append(a.abs().sum(0))
        out = mid + lin(b.mlp.down_proj, a)
        bi.append(torch.nn.functional.cosine_similarity(x, out, dim=-1).sum())
        x = out
    rms(body.norm, x)
    return torch.stack(bi), neurons, groups, channels


def nll(model, sequences):
    total = count = 0
    with torch.no_grad():
        for ids in sequences:
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            total -= float(lp.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return total / count


def test_importance_equals_a_direct_computation(tiny4, calib_cache):
    from student_train.prune import calibration_sequences

    model = load(tiny4)
    seqs = calibration_sequences(calib_cache, 4096, 512)
    assert len(seqs) == 4
    imp = measure_importance(model, seqs)
    n = sum(s.shape[1] for s in seqs)
    assert imp.tokens == n
    parts = [direct_scores(model, s) for s in seqs]
    cos = sum(p[0] for p in parts)
    np.testing.assert_allclose(imp.block_influence, (1 - cos / n).numpy(), rtol=1e-4, atol=1e-6)
    for i in range(4):
        np.testing.assert_allclose(imp.neurons[i], (sum(p[1][i] for p in parts) / n).numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(imp.kv_groups[i], (sum(p[2][i] for p in parts) / n).numpy(), rtol=1e-4)
    np.testing.assert_allclose(imp.channels, (sum(p[3] for p in parts) / n).numpy(), rtol=1e-4)
    # the likelihood drop: the model rebuilt without each block, against the whole model
    assert imp.nll == pytest.approx(nll(model, seqs), rel=1e-6)
    for i in range(4):
        without = drop_layers(model, [j for j in range(4) if j != i])
        assert imp.likelihood_drop[i] == pytest.approx(nll(without, seqs) - imp.nll, rel=1e-5, abs=1e-6)
    # and what is kept follows the scores
    assert keep_blocks(imp, 3, "bi") == sorted(np.argsort(-np.array(imp.block_influence), kind="stable")[:3].tolist())
    assert keep_blocks(imp, 3, "likelihood") == top(imp.likelihood_drop, 3)
    bi = imp.block_influence
    runs = [bi[0] + bi[1], bi[1] + bi[2], bi[2] + bi[3]]
    s = int(np.argmin(runs))
    assert keep_blocks(imp, 2, "contiguous") == [j for j in range(4) if j not in (s, s + 1)]


def test_pruned_weights_are_the_teachers_kept_slices_and_load_in_transformers(tiny4, tmp_path):
    teacher = load(tiny4)
    blocks, channels = [0, 2, 3], [c for c in range(32) if c % 4 != 1]                  # 24 channels
    neurons = [[j for j in range(64) if (j + i) % 2 == 0] for i in range(3)]            # 32 per block
    groups = [[1], [0], [1]]
    student = prune_model(load(tiny4), blocks, neurons, groups, channels)
    student.save_pretrained(tmp_path / "s")
    s = load(tmp_path / "s")
    c = s.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim) == (3, 24, 32, 2, 1, 8)
    ch = torch.tensor(channels)
    T, S = teacher.model, s.model
    assert torch.equal(S.embed_tokens.weight, T.embed_tokens.weight[:, ch])
    assert torch.equal(s.lm_head.weight, teacher.lm_head.weight[:, ch])
    assert torch.equal(S.norm.weight, T.norm.weight[ch])
    for j, i in enumerate(blocks):
        tb, sb = T.layers[i], S.layers[j]
        nj = torch.tensor(neurons[j])
        q = torch.tensor([h * 8 + r for h in (2 * groups[j][0], 2 * groups[j][0] + 1) for r in range(8)])
        kv = torch.tensor([groups[j][0] * 8 + r for r in range(8)])
        assert torch.equal(sb.mlp.gate_proj.weight, tb.mlp.gate_proj.weight[nj][:, ch])
        assert torch.equal(sb.mlp.up_proj.weight, tb.mlp.up_proj.weight[nj][:, ch])
        assert torch.equal(sb.mlp.down_proj.weight, tb.mlp.down_proj.weight[ch][:, nj])
        assert torch.equal(sb.self_attn.q_proj.weight, tb.self_attn.q_proj.weight[q][:, ch])
        assert torch.equal(sb.self_attn.k_proj.weight, tb.self_attn.k_proj.weight[kv][:, ch])
        assert torch.equal(sb.self_attn.v_proj.weight, tb.self_attn.v_proj.weight[kv][:, ch])
        assert torch.equal(sb.self_attn.o_proj.weight, tb.self_attn.o_proj.weight[ch][:, q])
        assert torch.equal(sb.input_layernorm.weight, tb.input_layernorm.weight[ch])
        assert torch.equal(sb.post_attention_layernorm.weight, tb.post_attention_layernorm.weight[ch])
    assert s(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 49152)
    # with nothing cut but whole blocks, the student computes what the teacher without those blocks does
    depth_only = prune_model(load(tiny4), blocks, None, None, None)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        want = drop_layers(teacher, blocks)(input_ids=ids).logits
        assert torch.allclose(depth_only(input_ids=ids).logits, want, atol=1e-5)


def test_the_command_writes_a_student_and_its_report(tiny4, calib_cache, tmp_path):
    out = tmp_path / "student"
    r = subprocess.run([sys.executable, "-m", "student_train.prune_cli", calib_cache, "--out", str(out), "--teacher",
                        str(tiny4), "--depth", "3", "--ffn", "48", "--kv-heads", "1", "--hidden", "24", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report == json.loads((out / "prune_report.json").read_text())
    assert (out / "prune_report.png").stat().st_size > 10_000
    assert report["kept"]["blocks"] == top(report["importance"]["block_influence"], 3)
    assert len(report["removed"]["blocks"]) == 1 and len(report["removed"]["channels"]) == 8
    s = load(out)
    assert report["parameters"]["after"] == sum(p.numel() for p in s.parameters()) < report["parameters"]["before"]
    assert report["nll"]["pruned_before_healing"] > report["nll"]["teacher"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).vocab_size == AutoTokenizer.from_pretrained(tiny4).vocab_size


@pytest.mark.parametrize("flags, message", [
    (["--depth", "5"], "--depth: 5 is not in \\[1, 4\\]"),
    (["--kv-heads", "3"], "--kv-heads: 3 is not in \\[1, 2\\]"),
    ([], "give at least one target shape"),
])
def test_bad_targets_are_refused_naming_the_flag(tiny4, calib_cache, tmp_path, flags, message):
    with pytest.raises(LogitcacheError, match=message):
        prune(PruneConfig(cache=calib_cache, out=str(tmp_path / "s"), teacher=str(tiny4),
                          **{k.lstrip("-").replace("-", "_"): int(v) for k, v in zip(flags[::2], flags[1::2])}),
              log=lambda m: None)
    assert not (tmp_path / "s").exists()


def test_every_documented_student_prune_command_parses():
    """The examples in the docs and the help name real options with valid values (parsed, not run)."""
    from student_train.prune_cli import cli
    from tests.student.test_rounds import documented_commands

    commands = documented_commands("student-prune")
    assert len(commands) >= 3
    for args in commands:
        cli.make_context("student-prune", args)          # raises on an unknown option or a bad value


def test_importance_is_reused_from_an_earlier_report_only_when_it_measured_the_same(tiny4, calib_cache, tmp_path):
    first = prune(PruneConfig(cache=calib_cache, out=str(tmp_path / "a"), teacher=str(tiny4), depth=3),
                  log=lambda m: None)
    again = prune(PruneConfig(cache=calib_cache, out=str(tmp_path / "b"), teacher=str(tiny4), depth=2, ffn=32,
                              importance_from=str(tmp_path / "a" / "prune_report.json")), log=lambda m: None)
    assert again["importance"] == first["importance"]
    assert again["kept"]["blocks"] == top(first["importance"]["block_influence"], 2)
    with pytest.raises(LogitcacheError, match="measured with calibration_tokens 4096, not 100"):
        prune(PruneConfig(cache=calib_cache, out=str(tmp_path / "c"), teacher=str(tiny4), depth=2,
                          calibration_tokens=100, importance_from=str(tmp_path / "a" / "prune_report.json")),
              log=lambda m: None)
