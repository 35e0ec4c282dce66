"""Distil only chosen positions (--token-select): the choice against direct computations, and the
positions left out contribute nothing to the loss or its gradient."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from logitcache.format.errors import LogitcacheError
from student_train import losses
from student_train.config import TrainConfig
from student_train.objective import compute_loss, token_weights
from student_train.targets import SparseTargets


def direct_top(score: np.ndarray, valid: np.ndarray, frac: float) -> set:
    """Indices of the ceil(frac * n) valid entries with the highest score, earlier first on ties."""
    idx = np.flatnonzero(valid)
    order = idx[np.argsort(-score[idx], kind="stable")]
    return set(order[:math.ceil(frac * len(idx) - 1e-6)].tolist())


@pytest.mark.parametrize("per", ["batch", "sequence"])
def test_top_fraction_equals_a_direct_ranking(per):
    g = torch.Generator().manual_seed(0)
    score = torch.randn(3, 17, generator=g)
    score[0, 3] = score[0, 5]                                    # a tie: the earlier position ranks first
    mask = torch.rand(3, 17, generator=g) > 0.3
    got = losses.top_fraction(score, mask, 0.2, per)
    s, v = score.numpy(), mask.numpy()
    if per == "batch":
        want = direct_top(s.reshape(-1), v.reshape(-1), 0.2)
        assert set(np.flatnonzero(got.numpy().reshape(-1)).tolist()) == want
    else:
        for b in range(3):
            assert set(np.flatnonzero(got[b].numpy()).tolist()) == direct_top(s[b], v[b], 0.2)
    assert got[~mask].sum() == 0
    with pytest.raises(ValueError, match="frac must be a number in \\(0, 1\\]"):
        losses.top_fraction(score, mask, 0.0)


def test_student_entropy_equals_the_full_softmax_computation():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 50, generator=g) * 3
    mask = torch.rand(2, 9, generator=g) > 0.4
    p = torch.softmax(logits.double(), -1)
    want = torch.where(mask, -(p * p.log()).sum(-1), torch.zeros(2, 9, dtype=torch.float64))
    for chunk in (None, 4):
        got = losses.student_entropy(logits, mask, chunk)
        assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (no GPU here): the selection on the device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_student_entropy_selection_on_cuda_equals_the_cpu(dtype):
    """On the device, in the trainer's logits dtypes: the entropy to 1e-3 of the CPU's float64, and the
    chosen positions those a direct ranking of the device's own entropies gives (ties and rounding
    differ between devices; the rule must not)."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 256, 2048, generator=g) * 3).to(dtype)
    mask = torch.rand(4, 256, generator=g) > 0.2
    h = losses.student_entropy(logits.cuda(), mask.cuda(), 128)
    p = torch.softmax(logits.double(), -1)
    want = torch.where(mask, -(p * p.log()).sum(-1), torch.zeros(4, 256, dtype=torch.float64))
    assert h.device.type == "cuda" and torch.allclose(h.double().cpu(), want, atol=1e-3)
    for per in ("batch", "sequence"):
        got = losses.top_fraction(h, mask.cuda(), 0.2, per).cpu()
        s, v = h.cpu().numpy(), mask.numpy()
        if per == "batch":
            assert set(np.flatnonzero(got.numpy().reshape(-1)).tolist()) == direct_top(s.reshape(-1), v.reshape(-1), 0.2)
        else:
            for b in range(4):
                assert set(np.flatnonzero(got[b].numpy()).tolist()) == direct_top(s[b], v[b], 0.2)


def sparse_batch(B=2, T=12, V=40, k=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B * T)]).reshape(B, T, k)
    lp = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).gather(-1, ids)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 9:] = False
    labels = torch.randint(0, V, (B, T), generator=g).masked_fill(~mask, -100)
    return {"loss_mask": mask, "labels": labels, "teacher": SparseTargets(ids, lp),
            "teacher_entropy": torch.rand(B, T, generator=g) * 3, "input_ids": torch.zeros(B, T, dtype=torch.long),
            "document_ids": mask.long(), "position_ids": torch.arange(T).expand(B, T)}


class Logits(torch.nn.Module):
    """A 'model' whose logits are a parameter: the loss's gradient is read off it directly."""

    def __init__(self, z):
        super().__init__()
        self.z = torch.nn.Parameter(z)

    def forward(self, input_ids, output_hidden_states=False, **kw):
        return type("Out", (), {"logits": self.z, "hidden_states": None})()


def cfg_of(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(cache="unused", out=str(tmp_path), **kw)


def test_student_entropy_selection_trains_only_the_chosen_positions(tmp_path):
    batch = sparse_batch()
    torch.manual_seed(0)
    model = Logits(torch.randn(2, 12, 40, dtype=torch.float64) * 2)
    cfg = cfg_of(tmp_path, token_select="student-entropy", top_frac=0.2)
    kd = cfg.objective()
    loss, parts = compute_loss(cfg, kd, model, batch, None, [])
    loss.backward()
    # the chosen positions are the top 20% of the loss positions by the student's own entropy
    h = losses.student_entropy(model.z.detach(), batch["loss_mask"], None).numpy().reshape(-1)
    want = direct_top(h, batch["loss_mask"].numpy().reshape(-1), 0.2)
    chosen = token_weights(cfg, batch, model.z.detach()).numpy().reshape(-1)
    assert set(np.flatnonzero(chosen).tolist()) == want and len(want) == math.ceil(0.2 * 21)
    assert float(parts["selected_share"]) == pytest.approx(len(want) / 21)
    # the loss is the direct forward KL over the chosen positions alone, and nothing else gets a gradient
    z = model.z.detach().clone().requires_grad_(True)
    w = torch.zeros(24, dtype=torch.float64)
    w[list(want)] = 1.0
    direct = losses.distillation_loss(z, batch["teacher"].ids, batch["teacher"].logprobs, w.reshape(2, 12))
    direct.backward()
    assert torch.allclose(loss, direct, rtol=1e-12) and torch.allclose(model.z.grad, z.grad, rtol=1e-10)
    off = torch.ones(24, dtype=torch.bool)
    off[list(want)] = False
    assert torch.all(model.z.grad.reshape(24, -1)[off] == 0)


def test_ce_stays_on_every_position(tmp_path):
    batch = sparse_batch()
    model = Logits(torch.randn(2, 12, 40, dtype=torch.float64))
    cfg = cfg_of(tmp_path, token_select="teacher-entropy", top_frac=0.5, select_per="sequence", ce_alpha=0.3)
    loss, parts = compute_loss(cfg, cfg.objective(), model, batch, None, [])
    ce = losses.hard_label_cross_entropy(model.z, batch["labels"])
    w = losses.top_fraction(batch["teacher_entropy"], batch["loss_mask"], 0.5, "sequence")
    kd = losses.distillation_loss(model.z, batch["teacher"].ids, batch["teacher"].logprobs, w)
    assert torch.allclose(loss, 0.3 * ce + 0.7 * kd, rtol=1e-12)
    assert float(parts["selected_share"]) == pytest.approx((6 + 5) / 21)      # ceil(0.5*12), ceil(0.5*9)


@pytest.mark.parametrize("kw, message", [
    (dict(token_select="student-entropy"), "--token-select: student-entropy needs --top-frac"),
    (dict(top_frac=0.2), "--top-frac: selects among the positions scored by --token-select"),
    (dict(token_select="random", top_frac=0.2, entropy_above=1.0), "--entropy-above: is a teacher-entropy rule"),
    (dict(token_select="random", top_frac=1.5), "--top-frac: must be in \\(0, 1\\]"),
    (dict(token_select="nope", top_frac=0.2), "--token-select: 'nope': choose all, teacher-entropy"),
])
def test_bad_selections_are_refused(tmp_path, kw, message):
    with pytest.raises(LogitcacheError, match=message):
        cfg_of(tmp_path, **kw)


def test_training_logs_the_chosen_share(tmp_path, tiny_teacher):
    from click.testing import CliRunner

    from logitcache.teacher.capture import CaptureJob, run_capture
    from student_train.cli import cli

    from .conftest import WORDS

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": " ".join(WORDS[(i + j) % 12] for j in range(9))})
                                              + "\n" for i in range(6)))
    run_capture(CaptureJob(encoding="topk", cache=str(tmp_path / "c"), teacher=str(tiny_teacher), backend="hf",
                           mode="score", source=str(tmp_path / "t.jsonl"), top_k=4, progress=False))
    r = CliRunner().invoke(cli, [str(tmp_path / "c"), "--out", str(tmp_path / "run"), "--keep-layers", "0",
                                 "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--token-select",
                                 "student-entropy", "--top-frac", "0.25", "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    shares = [x["selected_share"] for x in log if "selected_share" in x]
    assert len(shares) == 2 and all(0.25 <= s < 0.35 for s in shares)
