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


# ---- keyed draws ----------------------------------------------------------------------------------
def _mix64_numpy(x):
    import numpy as np

    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def test_keyed_uniforms_are_splitmix64_bits_of_key_position_and_draw():
    import numpy as np

    from logitcache.teacher.distribution import keyed_uniforms, row_keys

    draw_keys = torch.tensor([0, 1, 2 ** 62 + 12345, 987654321], dtype=torch.int64)
    positions = torch.tensor([0, 5, 7, 4095], dtype=torch.int64)
    keys = row_keys(draw_keys, positions)
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        want_keys = _mix64_numpy(draw_keys.numpy().astype(np.uint64) ^ _mix64_numpy(positions.numpy().astype(np.uint64) + golden))
        assert keys.numpy().view(np.uint64).tolist() == want_keys.tolist()
        j = np.arange(1, 4, dtype=np.uint64)
        bits = _mix64_numpy(want_keys[:, None] + j[None, :] * golden) >> np.uint64(11)
    assert keyed_uniforms(keys, 3).numpy().tolist() == (bits.astype(np.float64) * 2.0 ** -53).tolist()


def test_keyed_draws_follow_the_weights_and_never_draw_a_zero_weight():
    from logitcache.teacher.distribution import keyed_draws, row_keys

    w = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0]] * 4000)
    keys = row_keys(torch.full((4000,), 7), torch.arange(4000))
    ids = keyed_draws(w * 3.0, keys, 5)                       # unnormalised weights: same distribution
    counts = torch.bincount(ids.flatten(), minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0
    expected = 20000 * w[0].double()
    live = expected > 0
    chi2 = (((counts - expected)[live]) ** 2 / expected[live]).sum().item()
    assert chi2 < 13.8                                        # chi-square, 2 d.o.f., p = 0.001
    # a row's draws depend on its key alone: the same rows in another order, or alone, draw the same ids
    perm = torch.randperm(4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keyed_draws(w[perm], keys[perm], 5), ids[perm])
    assert torch.equal(keyed_draws(w[:1], keys[:1], 5), ids[:1])
    assert keyed_draws(torch.zeros(1, 6), keys[:1], 3).tolist() == [[0, 0, 0]]   # no mass: id 0 (never counted)
