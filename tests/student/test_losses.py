"""Tests for student_train.losses.

The reference for every divergence is a dense float64 computation over the full vocabulary, written
here independently of the library (probability space, softmax over V, 1 - sum for the tail, powers
for temperature), and compared in value and in gradient w.r.t. the student logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from student_train.losses import (
    DIVERGENCES, DistillationConfig, HiddenStateProjector, TailPolicy, coarsen_distributions,
    combine_teacher_losses, dense_distillation_loss, distillation_loss, entropy_token_weights, forward_kl, hard_label_cross_entropy,
    hidden_state_loss, mix_ce_and_kd, reverse_kl,
)

F64 = torch.float64
FLOOR = 1e-8  # reverse-KL teacher floor (the library default), applied to the dense reference too

KINDS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.3}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.2}),
    ("total_variation", {}),
]
KIND_IDS = [k + "".join(f"-{a}{v}" for a, v in kw.items()) for k, kw in KINDS]


# ---------------------------------------------------------------------------------------------
# Dense float64 reference
# ---------------------------------------------------------------------------------------------

def _kl(a, b):
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def dense_divergence(kind, p, q, **kw):
    """Divergence between probability vectors p (teacher) and q (student), (N, K) -> (N,)."""
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p.clamp_min(FLOOR))
    if kind == "skew_forward_kl":
        a = kw["alpha"]
        return _kl(p, a * p + (1 - a) * q)
    if kind == "skew_reverse_kl":
        a = kw["alpha"]
        return _kl(q, (1 - a) * p + a * q)
    if kind == "generalized_jsd":
        b = kw["beta"]
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if kind == "total_variation":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def dense_coarse(z, ids, lp, tail, temperature=1.0):
    """Teacher and student distributions over the compared outcomes, from the full-vocab softmax."""
    z, lp = z.to(F64), lp.to(F64)
    n, v = z.shape
    p_top = lp.exp()                                                     # (N, k)
    if tail == "bucket":
        q_full = torch.softmax(z, -1)                                    # (N, V)
        outside = torch.ones(n, v, dtype=torch.bool).scatter(1, ids, False)
        q = torch.cat([q_full.gather(1, ids), (q_full * outside).sum(-1, keepdim=True)], -1)
        m = (1 - p_top.sum(-1, keepdim=True)).clamp_min(0)
        m = torch.where(outside.any(-1, keepdim=True), m, torch.zeros_like(m))  # k = V: no tail outcome
        p = torch.cat([p_top, m], -1)
        p = p / p.sum(-1, keepdim=True)
        p, q = p ** (1 / temperature), q ** (1 / temperature)           # the tail is one pseudo-token
        return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    p = p_top ** (1 / temperature)
    q = torch.softmax(z / temperature, -1).gather(1, ids)
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def dense_loss(z, ids, lp, w, kind, tail, temperature=1.0, **kw):
    p, q = dense_coarse(z, ids, lp, tail, temperature)
    d = dense_divergence(kind, p, q, **kw) * temperature ** 2
    w = w.to(F64)
    return (w * d).sum() / w.sum()


def make_case(n=7, v=13, k=4, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=F64) * scale, -1)
    lp, ids = teacher.topk(k, -1)                                        # sorted descending
    z = torch.randn(n, v, generator=g, dtype=F64) * scale
    w = torch.rand(n, generator=g, dtype=F64) + 0.5
    w[1] = 0.0                                                           # one masked row
    return z, ids, lp, w


def grad_of(fn, z):
    z = z.detach().clone().requires_grad_()
    loss = fn(z)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


# ---------------------------------------------------------------------------------------------
# Exactness against the dense reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_matches_dense_reference_value_and_grad(kind, kw, tail, temperature):
    z, ids, lp, w = make_case()
    mine, g_mine = grad_of(lambda x: distillation_loss(x, ids, lp, w, kind=kind, tail=tail,
                                                       temperature=temperature, chunk_rows=3, **kw), z)
    ref, g_ref = grad_of(lambda x: dense_loss(x, ids, lp, w, kind, tail, temperature, **kw), z)
    assert mine.dtype == F64
    assert float(ref) > 1e-4  # a non-trivial comparison
    torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_mine, g_ref, rtol=1e-8, atol=1e-11)
    assert g_mine[1].abs().max() == 0  # the masked row gets no gradient


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_dense_targets_match_a_full_vocabulary_computation(kind, kw, temperature):
    """``--full-targets``: every value of p, no bucket; the reference softmaxes p and q over all V ids."""
    z, _, _, w = make_case()
    g = torch.Generator().manual_seed(5)
    lp = torch.log_softmax(torch.randn(z.shape, generator=g, dtype=F64) * 2, -1)
    lp_rounded = lp + 1e-3                        # stored values are rounded: the loss renormalises

    def ref(x):
        p = torch.softmax(lp / temperature, -1)
        q = torch.softmax(x / temperature, -1)
        d = dense_divergence(kind, p, q, **kw) * temperature ** 2
        return (w * d).sum() / w.sum()

    mine, g_mine = grad_of(lambda x: dense_distillation_loss(x, lp_rounded, w, kind=kind, temperature=temperature,
                                                             chunk_rows=3, **kw), z)
    want, g_want = grad_of(ref, z)
    assert float(want) > 1e-4
    torch.testing.assert_close(mine, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_mine, g_want, rtol=1e-8, atol=1e-11)
    assert g_mine[1].abs().max() == 0
    (B, T, V), zz = (1, z.shape[0], z.shape[1]), z.reshape(1, *z.shape)
    torch.testing.assert_close(dense_distillation_loss(zz, lp.reshape(B, T, V), w.reshape(B, T), kind=kind,
                                                       temperature=temperature, chunk_rows=None, **kw),
                               dense_distillation_loss(z, lp, w, kind=kind, temperature=temperature, **kw))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind,kw", KINDS[:6], ids=KIND_IDS[:6])
def test_fp32_logits_fp16_cache_close_to_dense(kind, kw, tail):
    z, ids, lp, w = make_case(n=5, v=50, k=8, seed=1)
    lp16 = lp.half()
    z32 = z.float()
    mine, g_mine = grad_of(lambda x: distillation_loss(x, ids, lp16, w.float(), kind=kind, tail=tail, **kw), z32)
    ref, g_ref = grad_of(lambda x: dense_loss(x, ids, lp16, w, kind, tail, **kw), z32.to(F64))
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine.to(F64), ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_mine.to(F64), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_k_equals_v_forward_kl_is_full_vocab_kl(tail):
    g = torch.Generator().manual_seed(3)
    n, v = 6, 9
    t_logp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=F64) * 2, -1)
    lp, ids = t_logp.topk(v, -1)
    z = torch.randn(n, v, generator=g, dtype=F64) * 2

    def full_kl(x):
        q_log = torch.log_softmax(x, -1)
        return (t_logp.exp() * (t_logp - q_log)).sum(-1).mean()

    mine, g_mine = grad_of(lambda x: distillation_loss(x, ids, lp, None, tail=tail, chunk_rows=4), z)
    ref, g_ref = grad_of(full_kl, z)
    torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_mine, g_ref, rtol=1e-8, atol=1e-12)


def test_hand_computed_v4():
    # Student logits all 0: q = (1/4, 1/4, 1/4, 1/4). Teacher top-2 ids (0, 1) with p = (1/2, 1/4), tail 1/4.
    # BUCKET:  p = (1/2, 1/4, 1/4), q = (1/4, 1/4, 1/2)
    #   KL(p||q) = 1/2 ln 2 + 0 + 1/4 ln(1/2) = 1/4 ln 2 ; KL(q||p) = 1/4 ln(1/2) + 0 + 1/2 ln 2 = 1/4 ln 2
    #   TVD = 1/2 (1/4 + 0 + 1/4) = 1/4 ; d KL(p||q)/dz = q_j - p_j on ids, q_j - m q_j / q_tail off them
    #       = (1/4 - 1/2, 1/4 - 1/4, 1/4 - 1/4 * 1/2, same) = (-0.25, 0, 0.125, 0.125)
    # RENORMALIZE: p = (2/3, 1/3), q = (1/2, 1/2): KL = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.0566330122651324
    z = torch.zeros(1, 4, requires_grad=True)
    ids = torch.tensor([[0, 1]])
    lp = torch.tensor([[math.log(0.5), math.log(0.25)]])  # fp32: ln 2 is not exact in fp16
    loss = distillation_loss(z, ids, lp, None)
    loss.backward()
    assert loss.item() == pytest.approx(0.17328679513998632, abs=1e-6)
    torch.testing.assert_close(z.grad, torch.tensor([[-0.25, 0.0, 0.125, 0.125]]), rtol=0, atol=1e-6)
    assert distillation_loss(z, ids, lp, None, kind="reverse_kl").item() == pytest.approx(0.17328679513998632, abs=1e-6)
    assert distillation_loss(z, ids, lp, None, kind="total_variation").item() == pytest.approx(0.25, abs=1e-6)
    assert distillation_loss(z, ids, lp, None, tail=TailPolicy.RENORMALIZE).item() == pytest.approx(
        0.0566330122651324, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_chunked_equals_unchunked(dtype, tail):
    z, ids, lp, w = make_case(n=10, v=37, k=5, seed=4)
    z = z.to(dtype)
    ref, g_ref = grad_of(lambda x: distillation_loss(x, ids, lp.half(), w.float(), kind="generalized_jsd",
                                                     tail=tail, chunk_rows=None), z)
    for chunk in (1, 3, 4, 7, 10, 64):
        val, g = grad_of(lambda x: distillation_loss(x, ids, lp.half(), w.float(), kind="generalized_jsd",
                                                     tail=tail, chunk_rows=chunk), z)
        assert g.dtype == dtype
        torch.testing.assert_close(val, ref, rtol=1e-6, atol=1e-7, msg=f"chunk_rows={chunk}")
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=1e-6, atol=1e-7, msg=f"chunk_rows={chunk}")


def test_3d_input_equals_flat_and_bool_mask_equals_weights():
    z, ids, lp, _ = make_case(n=6, v=11, k=3, seed=5)
    mask = torch.tensor([True, False, True, True, False, True])
    flat = distillation_loss(z, ids, lp, mask)
    shaped = distillation_loss(z.view(2, 3, 11), ids.view(2, 3, 3), lp.view(2, 3, 3), mask.view(2, 3))
    weighted = distillation_loss(z, ids, lp, mask.to(F64))
    torch.testing.assert_close(shaped, flat, rtol=1e-12, atol=0)
    torch.testing.assert_close(weighted, flat, rtol=1e-12, atol=0)
    # weight 2 on a row == that row twice
    w2 = torch.tensor([2.0, 1.0], dtype=F64)
    dup = distillation_loss(z[[0, 0, 2]], ids[[0, 0, 2]], lp[[0, 0, 2]], None)
    torch.testing.assert_close(distillation_loss(z[[0, 2]], ids[[0, 2]], lp[[0, 2]], w2), dup, rtol=1e-12, atol=0)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sliced_3d_logits_used_in_place(tail):
    # logits[:, :-1] (next-token shift) is not viewable as 2-D; it must be read in place, not copied
    g = torch.Generator().manual_seed(15)
    full = torch.randn(2, 5, 11, generator=g, dtype=F64, requires_grad=True)
    lp, ids = torch.log_softmax(torch.randn(2, 4, 11, generator=g, dtype=F64), -1).topk(3, -1)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=torch.bool)
    loss = distillation_loss(full[:, :-1], ids, lp, mask, tail=tail, chunk_rows=3, kind="skew_reverse_kl")
    (g_full,) = torch.autograd.grad(loss, full)
    ref, g_ref = grad_of(lambda x: distillation_loss(x, ids.reshape(8, 3), lp.reshape(8, 3), mask.reshape(8),
                                                     tail=tail, kind="skew_reverse_kl"),
                         full[:, :-1].reshape(8, 11))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_full[:, :-1].reshape(8, 11), g_ref, rtol=1e-10, atol=1e-14)
    assert g_full[:, -1].abs().max() == 0


def test_no_full_size_fp32_tensor_saved_for_backward():
    n, v, k = 64, 1000, 8
    z = torch.randn(n, v, requires_grad=True)
    lp, ids = torch.log_softmax(torch.randn(n, v), -1).topk(k, -1)
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() != z.untyped_storage().data_ptr():  # the logits themselves are not a copy
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = distillation_loss(z, ids, lp, None, chunk_rows=16)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # a plain fp32 log_softmax would save n*v*4 = 256000 bytes; we save only O(n*k) per-row data
    assert sum(saved.values()) < n * v * 4 / 10, saved


# ---------------------------------------------------------------------------------------------
# Numerical stability (item 6)
# ---------------------------------------------------------------------------------------------

def _assert_finite_and_dense(z, ids, lp, kind, kw, tail, compare=True):
    val, g = grad_of(lambda x: distillation_loss(x, ids, lp, None, kind=kind, tail=tail, **kw), z)
    assert torch.isfinite(val), val
    assert torch.isfinite(g.float()).all(), g
    if compare:
        ref = dense_loss(z.to(F64), ids, lp, torch.ones(z.shape[0], dtype=F64), kind, tail, **kw)
        assert torch.isfinite(ref)
        torch.testing.assert_close(val.to(F64), ref, rtol=1e-4, atol=1e-5)
    return val, g


def _tail_zero_case(dtype):
    """Teacher tail m = 0 (a one-hot row; rows whose fp16 values sum to >= 1) and a student whose mass
    outside the ids is e^-200 relative: 1 - sum(q_topk) is 0 or +-1 ulp in fp32, so log(1 - sum) would be
    log 0 or log of a negative number there (the float64 reference keeps it positive)."""
    lp = torch.tensor([[0.0, -math.inf, -math.inf],
                       [math.log(0.5) + 2e-3, math.log(0.25) + 2e-3, math.log(0.25) + 2e-3],
                       [math.log(0.6) + 2e-3, math.log(0.3) + 2e-3, math.log(0.1) + 2e-3]]).half()
    ids = torch.tensor([[2, 5, 0], [1, 0, 7], [6, 3, 4]])
    z = torch.full((3, 8), -200.0)
    z.scatter_(1, ids, torch.randn(3, 3, generator=torch.Generator().manual_seed(0)) * 3)
    z = z.to(dtype)
    assert (1 - lp.double().exp().sum(-1)).clamp_min(0).abs().max() == 0
    assert (1 - torch.softmax(z.float(), -1).gather(1, ids).sum(-1)).abs().max() <= 2 ** -23  # rounding only
    return z, ids, lp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_tail_bucket_zero_mass_grads_finite_distillkit_issue45(kind, kw, dtype):
    # DistillKit issue 45: log(0) in the tail bucket gave NaN gradients when the top-k held all the mass
    z, ids, lp = _tail_zero_case(dtype)
    _assert_finite_and_dense(z, ids, lp, kind, kw, "bucket")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_negative_tail_from_fp16_rounding(kind, kw, dtype):
    # log-probs rounded up in fp16 so that sum(exp) > 1: m = 1 - sum < 0 must be clamped, not logged
    lp = (torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]] * 2) + 2e-3).half()
    assert float(1 - lp.double().exp().sum(-1).min()) < 0
    ids = torch.tensor([[0, 1, 2], [3, 2, 1]])
    z = (torch.randn(2, 6, generator=torch.Generator().manual_seed(1))).to(dtype)
    _assert_finite_and_dense(z, ids, lp, kind, kw, "bucket")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_topk_covers_whole_vocab_fp16(kind, kw, dtype):
    # k = V with fp16 values: the stored tail (1 - sum) is rounding noise while the student's tail is empty
    g = torch.Generator().manual_seed(2)
    lp, ids = torch.log_softmax(torch.randn(4, 6, generator=g) * 2, -1).topk(6, -1)
    lp = lp.half()
    z = (torch.randn(4, 6, generator=g) * 2).to(dtype)
    for tail in ("bucket", "renormalize"):
        _assert_finite_and_dense(z, ids, lp, kind, kw, tail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_student_probabilities_underflow(kind, kw, dtype):
    # softmax(z) at the teacher's ids is ~e^-300: 0 in fp32/bf16 (not in the float64 reference)
    z = torch.zeros(2, 8)
    z[:, 7] = 300.0
    z = z.to(dtype)
    lp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0, 0, 0, 0, -5.0]] * 2), -1).topk(3, -1)
    ids, lp = lp.indices, lp.values.half()
    for tail in ("bucket", "renormalize"):
        _assert_finite_and_dense(z, ids, lp, kind, kw, tail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_teacher_logprobs_with_minus_inf(kind, kw, dtype):
    # the teacher had fewer than k tokens with nonzero probability: trailing -inf log-probs
    lp = torch.tensor([[math.log(0.7), math.log(0.2), -math.inf, -math.inf],
                       [math.log(0.9), -math.inf, -math.inf, -math.inf]]).half()
    ids = torch.tensor([[0, 1, 2, 3], [4, 0, 1, 2]])
    z = torch.randn(2, 7, generator=torch.Generator().manual_seed(3)).to(dtype)
    for tail in ("bucket", "renormalize"):
        _assert_finite_and_dense(z, ids, lp, kind, kw, tail)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_masked_rows_with_garbage_do_not_leak(kind, kw, tail):
    z, ids, lp, _ = make_case(n=5, v=9, k=3, seed=6)
    z, lp = z.float(), lp.half()
    mask = torch.tensor([True, False, True, False, True])
    ids_bad, lp_bad, z_bad = ids.clone(), lp.clone(), z.clone()
    ids_bad[1] = torch.tensor([-1, 99, 99])         # out of range and repeated
    lp_bad[1] = float("nan")
    lp_bad[3] = torch.tensor([0.0, 0.0, float("inf")]).half()
    z_bad[3] = float("nan")
    val, g = grad_of(lambda x: distillation_loss(x, ids_bad, lp_bad, mask, kind=kind, tail=tail, **kw), z_bad)
    ref, g_ref = grad_of(lambda x: distillation_loss(x, ids[mask], lp[mask], None, kind=kind, tail=tail, **kw),
                         z[mask])
    assert torch.isfinite(g).all()
    torch.testing.assert_close(val, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g[mask], g_ref, rtol=1e-6, atol=1e-7)
    assert g[~mask].abs().max() == 0


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_coarsen_masked_rows_are_constants(tail):
    # masked rows are computed on sanitised values, so nothing there depends on the real logits
    z, ids, lp, _ = make_case(n=4, v=9, k=3, seed=16)
    mask = torch.tensor([True, False, True, False])
    x = z.clone().requires_grad_()
    logp, logq = coarsen_distributions(x, ids, lp, mask, tail=tail, chunk_rows=2)
    assert logp.shape == logq.shape == (4, 4 if tail == "bucket" else 3)
    torch.testing.assert_close(logq.exp().sum(-1), torch.ones(4, dtype=F64), rtol=1e-12, atol=0)
    (logq * torch.arange(1.0, logq.shape[1] + 1, dtype=F64)).sum().backward()
    assert x.grad[~mask].abs().max() == 0 and (x.grad[mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_total_weight_gives_zero_with_a_valid_grad(dtype):
    z, ids, lp, _ = make_case(n=4, v=9, k=3, seed=7)
    z = z.to(dtype).requires_grad_()
    loss = distillation_loss(z, ids, lp.half(), torch.zeros(4, dtype=torch.bool), kind="reverse_kl")
    loss.backward()
    assert loss.item() == 0.0
    assert z.grad is not None and z.grad.abs().max().item() == 0.0
    ce = hard_label_cross_entropy(z, torch.full((4,), -100))
    assert ce.item() == 0.0 and ce.requires_grad


def test_log_space_divergences_safe_at_minus_inf():
    # direct calls with -inf on both sides of the same outcome: values finite, gradients not NaN
    logp = torch.log(torch.tensor([[0.6, 0.4, 0.0]], dtype=F64))
    logq = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=F64)).requires_grad_()
    for name, fn in DIVERGENCES.items():
        val = fn(logp, logq)
        (g,) = torch.autograd.grad(val.sum(), logq)
        assert torch.isfinite(val).all() and not g.isnan().any(), name
    assert forward_kl(logp, logq).item() == pytest.approx(0.6 * math.log(1.2) + 0.4 * math.log(0.8), abs=1e-12)
    # reverse KL with a teacher zero where the student has mass: floored, finite, = q log(q / floor)
    logq2 = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=F64))
    expected = 0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / FLOOR)
    assert reverse_kl(logp, logq2).item() == pytest.approx(expected, abs=1e-9)


def test_jsd_end_points_and_skew_zero():
    z, ids, lp, w = make_case(n=4, v=10, k=3, seed=8)
    kw = dict(chunk_rows=2)
    fkl = distillation_loss(z, ids, lp, w, kind="forward_kl", **kw)
    rkl = distillation_loss(z, ids, lp, w, kind="reverse_kl", **kw)
    torch.testing.assert_close(distillation_loss(z, ids, lp, w, kind="generalized_jsd", beta=0.0, **kw), fkl)
    torch.testing.assert_close(distillation_loss(z, ids, lp, w, kind="generalized_jsd", beta=1.0, **kw), rkl)
    torch.testing.assert_close(distillation_loss(z, ids, lp, w, kind="skew_forward_kl", alpha=0.0, **kw), fkl)
    torch.testing.assert_close(distillation_loss(z, ids, lp, w, kind="skew_reverse_kl", alpha=0.0, **kw), rkl)
    # JSD(beta)/beta -> forward KL as beta -> 0 (the limit the end point stands for)
    small = distillation_loss(z, ids, lp, w, kind="generalized_jsd", beta=1e-4, **kw) / 1e-4
    torch.testing.assert_close(small, fkl, rtol=1e-3, atol=0)
    assert distillation_loss(z, ids, lp, w, kind="skew_forward_kl", alpha=1.0, **kw).abs().item() < 1e-12


# ---------------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_temperature_squared_factor_and_t1_exact(tail):
    z, ids, lp, w = make_case(n=5, v=12, k=4, seed=9)
    for t in (0.5, 2.0, 4.0):
        logp, logq = coarsen_distributions(z, ids, lp, w, tail=tail, temperature=t)
        d = forward_kl(logp, logq)
        expected = t ** 2 * (w * d).sum() / w.sum()
        torch.testing.assert_close(distillation_loss(z, ids, lp, w, tail=tail, temperature=t), expected,
                                   rtol=1e-12, atol=0)
    # T = 1 equals the plain coarsened KL (no tempering anywhere), from the dense reference
    p, q = dense_coarse(z, ids, lp, tail, 1.0)
    exact = (w * (p * (p / q).log()).sum(-1)).sum() / w.sum()
    torch.testing.assert_close(distillation_loss(z, ids, lp, w, tail=tail, temperature=1.0), exact,
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_bucket_temperature_zero_when_student_matches_teacher(temperature):
    # the tail pseudo-token is tempered identically on both sides: a student equal to the teacher has loss 0
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(4, 20, generator=g, dtype=F64) * 2
    lp, ids = torch.log_softmax(logits, -1).topk(5, -1)
    for kind, kw in KINDS:
        val = distillation_loss(logits, ids, lp, None, kind=kind, temperature=temperature, **kw)
        assert abs(val.item()) < 1e-12, kind


# ---------------------------------------------------------------------------------------------
# Hard labels, entropy weights, hidden states, several teachers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(dtype):
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(2, 5, 17, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 17, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    mine, g_mine = grad_of(lambda x: hard_label_cross_entropy(x, labels, chunk_rows=3), z)
    ref, g_ref = grad_of(lambda x: torch.nn.functional.cross_entropy(
        x.float().reshape(-1, 17), labels.reshape(-1), ignore_index=-100), z)
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_mine.float(), g_ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-6)
    t_lp, t_ids = torch.log_softmax(z.float() * 0.5, -1).topk(4, -1)
    kd = distillation_loss(z, t_ids, t_lp, labels != -100)
    torch.testing.assert_close(mix_ce_and_kd(mine, kd, 0.25), 0.25 * mine + 0.75 * kd)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        mix_ce_and_kd(mine, kd, 1.5)


def test_entropy_token_weights():
    h = torch.tensor([0.1, 2.0, 5.0, float("nan"), 3.0, 0.5, 4.0, 1.0])
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)   # the NaN sits on a masked token
    ew = entropy_token_weights
    assert ew(h, mask).tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    assert ew(h, mask, above=1.5).tolist() == [0, 1, 1, 0, 1, 0, 1, 0]
    assert ew(h, mask, below=1.5).tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    assert ew(h, mask, above=1.0, below=4.5).tolist() == [0, 1, 0, 0, 1, 0, 1, 0]
    # 6 valid tokens: top 1/3 -> 2 highest valid (5.0, 4.0); bottom 0.5 -> 3 lowest (0.1, 0.5, 2.0)
    assert ew(h, mask, top_frac=1 / 3).tolist() == [0, 0, 1, 0, 0, 0, 1, 0]
    assert ew(h, mask, bottom_frac=0.5).tolist() == [1, 1, 0, 0, 0, 1, 0, 0]
    assert ew(h, mask, top_frac=0.01).sum().item() == 1        # ceil: at least one token
    w = ew(h.view(2, 4), mask.view(2, 4), top_frac=1.0)
    assert w.shape == (2, 4) and w.dtype == torch.float32 and w.sum().item() == 6
    with pytest.raises(ValueError, match=r"top_frac must be a number in \(0, 1\], got 1.5"):
        ew(h, mask, top_frac=1.5)
    with pytest.raises(ValueError, match=r"not both: above=1.0, below=None, top_frac=0.2"):
        ew(h, mask, above=1.0, top_frac=0.2)
    with pytest.raises(ValueError, match=r"above=3.0 must be < below=2.0"):
        ew(h, mask, above=3.0, below=2.0)
    with pytest.raises(ValueError, match=r"mask \(a torch.bool tensor of shape \(3,\)\) does not match "
                                         r"entropy shape \(8,\)"):
        ew(h, mask[:3])


def test_hidden_state_losses():
    g = torch.Generator().manual_seed(12)
    s = torch.randn(6, 8, generator=g)
    assert hidden_state_loss(s, s.clone(), kind="cosine").abs().item() < 1e-6
    assert hidden_state_loss(s, -s, kind="cosine").item() == pytest.approx(2.0, abs=1e-6)
    assert hidden_state_loss(s, s + 1, kind="mse").item() == pytest.approx(1.0, abs=1e-6)
    # identity when widths match and no projection is asked for; identity-initialised when it is
    ident = HiddenStateProjector(8, 8)
    assert isinstance(ident.maps[0], torch.nn.Identity) and not list(ident.parameters())
    forced = HiddenStateProjector([8], [8], project=True)
    assert hidden_state_loss(s, s.clone(), kind="mse", projector=forced).item() < 1e-10
    # masked rows with garbage teacher states do not leak
    t_bad = s.clone()
    t_bad[2] = float("nan")
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    x = s.clone().requires_grad_()
    loss = hidden_state_loss(x, t_bad, mask, kind="cosine")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and x.grad[2].abs().max() == 0


def test_hidden_state_mse_with_projection_trains():
    torch.manual_seed(13)
    student = torch.randn(32, 8)
    teacher = student @ torch.randn(8, 16)                     # a linear relation the projector can learn
    proj = HiddenStateProjector([4, 8], [16, 16])             # two layer pairs, both widened
    params = list(proj.parameters())
    losses = []
    for _ in range(30):  # plain SGD written out: building a torch.optim optimizer costs ~2 s of imports here
        loss = hidden_state_loss(student, teacher, None, kind="mse", projector=proj, pair=1)
        grads = torch.autograd.grad(loss, [p for p in params if p.requires_grad], allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= 1.0 * g
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    assert proj.maps[0].weight.grad is None and grads[0] is None  # only the pair in use trains
    with pytest.raises(ValueError, match=r"projected student shape \(32, 8\) does not match teacher_h "
                                         r"shape \(32, 16\)"):
        hidden_state_loss(student, teacher)
    with pytest.raises(ValueError, match=r"kind='l1' is not a hidden-state loss; valid kinds: cosine, mse"):
        hidden_state_loss(student, teacher, kind="l1", projector=proj, pair=1)


def test_combine_teacher_losses():
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(6.0)
    out = combine_teacher_losses([a, b], [1.0, 3.0])
    assert out.item() == pytest.approx(0.25 * 2 + 0.75 * 6)
    out.backward()
    assert a.grad.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="losses has 2 entries but weights has 1"):
        combine_teacher_losses([a, b], [1.0])
    with pytest.raises(ValueError, match=r"weights=\[0.0, 0.0\] sum to 0"):
        combine_teacher_losses([a, b], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"weights\[1\]=-1.0 must be a finite number >= 0"):
        combine_teacher_losses([a, b], [1.0, -1.0])


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------

def test_argument_errors_name_the_argument_and_value():
    z, ids, lp, w = make_case(n=4, v=10, k=3, seed=14)
    with pytest.raises(ValueError, match=r"kind='kl' is not a known divergence; valid kinds: forward_kl, "
                                         r"reverse_kl, skew_forward_kl, skew_reverse_kl, generalized_jsd, "
                                         r"total_variation"):
        distillation_loss(z, ids, lp, w, kind="kl")
    with pytest.raises(ValueError, match=r"teacher_ids shape \(4, 3\) does not match student_logits shape \(3, 10\)"):
        distillation_loss(z[:3], ids, lp[:3], w[:3])
    with pytest.raises(ValueError, match=r"teacher_logprobs shape \(4, 2\) does not match teacher_ids shape \(4, 3\)"):
        distillation_loss(z, ids, lp[:, :2], w)
    with pytest.raises(ValueError, match=r"mask_or_weights shape \(3,\) does not match the token shape \(4,\)"):
        distillation_loss(z, ids, lp, w[:3])
    with pytest.raises(ValueError, match=r"tail='ghost' is not a TailPolicy; valid: bucket, renormalize"):
        distillation_loss(z, ids, lp, w, tail="ghost")
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        distillation_loss(z, ids, lp, w, temperature=0)
    with pytest.raises(ValueError, match=r"chunk_rows must be a positive int or None \(one chunk\), got 0"):
        distillation_loss(z, ids, lp, w, chunk_rows=0)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.2"):
        distillation_loss(z, ids, lp, w, kind="skew_forward_kl", alpha=1.2)
    with pytest.raises(ValueError, match=r"kind='forward_kl' takes no argument beta=0.5; it accepts: no arguments"):
        distillation_loss(z, ids, lp, w, beta=0.5)
    with pytest.raises(ValueError, match=r"need 1 <= k <= V=2"):
        distillation_loss(z[:, :2], ids, lp, w)
    bad = ids.clone()
    bad[0, 0] = 10
    with pytest.raises(ValueError, match=r"teacher_ids has id 10 outside \[0, V=10\)"):
        distillation_loss(z, bad, lp, w)
    bad[0, 0] = bad[0, 1]
    with pytest.raises(ValueError, match="teacher_ids repeats an id within a row"):
        distillation_loss(z, bad, lp, w)
    with pytest.raises(ValueError, match=r"mask_or_weights must be finite and >= 0; got a value -1.0"):
        distillation_loss(z, ids, lp, -torch.ones(4, dtype=F64))
    nan_lp = lp.clone()
    nan_lp[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_logprobs has NaN or \+inf on a row with nonzero weight"):
        distillation_loss(z, ids, nan_lp, w)
    with pytest.raises(ValueError, match=r"labels has 10, outside \[0, V=10\)"):
        hard_label_cross_entropy(z, torch.tensor([1, 2, 10, -100]))
    with pytest.raises(ValueError, match=r"project=False but student width 4 != teacher width 8"):
        HiddenStateProjector(4, 8, project=False)
    with pytest.raises(ValueError, match=r"kind='js' is not a known divergence"):
        DistillationConfig(kind="js")
    cfg = DistillationConfig(kind="generalized_jsd", tail="renormalize", temperature=2.0,
                             kind_kwargs={"beta": 0.3})
    assert cfg.tail is TailPolicy.RENORMALIZE
    torch.testing.assert_close(distillation_loss(z, ids, lp, w, **cfg.kd_kwargs()),
                               distillation_loss(z, ids, lp, w, kind="generalized_jsd", tail="renormalize",
                                                 temperature=2.0, beta=0.3))


# ---- ragged rows (adaptive / compact caches): -1 padding and an exact stored tail -----------------

@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation"])
def test_ragged_rows_with_exact_tail_match_a_dense_computation(kind):
    """Rows with 1..5 stored ids, padded with -1 / -inf to 5, the exact tail given: the loss equals the
    divergence over (stored ids + one tail outcome) computed directly in float64, value and gradient."""
    g = torch.Generator().manual_seed(3)
    n, V, W = 6, 40, 5
    t_logits = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    z = torch.randn(n, V, generator=g, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(t_logits, -1)
    counts = [1, 2, 5, 3, 4, 5]
    order = logp.argsort(-1, descending=True)
    ids = torch.full((n, W), -1, dtype=torch.long)
    lp = torch.full((n, W), float("-inf"), dtype=torch.float64)
    for r, c in enumerate(counts):
        ids[r, :c] = order[r, :c]
        lp[r, :c] = logp[r, order[r, :c]]
    tail = torch.stack([1 - logp[r, order[r, :c]].exp().sum() for r, c in enumerate(counts)])
    got = distillation_loss(z, ids, lp, None, kind=kind, teacher_tail=tail, chunk_rows=4)
    got.backward()
    g_got = z.grad.clone()

    z2 = z.detach().clone().requires_grad_(True)
    q = torch.softmax(z2, -1)
    per = []
    for r, c in enumerate(counts):
        p_c = torch.cat([logp[r, order[r, :c]].exp(), tail[r:r + 1]])
        q_ids = q[r, order[r, :c]]
        q_c = torch.cat([q_ids, 1 - q_ids.sum(0, keepdim=True)])
        if kind == "forward_kl":
            per.append((p_c * (p_c.log() - q_c.log())).sum())
        elif kind == "reverse_kl":
            per.append((q_c * (q_c.log() - p_c.log())).sum())
        elif kind == "generalized_jsd":
            mix = 0.5 * p_c + 0.5 * q_c
            per.append(0.5 * (p_c * (p_c / mix).log()).sum() + 0.5 * (q_c * (q_c / mix).log()).sum())
        else:
            per.append(0.5 * (p_c - q_c).abs().sum())
    want = torch.stack(per).mean()
    want.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g_got, z2.grad, rtol=1e-7, atol=1e-10)


def test_ragged_rows_refuse_padding_before_ids_and_a_bad_tail():
    z = torch.zeros(2, 10)
    ids = torch.tensor([[1, -1, 2], [3, 4, -1]])
    lp = torch.tensor([[-1.0, float("-inf"), -2.0], [-1.0, -2.0, float("-inf")]])
    with pytest.raises(ValueError, match="padding \\(-1\\) must come after a row's stored ids"):
        distillation_loss(z, ids, lp, None)
    ok_ids = torch.tensor([[1, 2, -1], [3, 4, -1]])
    ok_lp = torch.tensor([[-1.0, -2.0, float("-inf")], [-1.0, -2.0, float("-inf")]])
    with pytest.raises(ValueError, match="teacher_tail must be a probability mass"):
        distillation_loss(z, ok_ids, ok_lp, None, teacher_tail=torch.tensor([0.5, 1.5]))


# ---------------------------------------------------------------------------------------------
# Edge cases found by comparing with TRL, DistillKit, torchtune and DistiLLM (issue 12)
# ---------------------------------------------------------------------------------------------
def _with_empty_row(z, ids, lp, w):
    """The same case plus one row without entries (-1 ids, -inf values) that has weight 1."""
    k = ids.shape[1]
    return (torch.cat([z, torch.randn(1, z.shape[1], dtype=z.dtype) * 3]), torch.cat([ids, torch.full((1, k), -1)]),
            torch.cat([lp, torch.full((1, k), float("-inf"), dtype=lp.dtype)]), torch.cat([w, torch.ones(1, dtype=w.dtype)]))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_a_row_without_entries_contributes_nothing_and_does_not_count(kind, kw, tail):
    z, ids, lp, w = make_case()
    want, g_want = grad_of(lambda x: distillation_loss(x, ids, lp, w, kind=kind, tail=tail, **kw), z)
    zp, idp, lpp, wp = _with_empty_row(z, ids, lp, w)
    got, g_got = grad_of(lambda x: distillation_loss(x, idp, lpp, wp, kind=kind, tail=tail, **kw), zp)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got[:-1], g_want, rtol=1e-12, atol=1e-12)
    assert (g_got[-1] == 0).all()
    tail_mass = torch.cat([(-torch.expm1(torch.logsumexp(lp, -1))).clamp_min(0), torch.zeros(1, dtype=F64)])
    if tail == "bucket":                   # the same with an exact tail stored beside the ids
        got_t = distillation_loss(zp, idp, lpp, wp, kind=kind, tail=tail, teacher_tail=tail_mass, **kw)
        torch.testing.assert_close(got_t, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,kw", [("reverse_kl", {}), ("generalized_jsd", {"beta": 0.5}), ("forward_kl", {})])
def test_bucket_keeps_its_precision_at_large_logit_offsets(kind, kw):
    """Logits around 1e4 (float32 spacing 1e-3 there): the log-probs are taken after subtracting the
    row max, so the gradient is as accurate as log_softmax's."""
    z, ids, lp, w = make_case(n=16, v=64, k=8)
    z32 = (z + 1e4).float()
    ref, g_ref = grad_of(lambda x: distillation_loss(x, ids, lp, w, kind=kind, tail="bucket", **kw), z32.double())
    got, g_got = grad_of(lambda x: distillation_loss(x, ids, lp, w, kind=kind, tail="bucket", **kw), z32)
    rel = float((g_got.double() - g_ref).norm() / g_ref.norm())
    assert rel < 1e-5, rel
    assert abs(float(got) - float(ref)) < 1e-5 * max(1.0, abs(float(ref)))


def test_a_student_with_no_mass_outside_the_ids_has_infinite_forward_kl_when_the_teacher_has_some():
    z = torch.tensor([[2.0, 1.0, 0.0] + [float("-inf")] * 5])
    ids = torch.tensor([[0, 1, 2]])
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.1]]))                   # the teacher keeps 0.1 outside
    assert distillation_loss(z, ids, lp, None, kind="forward_kl") == float("inf")
    covering = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])                # the ids cover V: no tail outcome at all
    lp_all = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1, -2, -3, -4, -5]]), -1).half()
    assert torch.isfinite(distillation_loss(torch.randn(1, 8), covering, lp_all, None, kind="forward_kl"))


def test_sampled_estimators_skip_rows_without_draws():
    from student_train import sampled_kd as S

    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 11, generator=g, dtype=F64)
    ids = torch.tensor([[1, 4, -1], [0, 2, 3], [7, -1, -1], [5, 6, 9]])
    counts = torch.tensor([[3, 1, 0], [1, 1, 2], [4, 0, 0], [2, 1, 1]])
    entropy = torch.rand(4, generator=g, dtype=F64) + 0.5
    zp = torch.cat([z, torch.randn(1, 11, generator=g, dtype=F64)])
    idp, cp = torch.cat([ids, torch.full((1, 3), -1)]), torch.cat([counts, torch.zeros(1, 3, dtype=torch.long)])
    hp = torch.cat([entropy, torch.tensor([2.0], dtype=F64)])
    want = S.sampled_forward_kl(z, ids, counts, entropy)
    torch.testing.assert_close(S.sampled_forward_kl(zp, idp, cp, hp), want, rtol=1e-12, atol=1e-12)
    targets = counts.to(F64) / counts.sum(-1, keepdim=True)
    want = S.estimated_forward_kl(z, ids, targets, entropy)
    got = S.estimated_forward_kl(zp, idp, torch.cat([targets, torch.zeros(1, 3, dtype=F64)]), hp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
