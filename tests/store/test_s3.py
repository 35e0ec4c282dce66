"""Object storage as a first-class store, against a real S3 protocol server (moto's, on loopback):
every command takes --storage-options, a cache written to S3 equals one written locally element by
element, capture resumes there, and an unreachable store is one line naming the cache. Chained URLs
(``simplecache::s3://...``, a local cache layer) read the same as plain ones everywhere, refuse writes,
and a bad one is one line."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from logitcache import open_cache
from tests.conftest import assert_caches_equal

ENV = {"HF_HUB_OFFLINE": "1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(cmd: str, *args, options: dict | None = None, env: dict | None = None) -> Result:
    """A command in this process (click's runner: no interpreter start-up per call), its output apart."""
    from click.testing import CliRunner

    from logitcache.cli.main import cli as logitcache_cli
    from student_train.cli import cli as train_cli

    flags = ["--storage-options", json.dumps(options)] if options is not None else []
    r = CliRunner(env={**ENV, **(env or {})}).invoke(
        {"logitcache": logitcache_cli, "student-train": train_cli}[cmd], [*map(str, args), *flags])
    return Result(r.exit_code, r.stdout, r.stderr)


@pytest.fixture
def data(tmp_path) -> Path:
    src = tmp_path / "texts.jsonl"
    words = "river stone light garden number seven quiet engine paper window".split()
    src.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % 10] for j in range(4 + i % 6))}) + "\n"
                           for i in range(10)))
    return src


def test_every_command_on_s3(tmp_path, data, tiny_teacher, s3_server):
    url = f"s3://bucket/{uuid.uuid4().hex}/cache"
    capture = ["capture", url, "--mode", "score", "--input", data, "--teacher", tiny_teacher, "--backend", "hf",
               "--samples-per-shard", "4", "--no-progress", "--json"]
    r = run("logitcache", *capture, options=s3_server)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards_written"] == 3
    again = run("logitcache", *capture, options=s3_server)               # resume: nothing written twice
    assert again.returncode == 0 and json.loads(again.stdout)["shards_already_committed"] == 3, again.stderr

    local = tmp_path / "local"
    assert run("logitcache", *[local if a == url else a for a in capture]).returncode == 0
    remote = open_cache(url, storage_options=s3_server)
    assert_caches_equal(remote, open_cache(str(local)))

    r = run("logitcache", "inspect", url, "--verify", "--json", options=s3_server)
    assert r.returncode == 0 and json.loads(r.stdout)["verified_shards"] == 3, r.stderr
    r = run("logitcache", "query", url, "SELECT count(*) AS n FROM samples", "--json", options=s3_server)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["n"] == 10, r.stderr
    sel = tmp_path / "hard.parquet"
    r = run("logitcache", "select", url, "--by", "mean_entropy", "--top-frac", "0.5", "--out", sel, options=s3_server)
    assert r.returncode == 0, r.stderr
    exported = url.replace("/cache", "/hard")
    r = run("logitcache", "export", url, exported, "--selection", sel, "--json", options=s3_server)
    assert r.returncode == 0, r.stderr
    import pyarrow.parquet as pq

    wanted = sorted(pq.read_table(sel)["sample_id"].to_pylist())
    assert sorted(open_cache(exported, storage_options=s3_server).samples["sample_id"].to_pylist()) == wanted

    run_dir = tmp_path / "run"
    r = run("student-train", url, "--out", run_dir, "--keep-layers", "0", "--max-steps", "2", "--seq-len", "32",
            "--batch-size", "2", "--no-progress", options=s3_server)
    assert r.returncode == 0, r.stderr
    saved = json.loads((run_dir / "report.json").read_text())["config"]["storage_options"]
    assert saved == {"key": "***", "secret": "***", "client_kwargs": s3_server["client_kwargs"]}   # no secret written

    # through a local cache layer, the held-out cache too: the same run
    layered = tmp_path / "layered"
    r = run("student-train", f"simplecache::{url}", "--eval-cache", f"filecache::{url}", "--out", layered,
            "--keep-layers", "0", "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--no-progress",
            options=s3_server)
    assert r.returncode == 0, r.stderr
    plain, through = (json.loads((d / "report.json").read_text()) for d in (run_dir, layered))
    assert through["train_samples"] == plain["train_samples"] == 10 and through["eval_samples"] == 10
    assert through["final_train"] == plain["final_train"] and through["eval_end"] is not None


def test_the_environment_variable_stands_in_for_the_flag(tmp_path, data, tiny_teacher, s3_server):
    url = f"s3://bucket/{uuid.uuid4().hex}/cache"
    env = {"LOGITCACHE_STORAGE_OPTIONS": json.dumps(s3_server)}
    r = run("logitcache", "capture", url, "--mode", "score", "--input", data, "--teacher", tiny_teacher, "--backend",
            "hf", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    assert open_cache(url, storage_options=s3_server).manifest.num_samples == 10


@pytest.mark.parametrize("options, message", [
    ("{oops", "error: --storage-options: not JSON"),
    ("[1, 2]", "error: --storage-options: must be a JSON object of fsspec options, got list"),
])
def test_bad_storage_options_are_one_line(options, message):
    for cmd, args in (("logitcache", ["inspect", "s3://bucket/x"]), ("logitcache", ["query", "s3://bucket/x", "SELECT 1"]),
                      ("student-train", ["s3://bucket/x", "--out", "/tmp/never"])):
        r = run(cmd, *args, "--storage-options", options)
        assert r.returncode == 1 and r.stderr.startswith(message) and "Traceback" not in r.stderr, (cmd, r.stderr)


def test_an_unreachable_store_is_one_line_naming_the_cache(s3_server):
    env = {k: None for k in os.environ if k.startswith("AWS_")}          # no credentials anywhere (None: unset)
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent", AWS_EC2_METADATA_DISABLED="true")
    no_keys = {"client_kwargs": s3_server["client_kwargs"]}
    r = run("logitcache", "inspect", "s3://bucket/c", options=no_keys, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: s3://bucket/c: cannot reach the storage (NoCredentialsError"), r.stderr
    assert "--storage-options" in r.stderr


def test_inputs_from_s3_globs_and_compressed_files(tmp_path, tiny_teacher, s3_server):
    """capture --input takes an fsspec URL, a glob and .jsonl.gz / .parquet.bz2 files: the rows read are
    the rows written (the same cache as from the one plain file), in file-name order."""
    import bz2
    import gzip

    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"river stone {i} light garden number {i * 7}" for i in range(9)]
    plain = tmp_path / "all.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "part-0.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts[:4]).encode()))
    (parts / "part-1.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[4:7]))
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts[7:]}), buf)
    (parts / "part-2.parquet.bz2").write_bytes(bz2.compress(buf.getvalue().to_pybytes()))
    base = ["--mode", "score", "--teacher", tiny_teacher, "--backend", "hf", "--samples-per-shard", "4", "--no-progress"]

    want = tmp_path / "want"
    assert run("logitcache", "capture", want, "--input", plain, *base).returncode == 0
    from_glob = tmp_path / "glob"
    r = run("logitcache", "capture", from_glob, "--input", str(parts / "part-*"), *base)
    assert r.returncode == 0, r.stderr
    columns = ["response", "num_tokens", "mean_entropy", "teacher_logprob_sum"]
    expected = open_cache(str(want)).samples.select(columns)
    assert expected["response"].to_pylist() == texts
    assert open_cache(str(from_glob)).samples.select(columns).equals(expected)

    prefix = f"bucket/{uuid.uuid4().hex}"
    fsspec.filesystem("s3", **s3_server).put(str(parts) + "/", f"{prefix}/parts/", recursive=True)
    from_s3 = tmp_path / "from-s3"
    r = run("logitcache", "capture", from_s3, "--input", f"s3://{prefix}/parts/part-*", *base, options=s3_server)
    assert r.returncode == 0, r.stderr
    assert open_cache(str(from_s3)).samples.select(columns).equals(expected)

    r = run("logitcache", "capture", tmp_path / "none", "--input", str(parts / "nothing-*.jsonl"), *base)
    assert r.returncode == 1 and "nothing-*.jsonl: no file matches" in r.stderr and "Traceback" not in r.stderr


# ---- chained URLs: a local cache layer over the store (simplecache::s3://...) -----------------------

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "caches" / "v1.5-compact"   # hidden layer 2


@pytest.fixture
def s3_cache(s3_server) -> str:
    """A committed cache (a regression fixture, copied as it is) at a fresh s3:// prefix."""
    import fsspec

    prefix = f"bucket/{uuid.uuid4().hex}"
    fsspec.filesystem("s3", **s3_server).put(str(FIXTURE) + "/", f"{prefix}/cache/", recursive=True)
    return f"s3://{prefix}/cache"


def tensors(batch: dict) -> dict:
    """A batch's tensors, its typed teacher targets laid out as ``teacher.<field>``."""
    import dataclasses

    import torch

    out = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    t = batch["teacher"]
    out.update({f"teacher.{f.name}": getattr(t, f.name) for f in dataclasses.fields(t) if getattr(t, f.name) is not None})
    return out


def epoch(url: str, options: dict | None) -> list[dict]:
    from student_train.data import CacheStream, make_dataloader

    stream = CacheStream(url, seq_len=12, batch_size=2, seed=3, hidden_layers=[2], storage_options=options)
    return [tensors(b) for b in make_dataloader(stream)]


@pytest.mark.parametrize("layer", ["simplecache", "filecache", "blockcache"])
def test_the_loader_reads_through_a_cache_layer(s3_cache, s3_server, layer):
    """The same batches, element by element, from s3:// and from <layer>::s3:// (flat options reaching the
    s3 layer, and fsspec's per-protocol form), twice: the second epoch served by the layer's copies."""
    import torch

    want = epoch(s3_cache, s3_server)
    assert want and any(int(b["loss_mask"].sum()) for b in want)
    for options in (s3_server, {"s3": s3_server}):
        for _ in range(2):
            got = epoch(f"{layer}::{s3_cache}", options)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.keys() == w.keys()
                for k in w:
                    assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k


@pytest.fixture(scope="module")
def s3_multichunk(s3_server, tmp_path_factory) -> str:
    """A compact cache whose arrays span several Zarr chunks (3 shards, a hidden layer) at an s3:// prefix."""
    import fsspec

    from tests.student.test_loader_identity import write_synthetic

    local = write_synthetic(tmp_path_factory.mktemp("synthetic") / "cache", "compact")
    url = f"s3://bucket/{uuid.uuid4().hex}/cache"
    fsspec.filesystem("s3", **s3_server).put(local + "/", url[len("s3://"):] + "/", recursive=True)
    return url


def test_partial_reads_through_a_cache_layer(s3_multichunk, s3_server):
    """Rows from inside a shard of a cache whose arrays span several chunks: zarr first asks for the
    shard's index as the object's last bytes (a suffix request), which a cache layer's local copy cannot
    count back from; the reader turns it into a range from the listed size. Same rows as from s3://."""
    import numpy as np

    url = s3_multichunk
    plain, layered = (open_cache(u, storage_options=s3_server) for u in (url, f"simplecache::{url}"))
    for s in plain.shards:
        for start, stop in ((3, 9), (s.tokens // 2, s.tokens // 2 + 40), (s.tokens - 5, s.tokens)):
            want, got = plain.read_rows(s.name, start, stop), layered.read_rows(s.name, start, stop)
            assert want.keys() == got.keys() and "hidden/2" in got
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_threads_reading_one_file_through_a_cache_layer_see_it_whole(tmp_path, s3_multichunk, s3_server):
    """fsspec's layers write a file's local copy in place on its first read: threads opening the same
    cold shard at once would read half-written copies (every round failed before reads took the file's
    lock). Each round: a fresh copy directory, six threads, the whole shard, equal to s3://'s."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    shard = open_cache(s3_multichunk, storage_options=s3_server).shards[0]
    want = open_cache(s3_multichunk, storage_options=s3_server).read_rows(shard.name, 0, shard.tokens)
    for round_ in range(2):
        options = {**s3_server, "simplecache": {"cache_storage": str(tmp_path / f"copies-{round_}")}}

        def read(_):
            cache = open_cache(f"simplecache::{s3_multichunk}", storage_options=options)
            return cache.read_rows(shard.name, 0, shard.tokens)

        with ThreadPoolExecutor(6) as pool:
            for got in pool.map(read, range(6)):
                for k in want:
                    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _read_shard_through_layer(url: str, options: dict, shard: str, tokens: int) -> dict:
    """In a process of its own: one shard's rows through a cache layer (copies in a shared directory)."""
    return open_cache(url, storage_options=options).read_rows(shard, 0, tokens)


def test_processes_sharing_one_copy_directory_see_every_file_whole(tmp_path, s3_multichunk, s3_server):
    """Processes that share one cache_storage directory (DataLoader workers, the ranks of a node) and read
    the same cold shard at once: each read takes the file's lock in that directory, so no process reads
    a copy another is still writing. Each round: a fresh directory, four processes, equal to s3://'s."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    shard = open_cache(s3_multichunk, storage_options=s3_server).shards[0]
    want = open_cache(s3_multichunk, storage_options=s3_server).read_rows(shard.name, 0, shard.tokens)
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(abs, range(4)))                                   # started and warm: they read at once
        for round_ in range(3):
            options = {**s3_server, "simplecache": {"cache_storage": str(tmp_path / f"copies-{round_}")}}
            jobs = [pool.submit(_read_shard_through_layer, f"simplecache::{s3_multichunk}", options, shard.name,
                                shard.tokens) for _ in range(4)]
            for job in jobs:
                got = job.result()
                for k in want:
                    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_inspect_query_select_and_export_read_through_a_cache_layer(tmp_path, s3_cache, s3_server):
    """Every reading command answers for simplecache::s3:// what it answers for s3://, and writes nothing
    into the cache (no derived tables: a chained URL is read-only)."""
    import fsspec

    chained = f"simplecache::{s3_cache}"
    fs = fsspec.filesystem("s3", **s3_server)
    before = sorted(fs.find(s3_cache))

    def out(url, *args):
        r = run("logitcache", *args[:1], url, *args[1:], options=s3_server)
        assert r.returncode == 0, r.stderr
        return r.stdout

    inspected = [json.loads(out(u, "inspect", "--json", "--verify")) for u in (s3_cache, chained)]
    assert inspected[0]["verified_shards"] == 2
    assert inspected[1].pop("cache") == chained and inspected[0].pop("cache") == s3_cache
    assert inspected[1] == inspected[0]
    queries = ("SELECT sample_id, num_tokens, mean_entropy FROM samples ORDER BY sample_id",
               "SELECT count(*) AS n, sum(high_entropy_tokens) AS h FROM token_stats")
    through_layer = [out(chained, "query", sql, "--json") for sql in queries]
    assert sorted(fs.find(s3_cache)) == before, "a read through the cache layer wrote into the cache"
    assert through_layer == [out(s3_cache, "query", sql, "--json") for sql in queries]   # (this one stores token_stats)

    sel = tmp_path / "top.parquet"
    out(chained, "select", "--by", "mean_entropy", "--top-frac", "0.5", "--out", sel)
    exported = tmp_path / "exported"
    out(chained, "export", exported, "--selection", sel)
    import pyarrow.parquet as pq

    assert sorted(open_cache(str(exported)).samples["sample_id"].to_pylist()) == sorted(
        pq.read_table(sel)["sample_id"].to_pylist())


def test_the_docs_example_of_a_cache_layer_runs_as_written(tmp_path, s3_server, monkeypatch):
    """docs/distributed.md's simplecache:: example, its credentials and endpoint from the environment."""
    import re

    import fsspec

    text = (Path(__file__).resolve().parents[2] / "docs" / "distributed.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "simplecache::" in b]
    fsspec.filesystem("s3", **s3_server).put(str(FIXTURE) + "/", "bucket/cache/", recursive=True)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["client_kwargs"]["endpoint_url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "docs/distributed.md", "exec"), scope)
    assert scope["batches"] and any(int(b["loss_mask"].sum()) for b in scope["batches"])
    assert len(list((tmp_path / "s3-copies").iterdir())) >= len(scope["cache"].shards)


@pytest.mark.parametrize("url, message", [
    ("nosuchcache::s3://bucket/c", ("error: nosuchcache::s3://bucket/c: unknown file system 'nosuchcache' in the "
                                    "chained URL (cache layers: simplecache::, filecache::, blockcache::, e.g. "
                                    "simplecache::s3://bucket/cache)")),
    ("s3://bucket/c::simplecache", ("error: s3://bucket/c::simplecache: the chained URL ends in 'simplecache', a "
                                    "layer over another file system; it must end in the storage that holds the cache, "
                                    "e.g. simplecache::s3://bucket/cache")),
    ("simplecache::", ("error: simplecache::: an empty layer in the chained URL; it must end in the storage that "
                       "holds the cache, e.g. simplecache::s3://bucket/cache")),
])
def test_a_bad_chained_url_is_one_line_naming_it(url, message):
    for cmd, args in (("logitcache", ["inspect", url]), ("logitcache", ["query", url, "SELECT 1"]),
                      ("student-train", [url, "--out", "/tmp/never"])):
        r = run(cmd, *args)
        assert r.returncode == 1 and r.stderr.strip() == message, (cmd, r.stderr)


def test_writing_through_a_chained_url_is_refused_naming_the_store(tmp_path, data, s3_cache, s3_server):
    """capture, finalize and export destinations refuse a chained URL before writing anything."""
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server)
    new = s3_cache.replace("/cache", "/new")
    refusal = ("error: simplecache::{url}: a chained URL is read-only (its simplecache:: layer would keep serving "
               "its copies of files this command replaces); write to {url} and read it through simplecache::{url}")
    sel = tmp_path / "top.parquet"
    assert run("logitcache", "select", s3_cache, "--by", "mean_entropy", "--top-frac", "0.5", "--out", sel,
               "--no-persist", options=s3_server).returncode == 0
    for args, url in ((["capture", f"simplecache::{new}", "--input", data, "--teacher", tmp_path / "none"], new),
                      (["finalize", f"simplecache::{s3_cache}"], s3_cache),
                      (["export", s3_cache, f"simplecache::{new}", "--selection", sel], new)):
        before = sorted(fs.find(s3_cache))
        r = run("logitcache", *args, options=s3_server)
        assert r.returncode == 1 and r.stderr.strip() == refusal.format(url=url), (args[0], r.stderr)
        assert not fs.exists(new) and sorted(fs.find(s3_cache)) == before
