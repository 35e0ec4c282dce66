"""The on-policy policy-gradient loss against a direct float64 computation written token by token here
(value and gradient), and against the reverse KL it estimates (exact expectation over every token)."""

import pytest
import torch

from student_train.losses import IGNORE_INDEX
from student_train.policy import check_pg_args, discounted_returns, policy_gradient_loss

F64 = torch.float64


def direct(logits, labels, p_t, b_t, w, docs, discount, clip, baseline=True):
    """The loss, one token at a time, as docs/training.md defines it."""
    B, T, _ = logits.shape
    logq = torch.log_softmax(logits, -1)
    on = [(b, t) for b in range(B) for t in range(T) if w[b, t] > 0 and labels[b, t] != IGNORE_INDEX]
    G = {}
    for b, t in on:
        G[b, t] = sum(discount ** (s - t) * float(p_t[b, s] - b_t[b, s]) for s in range(t, T)
                      if (b, s) in dict.fromkeys(on) and docs[b, s] == docs[b, t])
    mean = sum(float(w[k]) * G[k] for k in on) / sum(float(w[k]) for k in on) if baseline else 0.0
    num, den = 0.0, 0.0
    for b in range(B):
        for t in range(T):
            if (b, t) not in G:
                continue
            g = G[b, t] - mean
            r = torch.exp(logq[b, t, labels[b, t]] - b_t[b, t])
            num = num + w[b, t] * torch.minimum(r * g, r.clamp(1 - clip, 1 + clip) * g)
            den += float(w[b, t])
    return -num / den


def case(seed=0, B=2, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = IGNORE_INDEX
    p_t = -torch.rand(B, T, generator=g, dtype=F64) * 5
    b_t = torch.log_softmax(logits + torch.randn(B, T, V, generator=g, dtype=F64) * 0.3, -1).gather(
        -1, labels.clamp_min(0)[..., None])[..., 0]                     # the student moved a little since
    w = (torch.rand(B, T, generator=g, dtype=F64) + 0.5) * (labels != IGNORE_INDEX)
    w[1, 2] = 0.0
    docs = torch.tensor([[1, 1, 1, 2, 2, 2, 2], [3, 3, 3, 3, 4, 4, 0]])
    return logits, labels, p_t, b_t, w, docs


@pytest.mark.parametrize("baseline", [True, False])
@pytest.mark.parametrize("discount", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [0.2, 0.05, 10.0])
def test_value_and_gradient_equal_a_direct_computation(discount, clip, baseline):
    logits, labels, p_t, b_t, w, docs = case()
    z1 = logits.clone().requires_grad_()
    mine, stats = policy_gradient_loss(z1, labels, p_t, b_t, w, docs, discount=discount, clip=clip, baseline=baseline,
                                       chunk_rows=3)
    mine.backward()
    z2 = logits.clone().requires_grad_()
    want = direct(z2, labels, p_t, b_t, w, docs, discount, clip, baseline)
    want.backward()
    assert abs(float(want.detach())) > 1e-3
    torch.testing.assert_close(mine, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-8, atol=1e-11)
    on = (w > 0) & (labels != IGNORE_INDEX)
    adv = ((p_t - b_t) * w * on).sum() / (w * on).sum()
    torch.testing.assert_close(stats["pg_advantage"], adv)
    torch.testing.assert_close(stats["reverse_kl_estimate"], -adv)
    assert z1.grad[1, 2].abs().max() == 0 and z1.grad[0, 0].abs().max() == 0    # weight 0, ignored label


def test_its_expected_gradient_is_the_reverse_kl_gradient():
    """At r = 1 (the student that sampled is the one trained) and discount 0, the expectation over the
    sampled token x ~ q of the loss's gradient is the gradient of KL(q || p) itself."""
    V = 6
    g = torch.Generator().manual_seed(1)
    z = torch.randn(V, generator=g, dtype=F64)
    logp = torch.log_softmax(torch.randn(V, generator=g, dtype=F64) * 2, -1)
    q = torch.softmax(z, -1)
    expected = torch.zeros(V, dtype=F64)
    for x in range(V):                                   # every outcome, weighted by its probability
        zz = z.clone().requires_grad_()
        behaviour = torch.log_softmax(z, -1)[x].reshape(1, 1)
        loss, _ = policy_gradient_loss(zz.reshape(1, 1, V), torch.tensor([[x]]), logp[x].reshape(1, 1), behaviour,
                                       torch.ones(1, 1, dtype=F64), torch.ones(1, 1, dtype=torch.long),
                                       baseline=False)
        loss.backward()
        expected += q[x] * zz.grad
    zz = z.clone().requires_grad_()
    logq = torch.log_softmax(zz, -1)
    (logq.exp() * (logq - logp)).sum().backward()
    torch.testing.assert_close(expected, zz.grad, rtol=1e-10, atol=1e-12)


def test_discounted_returns_stay_inside_a_document():
    a = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=F64)
    docs = torch.tensor([[1, 1, 2, 2]])
    g = discounted_returns(a, docs, 0.5)
    torch.testing.assert_close(g, torch.tensor([[2.0, 2.0, 8.0, 8.0]], dtype=F64))
    assert discounted_returns(a, docs, 0.0) is a


def test_a_constant_baseline_leaves_the_expected_gradient_unchanged():
    """Subtracting the same b from every sample's advantage changes no expectation: E_q[grad log q] = 0."""
    V = 5
    g = torch.Generator().manual_seed(2)
    z = torch.randn(V, generator=g, dtype=F64)
    logp = torch.log_softmax(torch.randn(V, generator=g, dtype=F64), -1)
    q = torch.softmax(z, -1)
    grads = []
    for shift in (0.0, 3.0):
        total = torch.zeros(V, dtype=F64)
        for x in range(V):
            zz = z.clone().requires_grad_()
            loss, _ = policy_gradient_loss(zz.reshape(1, 1, V), torch.tensor([[x]]), (logp[x] - shift).reshape(1, 1),
                                           torch.log_softmax(z, -1)[x].reshape(1, 1), torch.ones(1, 1, dtype=F64),
                                           torch.ones(1, 1, dtype=torch.long), baseline=False)
            loss.backward()
            total += q[x] * zz.grad
        grads.append(total)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_arguments_are_checked_by_name():
    assert check_pg_args({}) == (0.0, 0.2, True)
    assert check_pg_args({"baseline": 0})[2] is False
    with pytest.raises(ValueError, match="baseline must be 0"):
        check_pg_args({"baseline": 0.5})
    with pytest.raises(ValueError, match="discount must be in"):
        check_pg_args({"discount": 1.5})
    with pytest.raises(ValueError, match="clip must be > 0"):
        check_pg_args({"clip": 0})
    with pytest.raises(ValueError, match="no argument beta"):
        check_pg_args({"beta": 0.5})
