"""The attention-transfer loss against a dense, loop-by-loop float64 computation (value and gradient),
with grouped keys, other head counts (relations), padding and documents packed in one row."""

import math

import pytest
import torch

from student_train.attention_loss import attention_transfer_loss, rebuild_attention

F64 = torch.float64


def direct(sq, sk, tq, tk, valid, R, segments=None):
    """Loop over batch rows, relations and query rows: softmax over allowed keys, KL(teacher || student)."""
    def rel(q, k):
        b, t, h, d = q.shape
        k = k.repeat_interleave(h // k.shape[2], 2)
        w = h * d // R
        return q.reshape(b, t, R, w), k.reshape(b, t, R, w)

    sq, sk = rel(sq, sk)
    tq, tk = rel(tq, tk)
    total, rows = 0.0, 0
    for b in range(sq.shape[0]):
        for i in range(sq.shape[1]):
            if not valid[b, i]:
                continue
            rows += 1
            keys = [j for j in range(i + 1) if valid[b, j] and (segments is None or segments[b, j] == segments[b, i])]
            for r in range(R):
                d = sq.shape[-1]
                s_scores = torch.stack([sq[b, i, r] @ sk[b, j, r] for j in keys]) / math.sqrt(d)
                t_scores = torch.stack([tq[b, i, r] @ tk[b, j, r] for j in keys]) / math.sqrt(d)
                lt, ls = torch.log_softmax(t_scores, 0), torch.log_softmax(s_scores, 0)
                total = total + (lt.exp() * (lt - ls)).sum()
    return total / (rows * R)


@pytest.mark.parametrize("student_heads, student_kv, R, packed", [(4, 2, 4, False), (2, 1, 2, False), (4, 4, 2, True)])
def test_value_and_gradient_equal_a_direct_computation(student_heads, student_kv, R, packed):
    g = torch.Generator().manual_seed(student_heads * 10 + R)
    B, T, dh = 2, 7, 4
    tq, tk = torch.randn(B, T, 4, dh, generator=g, dtype=F64), torch.randn(B, T, 2, dh, generator=g, dtype=F64)
    sdh = 4 * dh // student_heads                          # the same width per token, other head counts
    sq = torch.randn(B, T, student_heads, sdh, generator=g, dtype=F64, requires_grad=True)
    sk = torch.randn(B, T, student_kv, sdh, generator=g, dtype=F64, requires_grad=True)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 5:] = False                                   # padding
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2]]) if packed else None
    got = attention_transfer_loss(sq, sk, tq, tk, valid, R, segments, block_rows=3)
    want = direct(sq, sk, tq, tk, valid, R, segments)
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-14)
    g_got = torch.autograd.grad(got, (sq, sk))
    g_want = torch.autograd.grad(want, (sq, sk))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # padded rows and keys take no part: changing the student there changes nothing
    bumped = sq.detach().clone()
    bumped[1, 5:] += 100
    assert attention_transfer_loss(bumped, sk.detach(), tq, tk, valid, R, segments).item() == pytest.approx(got.item(),
                                                                                                            rel=1e-12)


def test_the_student_with_the_teachers_attention_has_zero_loss_and_a_mismatch_is_positive():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 4, 8, generator=g), torch.randn(1, 6, 2, 8, generator=g)
    valid = torch.ones(1, 6, dtype=torch.bool)
    assert attention_transfer_loss(q, k, q, k, valid, 4).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_transfer_loss(q, k.flip(1), q, k, valid, 4).item() > 1e-3


def test_rebuild_attention_is_causal_softmax_per_head_with_shared_keys():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 4, 3, generator=g, dtype=F64), torch.randn(5, 2, 3, generator=g, dtype=F64)
    a = rebuild_attention(q, k)
    assert a.shape == (4, 5, 5)
    for h in range(4):
        for i in range(5):
            s = torch.stack([q[i, h] @ k[j, h // 2] for j in range(i + 1)]) / math.sqrt(3)
            torch.testing.assert_close(a[h, i, :i + 1], torch.softmax(s, 0))
            assert (a[h, i, i + 1:] == 0).all()
