"""Tests for student_train.linear_loss: the fused LM head + distillation loss equals the unfused
objective (logits = h W^T + b, then ``objective.teacher_loss`` / CE / mix) in value and in the gradients
w.r.t. the hidden states, the head weight and its bias, in float64, for every loss the objective offers;
and it never creates an (N, V) tensor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from student_train import linear_loss, losses, sampled_kd
from student_train.linear_loss import (
    default_chunk_rows,
    linear_teacher_loss,
    supports_fused_head,
)
from student_train.losses import IGNORE_INDEX, DistillationConfig, TailPolicy
from student_train.objective import teacher_loss
from student_train.targets import EstimatedTargets, SparseTargets

F64 = torch.float64
B, T, H, V, W = 3, 7, 5, 40, 6          # N = 21 rows
TIGHT = {"rtol": 1e-10, "atol": 1e-12}

KINDS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.2}),
    ("total_variation", {}),
]
KIND_IDS = [k + "".join(f"-{a}{v}" for a, v in kw.items()) for k, kw in KINDS]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def _head(seed: int, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64).requires_grad_(True)
    weight = (0.7 * torch.randn(V, H, generator=g, dtype=F64)).requires_grad_(True)
    b = (0.2 * torch.randn(V, generator=g, dtype=F64)).requires_grad_(True) if bias else None
    return hidden, weight, b


def _sparse(seed: int, *, stored_tail: bool, ragged: bool) -> SparseTargets:
    """Top-W teacher rows from a random dense teacher; ragged: fewer ids on some rows (-1 / -inf after
    them) and a few rows with no id at all; stored_tail: the exact tail mass, else None (derived)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(2.0 * torch.randn(B, T, V, generator=g, dtype=F64), -1)
    lp, ids = teacher.topk(W, -1)                                          # (B, T, W) sorted descending
    tail = (1.0 - lp.exp().sum(-1)).clamp_min(0.0)                         # (B, T)
    if ragged:
        keep = torch.randint(1, W + 1, (B, T), generator=g)
        keep[0, 2] = keep[2, 6] = 0                                        # rows without any entry
        pos = torch.arange(W)
        cut = pos >= keep[..., None]
        ids = ids.masked_fill(cut, -1)
        lp = lp.masked_fill(cut, float("-inf"))
        tail = (1.0 - lp.exp().sum(-1)).clamp(0.0, 1.0)
    return SparseTargets(ids, lp.float() if seed % 2 else lp, tail if stored_tail else None)


def _estimated(seed: int) -> EstimatedTargets:
    """Sampled-draw targets (counts / n) from a random teacher; a few rows without draws."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2.0 * torch.randn(B * T, V, generator=g, dtype=F64), -1)
    draws = torch.multinomial(p, 16, replacement=True, generator=g)       # (N, 16)
    ids = torch.full((B * T, W), -1, dtype=torch.int64)
    targets = torch.zeros(B * T, W, dtype=F64)
    for r in range(B * T):
        uniq, counts = draws[r].unique(return_counts=True)
        order = counts.argsort(descending=True)[:W]
        ids[r, :len(order)] = uniq[order]
        targets[r, :len(order)] = counts[order].to(F64) / 16.0
    ids[3] = -1
    targets[3] = 0.0
    ids[11] = -1
    targets[11] = 0.0
    entropy = -(p * p.log()).sum(-1)
    return EstimatedTargets(ids.reshape(B, T, W), targets.reshape(B, T, W), entropy.reshape(B, T))


def _weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, T, generator=g, dtype=F64) + 0.1
    w[1, :3] = 0.0                                                         # masked rows (a prompt)
    w[2, 4] = 0.0
    return w.float() if seed % 2 else w


def _labels(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 0] = y[2, 4] = y[1, 5] = IGNORE_INDEX
    return y


# ---------------------------------------------------------------------------------------------
# The unfused reference: objective.compute_loss's arithmetic on materialised logits
# ---------------------------------------------------------------------------------------------

def unfused(hidden, weight, bias, targets, weights, kd=None, *, labels=None, ce_alpha=0.0, extra=(),
            teacher_weights=None):
    logits = F.linear(hidden, weight, bias)                                # (B, T, V)
    kd_loss = teacher_loss(logits, targets, weights, kd)
    if extra:
        each = [kd_loss] + [teacher_loss(logits, t, w, kd) for t, w in extra]
        kd_loss = losses.combine_teacher_losses(each, teacher_weights or [1.0] * len(each))
    loss = kd_loss
    if ce_alpha > 0:
        ce = losses.hard_label_cross_entropy(logits, labels,
                                             chunk_rows=kd.chunk_rows if kd else losses.DEFAULT_CHUNK_ROWS)
        loss = losses.mix_ce_and_kd(ce, kd_loss, ce_alpha)
    return loss


def _check(hidden, weight, bias, targets, weights, kd=None, *, chunk_rows, labels=None, ce_alpha=0.0, extra=(),
           teacher_weights=None):
    params = [x for x in (hidden, weight, bias) if x is not None]
    ref = unfused(hidden, weight, bias, targets, weights, kd, labels=labels, ce_alpha=ce_alpha, extra=extra,
                  teacher_weights=teacher_weights)
    ref_grads = torch.autograd.grad(ref, params)
    got, parts = linear_teacher_loss(hidden, weight, bias, targets, weights, kd, labels=labels, ce_alpha=ce_alpha,
                                     extra_teachers=extra, teacher_weights=teacher_weights, chunk_rows=chunk_rows)
    got_grads = torch.autograd.grad(got, params)
    assert got.dtype == F64 and got.dim() == 0
    assert torch.isfinite(ref) and ref.item() != 0.0
    torch.testing.assert_close(got, ref, **TIGHT)
    for name, a, b in zip(("hidden", "weight", "bias"), got_grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, **TIGHT, msg=lambda m, name=name: f"grad {name}: {m}")
    assert parts["loss"].item() == got.item() and not parts["kd"].requires_grad
    return got, parts


# ---------------------------------------------------------------------------------------------
# Equality with the unfused path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("tail", [TailPolicy.BUCKET, TailPolicy.RENORMALIZE])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_every_divergence_equals_unfused(kind, kw, tail, temperature):
    hidden, weight, bias = _head(1)
    kd = DistillationConfig(kind=kind, tail=tail, temperature=temperature, kind_kwargs=kw, chunk_rows=2)
    _check(hidden, weight, bias, _sparse(2, stored_tail=False, ragged=False), _weights(3), kd, chunk_rows=4)


@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("tail", [TailPolicy.BUCKET, TailPolicy.RENORMALIZE])
def test_ragged_rows_with_stored_tail_and_rows_without_entries(kind, kw, tail):
    hidden, weight, bias = _head(4)
    targets = _sparse(5, stored_tail=True, ragged=True)
    assert bool((targets.ids < 0).all(-1).any())                           # some rows have no entry
    kd = DistillationConfig(kind=kind, tail=tail, temperature=1.5, kind_kwargs=kw)
    _check(hidden, weight, bias, targets, _weights(6), kd, chunk_rows=5)


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 7, 16, 21, 1000])
@pytest.mark.parametrize("ce_alpha", [0.0, 0.3, 1.0])
def test_chunk_size_and_ce_mix(chunk_rows, ce_alpha):
    """Chunks that divide N = 21 rows and chunks that do not, a chunk larger than N; CE mixed in."""
    hidden, weight, bias = _head(7)
    kd = DistillationConfig(kind="reverse_kl", temperature=2.0, ce_alpha=ce_alpha)
    _, parts = _check(hidden, weight, bias, _sparse(8, stored_tail=True, ragged=True), _weights(9), kd,
                        chunk_rows=chunk_rows, labels=_labels(10), ce_alpha=ce_alpha)
    assert ("ce" in parts) == (ce_alpha > 0)


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, None])
@pytest.mark.parametrize("ce_alpha", [0.0, 0.5])
def test_estimated_targets_equal_unfused(chunk_rows, ce_alpha):
    hidden, weight, bias = _head(11)
    targets = _estimated(12)
    for kd in (None, DistillationConfig()):
        _check(hidden, weight, bias, targets, _weights(13), kd, chunk_rows=chunk_rows, labels=_labels(14),
               ce_alpha=ce_alpha)


def test_estimated_targets_refuse_other_divergences_like_the_objective():
    hidden, weight, bias = _head(11)
    with pytest.raises(Exception, match="forward_kl at temperature 1 only"):
        linear_teacher_loss(hidden, weight, bias, _estimated(12), _weights(13), DistillationConfig(kind="reverse_kl"))


def test_several_teachers_and_no_bias_and_flat_rows():
    hidden, weight, _ = _head(15, bias=False)
    first = _sparse(16, stored_tail=False, ragged=False)
    second = _sparse(17, stored_tail=True, ragged=True)
    mask2 = torch.ones(B, T)
    mask2[0] = 0.0                                                         # the second teacher lacks sample 0
    w = _weights(18)
    extra = [(second, w * mask2)]
    kd = DistillationConfig(kind="generalized_jsd", kind_kwargs={"beta": 0.3})
    _, parts = _check(hidden, weight, None, first, w, kd, chunk_rows=6, extra=extra, teacher_weights=[2.0, 1.0],
                        labels=_labels(19), ce_alpha=0.2)
    assert set(parts) == {"kd", "kd_teacher0", "kd_teacher1", "ce", "loss"}
    # (N, H) hidden with (N,) weights and (N, W) targets is the same computation
    flat = SparseTargets(first.ids.reshape(B * T, W), first.logprobs.reshape(B * T, W), None)
    again, _ = linear_teacher_loss(hidden.reshape(B * T, H), weight, None, flat, w.reshape(-1), kd, chunk_rows=5)
    ref = unfused(hidden, weight, None, first, w, kd)
    torch.testing.assert_close(again, ref, **TIGHT)


def test_zero_total_weight_is_zero_with_zero_gradients():
    hidden, weight, bias = _head(20)
    loss, _ = linear_teacher_loss(hidden, weight, bias, _sparse(21, stored_tail=False, ragged=False),
                                  torch.zeros(B, T), chunk_rows=4)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0 and bias.grad.abs().max() == 0


def test_incoming_gradient_scales_and_no_grad_mode_gives_the_value():
    hidden, weight, bias = _head(22)
    targets, w = _sparse(23, stored_tail=False, ragged=True), _weights(24)
    loss, _ = linear_teacher_loss(hidden, weight, bias, targets, w, chunk_rows=4)
    g1 = torch.autograd.grad(loss, [hidden, weight, bias], retain_graph=True)
    g3 = torch.autograd.grad(3.0 * loss, [hidden, weight, bias])
    for a, b in zip(g1, g3):
        torch.testing.assert_close(3.0 * a, b, **TIGHT)
    with torch.no_grad():
        value, _ = linear_teacher_loss(hidden, weight, bias, targets, w, chunk_rows=4)
    assert not value.requires_grad
    torch.testing.assert_close(value, loss.detach(), **TIGHT)


def test_frozen_head_gets_no_gradient_and_hidden_still_matches():
    hidden, weight, bias = _head(25)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    targets, w = _sparse(26, stored_tail=False, ragged=False), _weights(27)
    ref = torch.autograd.grad(unfused(hidden, weight, bias, targets, w), hidden)[0]
    loss, _ = linear_teacher_loss(hidden, weight, bias, targets, w, chunk_rows=4)
    torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0], ref, **TIGHT)


def test_float32_and_bfloat16_inputs():
    """float32: close to the float64 result; bf16 hidden and head: float32 maths, bf16 gradients."""
    hidden, weight, bias = _head(28)
    targets, w = _sparse(29, stored_tail=True, ragged=True), _weights(30)
    ref = unfused(hidden, weight, bias, targets, w)
    h32, w32, b32 = (x.detach().float().requires_grad_(True) for x in (hidden, weight, bias))
    loss32, _ = linear_teacher_loss(h32, w32, b32, targets, w, chunk_rows=4)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    hb, wb, bb = (x.detach().bfloat16().requires_grad_(True) for x in (hidden, weight, bias))
    lossb, _ = linear_teacher_loss(hb, wb, bb, targets, w, chunk_rows=4)
    lossb.backward()
    assert lossb.dtype == torch.float32 and torch.isfinite(lossb)
    assert hb.grad.dtype == wb.grad.dtype == bb.grad.dtype == torch.bfloat16
    assert torch.isfinite(hb.grad).all() and torch.isfinite(wb.grad).all()


def test_argument_errors():
    hidden, weight, bias = _head(31)
    targets, w = _sparse(32, stored_tail=False, ragged=False), _weights(33)
    with pytest.raises(ValueError, match="lm_head_weight"):
        linear_teacher_loss(hidden, weight[:, :3], bias, targets, w)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_teacher_loss(hidden, weight, bias, targets, w, chunk_rows=0)
    with pytest.raises(ValueError, match="labels"):
        linear_teacher_loss(hidden, weight, bias, targets, w, ce_alpha=0.5)
    bad = w.clone()
    bad[1, 0] = -1.0                                                       # on a row the loop would skip
    with pytest.raises(ValueError, match="finite and >= 0"):
        linear_teacher_loss(hidden, weight, bias, targets, bad)
    with pytest.raises(TypeError, match="SparseTargets or EstimatedTargets"):
        linear_teacher_loss(hidden, weight, bias, {"ids": targets.ids}, w)


# ---------------------------------------------------------------------------------------------
# No (N, V) tensor, forward or backward
# ---------------------------------------------------------------------------------------------

class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("ce_alpha", [0.0, 0.4])
def test_no_tensor_of_n_by_v_elements_forward_or_backward(ce_alpha):
    n_b, n_t, chunk = 4, 16, 8                                             # N = 64 rows, V = 40, H = 5
    g = torch.Generator().manual_seed(34)
    hidden = torch.randn(n_b, n_t, H, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=F64, requires_grad=True)
    lp, ids = torch.log_softmax(torch.randn(n_b, n_t, V, generator=g, dtype=F64), -1).topk(W, -1)
    targets, w = SparseTargets(ids, lp), torch.ones(n_b, n_t)
    labels = torch.randint(0, V, (n_b, n_t), generator=g)
    kd = DistillationConfig(chunk_rows=4)
    # one chunk of logits, or a per-row teacher / hidden tensor, or the head: all far below N * V
    bound = max(chunk * V, n_b * n_t * max(W, H), V * H)
    assert bound < n_b * n_t * V
    with _LargestTensor() as seen:
        loss, _ = linear_teacher_loss(hidden, weight, None, targets, w, kd, labels=labels, ce_alpha=ce_alpha,
                                      chunk_rows=chunk)
        loss.backward()
    assert 0 < seen.largest <= bound
    with _LargestTensor() as seen_ref:                                     # the unfused path trips it
        unfused(hidden, weight, None, targets, w, kd, labels=labels, ce_alpha=ce_alpha).backward()
    assert seen_ref.largest >= n_b * n_t * V


def test_loss_functions_only_ever_see_one_chunk_of_rows(monkeypatch):
    seen = []

    def spy(fn):
        def wrapped(logits, *args, **kwargs):
            seen.append(logits.shape[0])
            assert logits.dim() == 2 and logits.shape[0] <= 4
            return fn(logits, *args, **kwargs)
        return wrapped

    for module, name in ((losses, "distillation_loss"), (sampled_kd, "estimated_forward_kl"),
                         (losses, "hard_label_cross_entropy")):
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    hidden, weight, bias = _head(35)
    for targets in (_sparse(36, stored_tail=False, ragged=True), _estimated(37)):
        loss, _ = linear_teacher_loss(hidden, weight, bias, targets, _weights(38), labels=_labels(39), ce_alpha=0.5,
                                      chunk_rows=4)
        loss.backward()
    assert seen and max(seen) == 4


def test_masked_rows_are_skipped_not_computed(monkeypatch):
    """Rows with zero weight and no CE label never reach the head: the chunks hold only the others."""
    rows = []
    real = linear_loss._chunk_kd

    def spy(logits, teacher, idx, kd):
        rows.extend(idx.tolist())
        return real(logits, teacher, idx, kd)

    monkeypatch.setattr(linear_loss, "_chunk_kd", spy)
    hidden, weight, bias = _head(40)
    w = torch.zeros(B, T)
    w[1, 2:5] = 1.0
    linear_teacher_loss(hidden, weight, bias, _sparse(41, stored_tail=False, ragged=False), w, chunk_rows=2)
    assert rows == [1 * T + 2, 1 * T + 3, 1 * T + 4]


def test_default_chunk_rows():
    assert default_chunk_rows(49152) == 682 and default_chunk_rows(128256) == 261 and default_chunk_rows(1 << 30) == 1


# ---------------------------------------------------------------------------------------------
# supports_fused_head, and a real model end to end
# ---------------------------------------------------------------------------------------------

def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(F64)


def test_supports_fused_head_on_llama_and_refuses_softcapping_and_wrapped_heads():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = _tiny_llama(tie=False)
    probe = torch.randint(0, V, (1, 6))
    assert supports_fused_head(model) == (True, "")
    assert supports_fused_head(model, probe_input_ids=probe) == (True, "")
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    ok, why = supports_fused_head(gemma)
    assert not ok and "final_logit_softcapping" in why
    # with the cap switched off the model is a plain head again, and the probe agrees
    gemma.config.final_logit_softcapping = None
    assert supports_fused_head(gemma, probe_input_ids=probe)[0]

    class ScaledHead(nn.Linear):
        pass

    model.lm_head = ScaledHead(16, V, bias=False)
    ok, why = supports_fused_head(model)
    assert not ok and "ScaledHead" in why


def test_probe_catches_a_transform_the_config_does_not_name():
    model = _tiny_llama(tie=False)
    inner = model.forward

    def scaled(*args, **kwargs):
        out = inner(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    assert supports_fused_head(model)[0]                                   # invisible from the config
    ok, why = supports_fused_head(model, probe_input_ids=torch.randint(0, V, (1, 6)))
    assert not ok and "probe" in why


@pytest.mark.parametrize("tie", [False, True])
def test_llama_end_to_end_parameter_gradients_equal_the_unfused_model(tie):
    """The caller's integration: hidden states from the decoder, the fused loss on the head; every model
    parameter (tied embeddings included) gets the gradient of the usual logits path."""
    model = _tiny_llama(tie)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(42))
    targets, w, labels = _sparse(43, stored_tail=True, ragged=True), _weights(44), _labels(45)
    kd = DistillationConfig(kind="skew_forward_kl", kind_kwargs={"alpha": 0.1})
    params = [p for p in model.parameters()]

    logits = model(input_ids=ids, use_cache=False).logits
    ref = losses.mix_ce_and_kd(losses.hard_label_cross_entropy(logits, labels), teacher_loss(logits, targets, w, kd),
                               0.25)
    ref_grads = torch.autograd.grad(ref, params)

    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state       # (B, T, H)
    head = model.get_output_embeddings()
    got, _ = linear_teacher_loss(hidden, head.weight, head.bias, targets, w, kd, labels=labels, ce_alpha=0.25,
                                 chunk_rows=5)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, ref, **TIGHT)
    for p, a, b in zip(params, got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert math.isfinite(got.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (no GPU here): bf16 products on tensor cores")
def test_cuda_bf16_fused_matches_the_autocast_unfused_path():
    """On CUDA a bf16 head runs its products in bf16 (as autocast's LM head does): the fused loss and
    gradients stay within bf16 rounding of the unfused path under autocast."""
    hidden, weight, bias = _head(31)
    targets, w = _sparse(32, stored_tail=True, ragged=True), _weights(33)
    dev = torch.device("cuda")
    targets = targets.to(dev)
    hb, wb, bb = (x.detach().to(dev, torch.bfloat16).requires_grad_(True) for x in (hidden, weight, bias))
    loss, _ = linear_teacher_loss(hb, wb, bb, targets, w.to(dev), chunk_rows=5)
    loss.backward()
    grads = [x.grad.float().clone() for x in (hb, wb, bb)]
    for x in (hb, wb, bb):
        x.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = unfused(hb, wb, bb, targets, w.to(dev))
    ref.backward()
    torch.testing.assert_close(loss.float(), ref.float(), rtol=2e-2, atol=2e-3)
    for g, x in zip(grads, (hb, wb, bb)):
        scale = x.grad.float().abs().max()
        assert (g - x.grad.float()).abs().max() <= 3e-2 * scale + 1e-6
