"""Tests for logitcache.format.encodings and student_train.sampled_kd (issue 7).

References are dense float64 computations over the full vocabulary, written here independently of the
library; the estimator test checks unbiasedness against the standard error of the mean over draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logitcache.format import encodings as E
from student_train import sampled_kd as S
from student_train.losses import distillation_loss

V = 300
N = 24


def _logprobs(n=N, v=V, seed=0, scale=3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, v)) * scale
    x[0] *= 4            # a peaked row (small k for adaptive)
    x[1] *= 0.05         # a flat row (hits k_max)
    x = x - x.max(1, keepdims=True)
    return (x - np.log(np.exp(x).sum(1, keepdims=True))).astype(np.float32)


@pytest.fixture(scope="module")
def full():
    return _logprobs()


@pytest.fixture(scope="module")
def cand(full):
    return E.select_topk(full, 128)


def _rows(sparse):
    off = sparse.offsets
    return [(sparse.ids[off[i]:off[i + 1]], sparse.logprobs[off[i]:off[i + 1]]) for i in range(sparse.num_tokens)]


# ---------------------------------------------------------------------------------------------
# Candidates and the baseline
# ---------------------------------------------------------------------------------------------

def test_select_topk_is_the_sorted_top_and_exact_tail(full):
    ids, lp, tail = E.select_topk(full, 40)
    for i in range(N):
        order = np.lexsort((np.arange(V), -full[i]))[:40]
        assert np.array_equal(ids[i], order)
        assert np.array_equal(lp[i], full[i][order])
        rest = np.setdiff1d(np.arange(V), order)
        assert tail[i] == pytest.approx(np.exp(full[i][rest].astype(np.float64)).sum(), rel=1e-6, abs=1e-12)


def test_topk_round_trip_exact(cand):
    ids, lp, tail = cand
    enc = E.encode_topk(ids, lp, tail, vocab_size=V, k=16, store_tail=True)
    assert enc["ids"].dtype == np.uint16 and enc["logprobs"].dtype == np.float16 and enc["tail"].dtype == np.float32
    dec = E.decode_topk(enc)
    assert np.array_equal(dec.ids.reshape(N, 16), ids[:, :16])
    assert np.array_equal(dec.logprobs.reshape(N, 16), lp[:, :16].astype(np.float16).astype(np.float32))
    expect = tail + np.exp(lp[:, 16:].astype(np.float64)).sum(1)
    np.testing.assert_allclose(dec.tail, expect, rtol=1e-6)
    # float32 values: exact to the bit
    dec32 = E.decode_topk(E.encode_topk(ids, lp, tail, vocab_size=V, k=16, value_dtype="float32"))
    assert np.array_equal(dec32.logprobs.reshape(N, 16), lp[:, :16]) and dec32.tail is None


# ---------------------------------------------------------------------------------------------
# Adaptive k
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_p,k_max", [(0.9, 32), (0.99, 128), (0.5, 8), (1.0, 20)])
def test_adaptive_mass_and_round_trip(full, cand, top_p, k_max):
    ids, lp, tail = cand
    enc = E.encode_adaptive(ids, lp, tail, vocab_size=V, top_p=top_p, k_max=k_max)
    dec = E.decode_adaptive(enc)
    p = np.exp(full.astype(np.float64))
    for i, (rid, rlp) in enumerate(_rows(dec)):
        c = len(rid)
        assert 1 <= c <= k_max
        assert np.array_equal(rid, ids[i, :c])                                      # exact ids, rank order
        assert np.array_equal(rlp, lp[i, :c].astype(np.float16).astype(np.float32))  # exact fp16 values
        kept = p[i, rid].sum()
        assert dec.tail[i] == pytest.approx(1.0 - kept, rel=1e-5, abs=1e-7)        # exact tail
        assert kept >= top_p * (1 - 1e-9) or c == k_max
        if c > 1:                                                                   # and minimal
            assert p[i, rid[:-1]].sum() < top_p
    assert dec.counts[0] < dec.counts[1] or dec.counts[1] == k_max


# ---------------------------------------------------------------------------------------------
# Delta coding
# ---------------------------------------------------------------------------------------------

def test_delta_coding_exact_with_empty_rows():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 9, size=50)
    counts[:3] = 0
    counts[-2:] = 0
    rows = [np.sort(rng.choice(60000, size=c, replace=False)) for c in counts]
    flat = np.concatenate(rows).astype(np.int64)
    d = E.delta_encode(flat, counts)
    off = np.concatenate([[0], np.cumsum(counts)])
    for i, r in enumerate(rows):
        if len(r):
            assert d[off[i]] == r[0] and (d[off[i] + 1:off[i + 1]] >= 1).all()
    assert np.array_equal(E.delta_decode(d, counts), flat)
    assert np.array_equal(E.delta_decode(d.astype(np.uint16), counts), flat)        # through storage dtype
    assert len(E.delta_decode(np.zeros(0, np.int64), np.zeros(4, np.int64))) == 0


# ---------------------------------------------------------------------------------------------
# Compact
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["id", "rank"])
@pytest.mark.parametrize("delta", [True, False])
@pytest.mark.parametrize("bits,lo", [(8, -16.0), (6, -12.0), (4, -8.0), (12, -20.0)])
def test_compact_round_trip_within_bound(full, cand, order, delta, bits, lo):
    ids, lp, tail = cand
    kw = dict(vocab_size=V, bits=bits, lo=lo, order=order, delta=delta)
    enc = E.encode_compact(ids, lp, tail, top_p=0.95, k_max=64, **kw)
    assert enc["codes"].dtype == (np.uint8 if bits <= 8 else np.uint16)
    dec = E.decode_compact(enc, **kw)
    bound = E.max_abs_error(bits, lo)
    assert bound == pytest.approx(-lo / (2 ** bits - 1) / 2)
    ref = E.decode_adaptive(E.encode_adaptive(ids, lp, tail, vocab_size=V, top_p=0.95, k_max=64))
    p = np.exp(full.astype(np.float64))
    for i, ((rid, rlp), (aid, _)) in enumerate(zip(_rows(dec), _rows(ref))):
        keep = aid[lp[i, :len(aid)] >= lo]                        # the adaptive prefix, minus entries < lo
        assert set(rid.tolist()) == set(keep.tolist())
        exact = full[i, rid].astype(np.float64)
        assert np.all(np.abs(rlp - exact) <= bound * (1 + 1e-6) + 1e-6)             # element by element
        assert np.all(np.diff(rlp) <= 0)                                            # rank order
        if order == "rank":
            assert np.array_equal(rid, keep)                                        # rank order kept exactly
        else:  # rank order recovered wherever the decoded values differ
            pos = {t: j for j, t in enumerate(keep.tolist())}
            strict = np.diff(rlp) < 0
            assert all(pos[a] < pos[b] for a, b, s in zip(rid[:-1], rid[1:], strict) if s)
        assert dec.tail[i] == pytest.approx(1.0 - p[i, rid].sum(), rel=1e-5, abs=1e-7)


def test_compact_drops_entries_below_lo_into_the_tail(cand):
    ids, lp, tail = cand
    enc = E.encode_compact(ids, lp, tail, vocab_size=V, top_p=1.0, k_max=128, bits=8, lo=-3.0)
    dec = E.decode_compact(enc, vocab_size=V, bits=8, lo=-3.0)
    assert np.array_equal(dec.counts, (lp >= -3.0).sum(1))
    assert np.all(dec.logprobs >= -3.0 - 1e-6)


# ---------------------------------------------------------------------------------------------
# The tail-bucket loss on decoded data vs the same computed densely
# ---------------------------------------------------------------------------------------------

def _dense_bucket_kl(z: torch.Tensor, rid: np.ndarray, p_ids: np.ndarray, m: float) -> torch.Tensor:
    """Independent float64 reference: KL over (ids..., rest) with full-softmax student masses."""
    q = torch.softmax(z.double(), -1)
    sel = torch.zeros_like(q, dtype=torch.bool)
    sel[torch.from_numpy(rid)] = True
    q_ids = q[torch.from_numpy(rid)]
    q_rest = q[~sel].sum()
    p = torch.from_numpy(np.append(p_ids, m))
    p = p / p.sum()
    qq = torch.cat([q_ids, q_rest[None]])
    return (torch.where(p > 0, p * (p.log() - qq.log()), torch.zeros_like(p))).sum()


@pytest.mark.parametrize("encoding", ["adaptive", "compact"])
def test_bucket_loss_on_decoded_matches_dense(full, cand, encoding):
    ids, lp, tail = cand
    if encoding == "adaptive":
        dec = E.decode_adaptive(E.encode_adaptive(ids, lp, tail, vocab_size=V, top_p=0.9, k_max=48))
    else:
        kw = dict(vocab_size=V, bits=6, lo=-12.0)
        dec = E.decode_compact(E.encode_compact(ids, lp, tail, top_p=0.9, k_max=48, **kw), **kw)
    torch.manual_seed(0)
    z = (torch.randn(N, V, dtype=torch.float64) * 2).requires_grad_()
    pid, plp = dec.padded()
    # 1. distillation_loss (derived tail), rows grouped by their count, vs the dense reference
    for c in np.unique(dec.counts):
        rows = np.flatnonzero(dec.counts == c)
        zr = z.detach()[rows].clone().requires_grad_()
        got = distillation_loss(zr, torch.from_numpy(pid[rows, :c]), torch.from_numpy(plp[rows, :c]), None,
                                kind="forward_kl", chunk_rows=7)
        got.backward()
        zd = z.detach()[rows].clone().requires_grad_()
        ref = torch.stack([_dense_bucket_kl(zd[j], pid[r, :c], np.exp(plp[r, :c].astype(np.float64)),
                                            max(0.0, 1 - np.exp(plp[r, :c].astype(np.float64)).sum()))
                           for j, r in enumerate(rows)]).mean()
        ref.backward()
        assert got.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
        torch.testing.assert_close(zr.grad, zd.grad, rtol=1e-8, atol=1e-12)
        # our ragged bucket loss with the derived tail is the same function
        mine = S.bucket_forward_kl(z.detach()[rows], pid[rows, :c], plp[rows, :c], None)
        assert mine.item() == pytest.approx(got.item(), rel=1e-12)
    # 2. all rows at once with the stored exact tail, vs the dense reference on the decoded values
    got = S.kd_loss(z, dec, chunk_rows=5)
    got.backward()
    zd = z.detach().clone().requires_grad_()
    ref = torch.stack([_dense_bucket_kl(zd[i], r, np.exp(v.astype(np.float64)), float(dec.tail[i]))
                       for i, (r, v) in enumerate(_rows(dec))]).mean()
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(z.grad, zd.grad, rtol=1e-5, atol=1e-9)
    # 3. against the EXACT teacher (true p on the same ids, exact tail): within the value-error bound
    delta = E.max_abs_error(6, -12.0) if encoding == "compact" else 2.0 ** -11 * 16  # fp16: |lp| <= 16 here
    p = np.exp(full.astype(np.float64))
    with torch.no_grad():
        zz = z.detach()
        exact = torch.stack([_dense_bucket_kl(zz[i], r, p[i, r], float(dec.tail[i]))
                             for i, (r, _) in enumerate(_rows(dec))])
        logq = torch.log_softmax(zz, -1).numpy()
        bound = []
        rr = math.expm1(2 * delta)
        for i, (r, _) in enumerate(_rows(dec)):
            pi = np.append(p[i, r], dec.tail[i])
            qi = np.append(np.exp(logq[i, r]), 1 - np.exp(logq[i, r]).sum())
            pos = pi > 0
            bound.append(rr * (pi[pos] * (np.abs(np.log(pi[pos])) + np.abs(np.log(qi[pos])))).sum() + 2 * delta)
    per_row = S.kd_loss(z.detach(), dec, reduction="none")
    assert torch.all((per_row - exact).abs() <= torch.tensor(bound) + 1e-9)


# ---------------------------------------------------------------------------------------------
# Sampling: round trip and the unbiased estimator
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 1.3, 2.0])
def test_sampled_round_trip(full, temperature):
    plain = E.encode_sampled(full, 40, temperature=temperature, rng=5, delta=False)
    coded = E.encode_sampled(full, 40, temperature=temperature, rng=5, delta=True)
    a = E.decode_sampled(plain, temperature=temperature, delta=False)
    b = E.decode_sampled(coded, temperature=temperature, delta=True, vocab_size=V)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.draw_counts, b.draw_counts)
    assert (b.n_draws == 40).all()
    assert ("logprobs" in coded) == (temperature != 1.0)
    for rid in np.split(b.ids, np.cumsum(b.counts)[:-1]):
        assert np.all(np.diff(rid) > 0)                                              # unique, ascending
    if temperature != 1.0:  # importance log-weights log(p/r), fp16 log-probs: error <= |1-1/T| |lp| 2^-11
        row = np.repeat(np.arange(N), b.counts)
        lp = full[row, b.ids].astype(np.float64)
        r = lp / temperature - np.log(np.exp(full.astype(np.float64) / temperature).sum(1))[row]
        err = np.abs(b.log_weights - (lp - r))
        assert np.all(err <= abs(1 - 1 / temperature) * np.abs(lp) * 2.0 ** -11 + 1e-6)
    big = E.encode_sampled(full[:2], 300, rng=1)
    assert big["draw_counts"].dtype == np.uint16 and (E.decode_sampled(big).n_draws == 300).all()


@pytest.mark.parametrize("temperature", [1.0, 1.5, 3.0])
def test_sampled_estimator_is_unbiased_value_and_gradient(temperature):
    """Mean over 2000 independent draws (8 draws each) of the loss and of its gradient w.r.t. the
    student logits vs the exact dense CE (V=50), within 4.5 standard errors, element by element.
    The same check rejects the biased variant that ignores the importance weights (see the end)."""
    v, n_tok, reps, n_draws = 50, 3, 2000, 8
    teacher = _logprobs(n_tok, v, seed=11, scale=1.5)
    torch.manual_seed(1)
    z0 = torch.randn(n_tok, v, dtype=torch.float64)
    rep = np.tile(teacher, (reps, 1))                                      # draw r of token t: row r*n_tok+t
    dec = E.decode_sampled(E.encode_sampled(rep, n_draws, temperature=temperature, rng=123,
                                            value_dtype="float32"), temperature=temperature)
    z = z0.repeat(reps, 1).requires_grad_()
    per = S.kd_loss(z, dec, reduction="none")                              # CE_hat per row
    per.sum().backward()                                                   # rows are independent
    vals = per.detach().reshape(reps, n_tok)
    grads = z.grad.reshape(reps, n_tok, v)
    zr = z0.clone().requires_grad_()
    ce = S.dense_cross_entropy(zr, torch.from_numpy(teacher), reduction="none")
    ce.sum().backward()

    def check(samples, exact):
        # the SE is floored at the effect of one draw in all reps: ids too rare to be drawn at all
        # have a sample SE of 0 but an (expected) error of about their probability
        mean, se = samples.mean(0), samples.std(0) / math.sqrt(reps)
        z_score = (mean - exact).abs() / se.clamp_min(1.0 / (reps * n_draws))
        assert float(z_score.max()) < 4.5, float(z_score.max())
        return mean

    check(vals, ce.detach())
    check(grads, zr.grad)
    # the KL version differs by the constant entropy: same gradient, mean = KL
    h = -(np.exp(teacher.astype(np.float64)) * teacher).sum(1)
    kl = S.kd_loss(z0.repeat(reps, 1), dec, entropy=torch.from_numpy(np.tile(h, reps)), reduction="none")
    check(kl.reshape(reps, n_tok), S.dense_forward_kl(z0, torch.from_numpy(teacher), reduction="none"))
    if temperature != 1.0:  # the check has power: dropping the importance weights is caught
        ids, c, _ = dec.padded()
        biased = S.sampled_cross_entropy(z0.repeat(reps, 1), ids, c, None, reduction="none")
        with pytest.raises(AssertionError):
            check(biased.reshape(reps, n_tok), ce.detach())


# ---------------------------------------------------------------------------------------------
# Hybrid: exact head + sampled tail
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tail_draws", ["fixed", "proportional"])
@pytest.mark.parametrize("delta", [True, False])
def test_hybrid_round_trip(full, tail_draws, delta):
    kw = dict(vocab_size=V, bits=8, lo=-16.0, delta=delta)
    enc = E.encode_hybrid(full, top_p=0.95, k_max=24, n_draws=20, tail_draws=tail_draws, rng=3, **kw)
    dec = E.decode_hybrid(enc, **kw)
    head = E.decode_compact({k: enc[k] for k in ("ids", "codes", "counts", "tail")}, order="id", **kw)
    ref = E.decode_compact(E.encode_compact(*E.select_topk(full, 24), top_p=0.95, k_max=24, order="id", **kw),
                           order="id", **kw)
    assert np.array_equal(head.ids, ref.ids) and np.array_equal(head.logprobs, ref.logprobs)
    p = np.exp(full.astype(np.float64))
    off, hoff = dec.offsets, head.offsets
    for i in range(N):
        hid = head.ids[hoff[i]:hoff[i + 1]]
        ids, t = dec.ids[off[i]:off[i + 1]], dec.targets[off[i]:off[i + 1]]
        assert np.array_equal(ids[:len(hid)], hid)                                  # head first, rank order
        tid, tt = ids[len(hid):], t[len(hid):]
        assert not set(tid.tolist()) & set(hid.tolist()) and np.all(np.diff(tid) > 0)
        m = 1 - p[i, hid].sum()
        assert head.tail[i] == pytest.approx(m, rel=1e-5, abs=1e-7)
        assert t[:len(hid)].sum() == pytest.approx(1 - float(head.tail[i]), rel=1e-9)  # head scaled to its mass
        d = E.max_abs_error(8, -16.0)
        assert np.all(np.abs(np.log(t[:len(hid)]) - np.log(p[i, hid])) <= 2 * d + 1e-6)
        n_t = 20 if tail_draws == "fixed" else math.ceil(20 * head.tail[i] - 1e-12)
        if len(tid):
            assert tt.sum() == pytest.approx(head.tail[i], rel=1e-9)
            assert np.all(np.isclose(tt * n_t / head.tail[i], np.round(tt * n_t / head.tail[i])))
    n_tail = np.bincount(np.repeat(np.arange(N), enc["tail_counts"]), enc["tail_draw_counts"].astype(np.int64), N)
    expect = np.full(N, 20) if tail_draws == "fixed" else np.ceil(20 * enc["tail"].astype(np.float64) - 1e-12)
    assert np.array_equal(n_tail, expect.astype(np.int64))


@pytest.mark.parametrize("tail_draws", ["fixed", "proportional"])
def test_hybrid_estimator_unbiased_up_to_head_quantisation(tail_draws):
    """Mean over 2000 encodings of the hybrid loss and gradient vs the exact dense CE: within 4.5 standard
    errors plus the head's stated quantisation bias (targets within exp(+-2 delta) of p)."""
    v, n_tok, reps = 50, 3, 2000
    teacher = _logprobs(n_tok, v, seed=11, scale=1.5)
    torch.manual_seed(1)
    z0 = torch.randn(n_tok, v, dtype=torch.float64)
    kw = dict(vocab_size=v, bits=8, lo=-16.0)
    enc = E.encode_hybrid(np.tile(teacher, (reps, 1)), k_max=4, n_draws=6, tail_draws=tail_draws, rng=9, **kw)
    dec = E.decode_hybrid(enc, **kw)
    z = z0.repeat(reps, 1).requires_grad_()
    per = S.kd_loss(z, dec, reduction="none")
    per.sum().backward()
    zr = z0.clone().requires_grad_()
    ce = S.dense_cross_entropy(zr, torch.from_numpy(teacher), reduction="none")
    ce.sum().backward()
    p = np.exp(teacher.astype(np.float64))
    head = np.argsort(-teacher, axis=1)[:, :4]
    r = math.expm1(2 * E.max_abs_error(8, -16.0))
    grad_bias = np.zeros((n_tok, v))
    np.put_along_axis(grad_bias, head, np.take_along_axis(p, head, 1) * r, 1)
    logq = torch.log_softmax(z0, -1).numpy()
    loss_bias = (np.take_along_axis(p, head, 1) * r * np.abs(np.take_along_axis(logq, head, 1))).sum(1)

    def check(samples, exact, bias, draws_per_rep=6):
        mean, se = samples.mean(0), samples.std(0) / math.sqrt(reps)
        tol = 4.5 * se.clamp_min(1.0 / (reps * draws_per_rep)) + torch.from_numpy(bias) + 1e-12
        assert bool(((mean - exact).abs() <= tol).all()), float(((mean - exact).abs() / tol).max())

    check(per.detach().reshape(reps, n_tok), ce.detach(), loss_bias)
    check(z.grad.reshape(reps, n_tok, v), zr.grad, grad_bias)
    # power: the head alone (tail mass dropped, as a renormalised top-k would) is caught
    ids, t = dec.padded()
    head_only = np.zeros_like(t)
    for j in range(4):
        hit = ids == np.tile(head, (reps, 1))[:, j:j + 1]
        head_only[hit] = t[hit]
    zz = z0.repeat(reps, 1).requires_grad_()
    S.sparse_cross_entropy(zz, ids, head_only / head_only.sum(1, keepdims=True), reduction="none").sum().backward()
    with pytest.raises(AssertionError):
        check(zz.grad.reshape(reps, n_tok, v), zr.grad, grad_bias)


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

def test_encoding_errors(full, cand):
    ids, lp, tail = cand
    with pytest.raises(E.EncodingError, match="top_p must be a number in \\(0, 1\\]"):
        E.encode_adaptive(ids, lp, tail, vocab_size=V, top_p=0.0)
    with pytest.raises(E.EncodingError, match="k_max must be an int >= 1"):
        E.encode_adaptive(ids, lp, tail, vocab_size=V, k_max=0)
    with pytest.raises(E.EncodingError, match="sorted in descending order"):
        E.encode_adaptive(ids, lp[:, ::-1].copy(), tail, vocab_size=V)
    with pytest.raises(E.EncodingError, match="ids must be in \\[0, vocab_size=100\\)"):
        E.encode_topk(ids, lp, tail, vocab_size=100, k=4)
    bad = ids.copy()
    bad[0, 1] = bad[0, 0]
    with pytest.raises(E.EncodingError, match="ids repeat"):
        E.encode_topk(bad, lp, tail, vocab_size=V, k=4)
    with pytest.raises(E.EncodingError, match="tail must be a float array of shape"):
        E.encode_adaptive(ids, lp, tail[:3], vocab_size=V)
    with pytest.raises(E.EncodingError, match="k must be an int in \\[1, 128\\]"):
        E.encode_topk(ids, lp, tail, vocab_size=V, k=129)
    with pytest.raises(E.EncodingError, match="bits must be an int in \\[1, 16\\]"):
        E.encode_compact(ids, lp, tail, vocab_size=V, bits=0)
    with pytest.raises(E.EncodingError, match="lo must be a finite negative"):
        E.encode_compact(ids, lp, tail, vocab_size=V, lo=0.0)
    with pytest.raises(E.EncodingError, match="order must be 'id' or 'rank'"):
        E.encode_compact(ids, lp, tail, vocab_size=V, order="value")
    enc = E.encode_compact(ids, lp, tail, vocab_size=V)
    with pytest.raises(E.EncodingError, match="counts sum to"):
        E.decode_compact({**enc, "counts": enc["counts"][:-1]}, vocab_size=V)
    with pytest.raises(E.EncodingError, match="missing array\\(s\\) codes"):
        E.decode_compact({k: a for k, a in enc.items() if k != "codes"}, vocab_size=V)
    with pytest.raises(E.EncodingError, match="n_draws must be an int in \\[1, 65535\\]"):
        E.encode_sampled(full, 0)
    with pytest.raises(E.EncodingError, match="temperature must be a finite number > 0"):
        E.encode_sampled(full, 4, temperature=0.0)
    with pytest.raises(E.EncodingError, match="temperature=0.5: a proposal temperature below 1"):
        E.encode_sampled(full, 4, temperature=0.5)
    with pytest.raises(E.EncodingError, match="vocab_size=10 but logprobs has V=300"):
        E.encode_sampled(full, 4, vocab_size=10)
    hot = E.encode_sampled(full, 4, temperature=2.0)
    with pytest.raises(E.EncodingError, match="missing array\\(s\\) logprobs, log_z"):
        E.decode_sampled({k: hot[k] for k in ("ids", "draw_counts", "counts")}, temperature=2.0)
    with pytest.raises(E.EncodingError, match="width=2 is smaller than the longest row"):
        E.decode_topk(E.encode_topk(ids, lp, tail, vocab_size=V, k=4)).padded(2)
    with pytest.raises(E.EncodingError, match="tail_draws must be 'fixed' or 'proportional'"):
        E.encode_hybrid(full, tail_draws="some")
    hyb = E.encode_hybrid(full, rng=0, vocab_size=V)
    with pytest.raises(E.EncodingError, match="hybrid: missing array\\(s\\) tail_counts"):
        E.decode_hybrid({k: a for k, a in hyb.items() if k != "tail_counts"}, vocab_size=V)
    with pytest.raises(E.EncodingError, match="codec must be one of"):
        E.payload_bytes({"a": np.zeros(3)}, "lz4")
    assert issubclass(E.EncodingError, ValueError)


def test_loss_errors():
    z = torch.zeros(2, 10)
    ids = torch.tensor([[1, 2], [3, -1]])
    lp = torch.tensor([[-1.0, -2.0], [-1.0, float("-inf")]])
    assert torch.isfinite(S.bucket_forward_kl(z, ids, lp))
    with pytest.raises(ValueError, match="ids has 10: ids must be in \\[0, V=10\\) or -1"):
        S.bucket_forward_kl(z, torch.tensor([[1, 10], [3, -1]]), lp)
    with pytest.raises(ValueError, match="padding \\(-1\\) must come after"):
        S.bucket_forward_kl(z, torch.tensor([[-1, 2], [3, -1]]), lp)
    with pytest.raises(ValueError, match="tail shape \\(3,\\) does not match the expected \\(2,\\)"):
        S.bucket_forward_kl(z, ids, lp, torch.zeros(3))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none'"):
        S.bucket_forward_kl(z, ids, lp, reduction="sum")
    with pytest.raises(ValueError, match="counts must be >= 0, and 0 in padding"):
        S.sampled_cross_entropy(z, ids, torch.tensor([[1, 1], [2, 1]]))
    with pytest.raises(ValueError, match="student_logits must be a floating-point \\(N, V\\)"):
        S.sampled_cross_entropy(torch.zeros(2, 3, 10), ids, torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="decoded must be a SparseRows, SampledRows or TargetRows"):
        S.kd_loss(z, {"ids": ids})
    with pytest.raises(ValueError, match="mask must be a bool or float tensor of shape \\(2,\\)"):
        S.bucket_forward_kl(z, ids, lp, mask=torch.ones(3, dtype=torch.bool))


def test_compact_rank_order_equals_the_three_key_lexsort():
    """The two-pass stable sort gives exactly the lexsort's order on ids stored ascending (ties in codes
    included), and ids stored in another order take the lexsort itself."""
    from logitcache.format.encodings.compact import rank_order

    rng = np.random.default_rng(7)
    for bits, n in ((8, 300), (10, 70000)):
        top = (1 << bits) - 1
        counts = rng.integers(0, 12, n)
        m = int(counts.sum())
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        fid = np.concatenate([np.sort(rng.choice(5000, c, replace=False)) for c in counts]).astype(np.int64)
        q = rng.integers(0, 4 if bits == 8 else top + 1, m)           # many equal codes within a token
        row = np.repeat(np.arange(n), counts)
        want = np.lexsort((fid, -q, row))
        np.testing.assert_array_equal(rank_order(fid, q, counts, top), want)
        shuffled = fid.copy()
        i = starts[counts >= 2][0]
        shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]  # one token out of id order
        np.testing.assert_array_equal(rank_order(shuffled, q, counts, top), np.lexsort((shuffled, -q, row)))
