import math

import pytest
import torch

from logitcache.teacher.distribution import next_token_stats


def dense_reference(logits, targets, k):
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    ent = -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)
    v, i = logp.topk(k, -1)
    return i, v, ent, logp.gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_chunked_stats_equal_dense_full_vocabulary(chunk_rows):
    torch.manual_seed(0)
    n, d, V, k = 37, 16, 3001, 10
    hidden = torch.randn(n, d)
    head = torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        head.weight.mul_(5)
    targets = torch.randint(0, V, (n,))
    ids, vals, ent, tgt, _ = next_token_stats(hidden, head, targets, k, chunk_rows=chunk_rows)
    r_ids, r_vals, r_ent, r_tgt = dense_reference(head(hidden).detach(), targets, k)
    assert torch.equal(ids, r_ids)
    torch.testing.assert_close(vals.double(), r_vals, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), r_ent, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(tgt.double(), r_tgt, rtol=0, atol=2e-5)


def test_entropy_is_exact_with_masked_vocabulary_entries():
    # Two live tokens with p = 1/4, 3/4 and the rest at -inf: H = -(1/4 ln 1/4 + 3/4 ln 3/4).
    V = 50
    logits = torch.full((1, V), float("-inf"))
    logits[0, 3], logits[0, 7] = 0.0, math.log(3.0)
    ids, vals, ent, tgt, _ = next_token_stats(logits, lambda h: h, torch.tensor([7]), top_k=2)
    assert ids.tolist() == [[7, 3]]
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert ent.item() == pytest.approx(expected, abs=1e-6)
    assert tgt.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert torch.isfinite(ent).all()


def test_uniform_distribution_has_entropy_log_v():
    V = 49152
    _, vals, ent, _, _ = next_token_stats(torch.zeros(3, V), lambda h: h, torch.zeros(3, dtype=torch.long), top_k=4)
    assert ent.tolist() == pytest.approx([math.log(V)] * 3, abs=1e-4)
    assert vals[0, 0].item() == pytest.approx(-math.log(V), abs=1e-5)
