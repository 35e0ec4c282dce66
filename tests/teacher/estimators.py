"""The estimator checks of captured draws, shared by every backend's tests: over all scored rows of a
``sampled`` or ``hybrid`` cache, the estimate of the teacher's own entropy H(p) = CE(p, p) from the
stored targets against the exact value of a direct float64 computation, summed and divided by the
predicted standard deviation (a z-score: |z| < 4.5 unless the draws are biased)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.format.encodings import SampledRows, encoding_from, max_abs_error


def direct_logp(model, tokens) -> np.ndarray:
    """(n, V) float64 log-softmax of ``model`` at every position of one sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([np.asarray(tokens, dtype=np.int64).tolist()])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def scored_rows(cache, model):
    """(record, stored arrays, direct float64 log-probs) of every sample."""
    for rec in cache.samples.to_pylist():
        a = cache.sample(rec["sample_id"])
        yield rec, a, direct_logp(model, a["tokens"])


def z_score(errors: list[float], variances: list[float]) -> float:
    return float(np.sum(errors) / np.sqrt(np.sum(variances)))


def sampled_z(cache, model) -> tuple[float, int]:
    """(z, rows) of a ``sampled`` cache (temperature 1): every scored row holds exactly ``draws`` draws."""
    enc = cache.manifest.capture.encoding
    n, vocab = enc["draws"], cache.manifest.teacher.vocab_size
    errors, variances = [], []
    for rec, a, logp in scored_rows(cache, model):
        s, e = rec["scored_start"], rec["scored_end"]
        d = encoding_from(enc).decode(a, vocab)
        assert isinstance(d, SampledRows)
        assert (d.n_draws[s:e] == n).all() and (d.n_draws[:s] == 0).all()
        t = d.to_targets().rows(s, e)
        off = t.offsets
        for j in range(e - s):
            lp = logp[s + j]
            p = np.exp(lp)
            h = -(p * lp).sum()
            est = -(t.targets[off[j]:off[j + 1]] * lp[t.ids[off[j]:off[j + 1]]]).sum()   # CE_hat(p, p) -> H(p)
            errors.append(est - h)
            variances.append(((p * lp * lp).sum() - h * h) / n)
    return z_score(errors, variances), len(errors)


def hybrid_z(cache, model, top_k: int, head_atol: float = 1e-4, tail_rel: float = 1e-4) -> tuple[float, int]:
    """(z, rows) of the drawn tail of a ``hybrid`` cache, after checking each row's head (the top-k ids
    with log-prob >= lo, within the code's bound + ``head_atol``) and its exact tail mass (``tail_rel``)."""
    enc = cache.manifest.capture.encoding
    n, vocab = enc["draws"], cache.manifest.teacher.vocab_size
    bound = max_abs_error(enc["bits"], enc["lo"])
    errors, variances = [], []
    for rec, a, logp in scored_rows(cache, model):
        s, e = rec["scored_start"], rec["scored_end"]
        head = encoding_from({**enc, "name": "compact"}).decode(a, vocab).rows(s, e)    # the head alone
        t = encoding_from(enc).decode(a, vocab).rows(s, e)
        ho, to = head.offsets, t.offsets
        for j in range(e - s):
            lp = logp[s + j]
            hid = head.ids[ho[j]:ho[j + 1]]
            srt = np.sort(lp)[::-1]
            top = np.argsort(-lp)[:top_k]
            above = lp[top] >= enc["lo"]
            if head_atol <= 1e-6:                       # the engine of the direct computation: exactly those
                assert set(hid) == set(top[above])
            else:   # another engine: an id at the boundary of k or of lo may swap with its near-tie
                assert len(hid) in (above.sum(), above.sum() - 1, above.sum() + 1)
                assert lp[hid].min() >= min(srt[max(len(hid) - 1, 0)] - head_atol, srt[0])
            assert np.abs(head.logprobs[ho[j]:ho[j + 1]] - lp[hid]).max(initial=0) <= bound + head_atol
            m = 1.0 - np.exp(lp[hid]).sum()
            assert head.tail[j] == pytest.approx(m, rel=tail_rel, abs=1e-6)
            ids, tg = t.ids[to[j]:to[j + 1]], t.targets[to[j]:to[j + 1]]
            drawn = ids[~np.isin(ids, hid)]
            assert len(drawn) == len(ids) - len(hid)
            if m <= 1e-12:
                continue
            assert tg.sum() == pytest.approx(1.0, abs=1e-6)
            # the estimate of CE(p, p) = H(p): head part exact (up to rounding), tail part drawn
            p = np.exp(lp)
            rest = np.ones(len(lp), bool)
            rest[hid] = False
            pt = p[rest] / p[rest].sum()
            n_t = int(np.ceil(n * m - 1e-12))
            h_tail = -(pt * lp[rest]).sum()
            est_tail = -(tg[~np.isin(ids, hid)] * lp[drawn]).sum()
            errors.append(est_tail - m * h_tail)
            variances.append(m * m * ((pt * lp[rest] ** 2).sum() - h_tail ** 2) / n_t)
    return z_score(errors, variances), len(errors)


def assert_same_draws(a, b, names) -> None:
    """Every sample of caches ``a`` and ``b`` holds the same ``names`` arrays (the draws), element by element."""
    for rec in a.samples.to_pylist():
        x, y = a.sample(rec["sample_id"]), b.sample(rec["sample_id"])
        for name in names:
            np.testing.assert_array_equal(x[name], y[name], err_msg=f"{name} of {rec['sample_id']}")
