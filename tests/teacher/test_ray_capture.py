"""``capture --executor ray`` on one local Ray (2 CPUs) for the module, with the tiny teacher: the cache
equals a local run's element by element, also when an actor dies after publishing a shard it never
reported; a shard that fails every attempt stops the run and a plain re-run completes it; flag
mistakes are one line; docs/distributed.md's example runs as written."""

import json
import logging
import sys

import pytest
from click.testing import CliRunner

from logitcache import open_cache
from logitcache.cli.main import cli
from logitcache.format import LogitcacheError
from logitcache.teacher.capture import CaptureJob, run_capture
from tests.conftest import assert_caches_equal

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'logitcache[ray]')")

TEXTS = [f"Sentence {i}: " + " ".join(["the quick brown fox jumps over the lazy dog"] * (1 + i % 3)) for i in range(8)]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One new local Ray for the module ("local": never a cluster `ray start` left running); the executor
    uses the process's Ray when there is one. Its workers inherit this process's environment
    (PYTHONPATH, HF_HUB_OFFLINE)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray-input") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def job(cache, teacher, source, **kw) -> CaptureJob:
    base = dict(cache=str(cache), teacher=str(teacher), source=str(source), progress=False, encoding="topk", top_k=8,
                samples_per_shard=2, backend="hf", mode="score")
    return CaptureJob(**{**base, **kw})


@pytest.fixture(scope="module")
def static(tmp_path_factory, tiny_teacher, texts):
    """The same capture by the local executor: what every Ray run must equal."""
    path = tmp_path_factory.mktemp("static") / "cache"
    run_capture(job(path, tiny_teacher, texts))
    return open_cache(str(path), verify=True)


def recorded_once(path, names):
    """Every shard is named exactly once in the part manifest and in manifest.json, and nothing is left
    in _tmp/."""
    part = json.loads((path / "parts" / "worker-00000.json").read_text())
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(s["name"] for s in part["shards"]) == sorted(names)
    assert [s["name"] for s in manifest["shards"]] == names
    assert part["part"] == {"worker_index": 0, "num_workers": 1, "finished": True}
    assert not list((path / "_tmp").glob("*"))
    assert sorted(p.name for p in (path / "shards").iterdir()) == names


def test_a_shard_that_keeps_failing_stops_the_run_and_a_plain_rerun_completes(tmp_path, tiny_teacher, texts,
                                                                             static, monkeypatch):
    names = [s.name for s in static.shards]
    assert len(names) == 4
    # the actor is killed before it publishes shard 2, on every attempt
    monkeypatch.setenv("LOGITCACHE_FAULT", f"kill-before-publish:{names[2]}")
    with pytest.raises(LogitcacheError, match=f"shard {names[2]} failed 1 time .*its actor died.*run the same "
                                              "command again to resume"):
        run_capture(job(tmp_path / "c", tiny_teacher, texts, executor="ray", ray_actors=2, ray_max_retries=0))
    partial = open_cache(str(tmp_path / "c"), allow_partial=True)
    assert names[2] not in {s.name for s in partial.shards} and not partial.manifest.complete
    monkeypatch.delenv("LOGITCACHE_FAULT")
    summary = run_capture(job(tmp_path / "c", tiny_teacher, texts))      # resumes with the local executor
    assert summary.complete and summary.shards_written == 4 - len(partial.shards)
    assert_caches_equal(static, open_cache(str(tmp_path / "c"), verify=True))
    recorded_once(tmp_path / "c", names)


def test_actors_that_die_loading_their_engine_stop_the_run_instead_of_hanging(tmp_path, tiny_teacher, texts,
                                                                              monkeypatch):
    """Every actor exits while it loads the teacher (as an engine out of memory would): each is restarted
    --ray-max-retries times, then dropped, and the run stops naming why; nothing is written (as with the local
    executor, nothing is before an engine has loaded)."""
    monkeypatch.setenv("LOGITCACHE_FAULT", "ray-exit-on-load")
    with pytest.raises(LogitcacheError, match=r"no actor is left to capture the remaining shards \(.*an actor died 2 "
                                              r"times while loading its engine"):
        run_capture(job(tmp_path / "c", tiny_teacher, texts, executor="ray", ray_actors=2, ray_max_retries=1))
    assert not (tmp_path / "c" / "manifest.json").exists() and not list((tmp_path / "c").glob("shards/*"))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_flag_mistakes_are_one_line(tmp_path, tiny_teacher, texts, monkeypatch):
    base = ["capture", tmp_path / "c", "--teacher", tiny_teacher, "--backend", "hf", "--mode", "score", "--input", texts,
            "--no-progress"]
    for extra, message in [
        (["--executor", "ray", "--num-workers", "2"], "--num-workers/--worker-index: --executor ray hands the shards"),
        (["--ray-actors", "2"], "--ray-actors: only with --executor ray"),
        (["--executor", "ray", "--ray-gpus-per-actor", "1"], "--ray-gpus-per-actor 1: the Ray cluster"),
        (["--executor", "ray", "--ray-cpus-per-actor", "4"], "--ray-cpus-per-actor 4: the Ray cluster"),
        (["--executor", "ray", "--ray-actors", "0"], "--ray-actors: must be >= 1"),
        (["--executor", "ray", "--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: nothing answers there"),
    ]:
        r = run(*base, *extra)
        assert r.exit_code == 1 and message in r.output and r.output.count("\n") == 1, (extra, r.output)
    monkeypatch.setitem(sys.modules, "ray", None)                      # as if Ray were not installed
    r = run(*base, "--executor", "ray")
    assert r.exit_code == 1 and r.output == ("error: --executor ray: Ray is not installed "
                                             "(pip install 'logitcache[ray]')\n")
    assert not (tmp_path / "c").exists()


def test_the_documented_example_equals_the_local_executor_even_when_an_actor_dies(tmp_path, tiny_teacher,
                                                                                  monkeypatch):
    """docs/distributed.md's local Ray example as written, with the tiny teacher instead of the default
    (and --json). One actor exits after publishing a shard, before the driver hears of it: the shard is
    taken again by an actor and recorded once. The worker variables of a surrounding job are ignored."""
    import torch

    from tests.student.test_rounds import documented_commands

    commands = [c for c in documented_commands("logitcache capture") if "--executor" in c and "--ray-address" not in c]
    assert len(commands) == 1, commands
    args = commands[0]
    inspect = [c for c in documented_commands("logitcache inspect") if c[1] == args[1]]
    assert inspect == [["inspect", args[1], "--verify"]]
    monkeypatch.chdir(tmp_path)
    extra = ["--teacher", tiny_teacher, "--no-progress", "--json"]
    # the local executor with one torch thread, as each actor has (--ray-cpus-per-actor 1): float sums on
    # CPUs depend on the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = run(*[a if a != args[1] else "local-cache" for a in args if a not in ("--executor", "ray")], *extra)
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    local = json.loads(r.stdout)
    names = [s.name for s in open_cache("local-cache").shards]
    assert len(names) == 4

    monkeypatch.setenv("LOGITCACHE_FAULT", f"ray-exit-after-publish:{names[1]}")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r = run(*args, *extra)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary.keys() == local.keys()                              # the same --json fields
    assert (summary["complete"], summary["shards_written"], summary["worker_index"], summary["num_workers"],
            summary["samples"]) == (True, 4, 0, 1, 8)
    assert run(*inspect[0]).exit_code == 0
    got = open_cache(args[1], verify=True)
    assert_caches_equal(open_cache("local-cache"), got)
    assert [s.checksum for s in got.shards] == [s.checksum for s in open_cache("local-cache").shards]
    recorded_once(tmp_path / args[1], names)
    # a plain (local) re-run sees everything
    for var in ("LOGITCACHE_FAULT", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var)
    again = run_capture(CaptureJob(cache=args[1], teacher=str(tiny_teacher), backend="hf", limit=8, samples_per_shard=2,
                                   max_new_tokens=32, progress=False))
    assert (again.shards_written, again.shards_already_committed) == (0, 4)
