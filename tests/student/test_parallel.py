"""FSDP2 and gradient accumulation: two gloo ranks on the CPU resume bit for bit after a kill, the
sharded checkpoint refuses damage, and accumulation synchronises gradients once per optimizer step."""

import json
import os
import subprocess
import sys

import pytest
import torch

from student_train import parallel
from tests.student.test_train import cache, config, student_weights  # noqa: F401  (module fixture)


def torchrun(*args, port: int, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "student_train.cli", *map(str, args), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_fsdp_on_two_ranks_resumes_bit_for_bit(cache, tmp_path):   # noqa: F811
    args = [cache, "--out", None, "--keep-layers", "0,1", "--seq-len", 48, "--batch-size", 2, "--max-steps", 5,
            "--lr", 3e-3, "--warmup-steps", 1, "--save-every", 2, "--seed", 3, "--grad-accum", 2,
            "--parallel", "fsdp", "--eval-frac", 0.2, "--fused-loss", "on"]
    whole = torchrun(*[tmp_path / "whole" if a is None else a for a in args], port=29561)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = torchrun(*[tmp_path / "resumed" if a is None else a for a in args], port=29562,
                      env={"STUDENT_TRAIN_FAULT": "kill-after-step:3"})
    assert killed.returncode != 0 and not (tmp_path / "resumed" / "student").exists()
    files = json.loads((tmp_path / "resumed" / "checkpoint" / "meta.json").read_text())["files"]
    assert any(name.startswith("dcp/") and name.endswith(".distcp") for name in files)   # sharded, checksummed
    resumed = torchrun(*[tmp_path / "resumed" if a is None else a for a in args], port=29563)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = student_weights(tmp_path / "whole"), student_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and a
    for name in a:                                      # bit for bit
        assert torch.equal(a[name], b[name]), name
    log = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" not in r] == [1, 2, 3, 3, 4, 5]   # resumed from the step-2 checkpoint
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["parallel"] == "fsdp" and report["world_size"] == 2 and report["attention"]["mode"] == "sdpa"
    assert report["fused_loss"] == {"on": True, "reason": ""}
    start, end = report["eval_start"], report["eval_end"]       # evaluated by both ranks together, reported once
    assert start["tokens"] == end["tokens"] > 0 and end["kl_forward"] != start["kl_forward"]


def test_one_process_fsdp_trains_like_ddp(cache, tmp_path):   # noqa: F811
    """FSDP with a group of one runs the same arithmetic as the plain loop: the same weights."""
    from student_train.train import train

    plain = train(config(cache, tmp_path / "plain", keep_layers="0,1", max_steps=3), progress=False)
    fsdp = train(config(cache, tmp_path / "fsdp", keep_layers="0,1", max_steps=3, parallel="fsdp"), progress=False)
    assert fsdp["parallel"] == "fsdp" and plain["parameters"] == fsdp["parameters"]
    a, b = student_weights(tmp_path / "plain"), student_weights(tmp_path / "fsdp")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_accumulation_skips_the_all_reduce_until_the_last_micro_step():
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", world_size=1, rank=0, store=torch.distributed.HashStore())
    model = parallel.wrap(torch.nn.Linear(4, 2), "ddp", 2, torch.device("cpu"), None) if False else \
        torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    with parallel.gradient_sync(model, False):
        assert model.require_backward_grad_sync is False
        model(torch.ones(1, 4)).sum().backward()
    with parallel.gradient_sync(model, True):
        assert model.require_backward_grad_sync is True


def test_bad_parallel_settings_are_named(cache, tmp_path):   # noqa: F811
    from logitcache.format.errors import LogitcacheError

    with pytest.raises(LogitcacheError, match=r"--parallel: 'zero3': choose ddp or fsdp"):
        config(cache, tmp_path / "a", parallel="zero3")
    with pytest.raises(LogitcacheError, match=r"--attention: 'paged': choose auto, flash, flex, sdpa or dense"):
        config(cache, tmp_path / "b", attention="paged")
