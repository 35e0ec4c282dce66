"""Fault injection across the commands (docs/reliability.md lists every fault and what each command does).

Each test damages a copy of a real cache the way storage and people damage caches (a flipped byte in a
chunk, a metadata document or the samples table; a hand-edited manifest; a cache path with glob
characters; names that point outside the cache; two writers racing; a full disk) and checks that
every read path fails naming the shard and the array or file, that nothing outside the cache is
touched, and that nothing is lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from logitcache import open_cache
from logitcache.cli.main import cli as logitcache_cli
from logitcache.format import CorruptShardError
from logitcache.format.manifest import manifest_checksum
from logitcache.teacher.capture import CaptureJob, run_capture

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
         "Water boils at 100 degrees Celsius at sea level.", "Once upon a time there was a small robot.",
         "SELECT name FROM users WHERE age > 30 ORDER BY name;", "Seven times eight is fifty-six.",
         "Photosynthesis turns light, water and carbon dioxide into sugar.", "Paris is the capital of France."]


def run(*args):
    return CliRunner().invoke(logitcache_cli, [str(a) for a in args])


def train_cli(*args):
    from student_train.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args] + ["--no-progress"])


def capture(dest: Path, teacher, data: Path, **kw) -> Path:
    base = dict(cache=str(dest), teacher=str(teacher), backend="hf", mode="score", source=str(data), encoding="topk",
                top_k=4, samples_per_shard=4, progress=False)
    base.update(kw)
    run_capture(CaptureJob(**base))
    return dest


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_teacher, data) -> Path:
    return capture(tmp_path_factory.mktemp("pristine") / "c", tiny_teacher, data)


@pytest.fixture
def cache(pristine, tmp_path) -> Path:
    """A fresh copy to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "c"))


def flip(path: Path, at: int | None = None) -> None:
    """Change one byte, size unchanged."""
    data = bytearray(path.read_bytes())
    at = len(data) // 3 if at is None else at
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def shard_names(cache: Path) -> list[str]:
    return [s["name"] for s in json.loads((cache / "manifest.json").read_text())["shards"]]


def no_traceback(result) -> None:
    assert "Traceback" not in result.output and not (result.exception and not isinstance(result.exception, SystemExit)), \
        result.output


# ---- silent wrong data: reads verify ---------------------------------------------------------------

def test_a_flipped_byte_in_a_chunk_fails_every_read_path_naming_shard_and_array(cache, tmp_path):
    shard = shard_names(cache)[1]
    chunk = cache / "shards" / shard / "arrays.zarr" / "tokens" / "c" / "0"
    flip(chunk, 5)                                  # inside the first chunk's compressed bytes
    named = rf"shard '{shard}' is corrupt: array tokens"
    c = open_cache(str(cache))
    sid = c.samples.filter(__import__("pyarrow.compute").compute.equal(c.samples["shard"], shard))["sample_id"][0].as_py()
    with pytest.raises(CorruptShardError, match=named):
        c.sample(sid)
    r = run("query", cache, "SELECT count(*) FROM tokens WHERE token > 49152")
    assert r.exit_code == 3 and shard in r.output and "array tokens" in r.output, r.output
    no_traceback(r)
    r = run("inspect", cache, "--verify")
    assert r.exit_code == 3 and shard in r.output, r.output
    no_traceback(r)
    r = run("select", cache, "--by", "mean_entropy", "--top-frac", "1", "--out", tmp_path / "all.parquet")
    assert r.exit_code == 0, r.output       # the samples table is intact
    r = run("export", cache, tmp_path / "copy", "--selection", tmp_path / "all.parquet")
    assert r.exit_code == 3 and shard in r.output and not (tmp_path / "copy").exists(), r.output
    r = train_cli(cache, "--out", tmp_path / "run", "--keep-layers", "0", "--seq-len", 32, "--batch-size", 2,
                  "--max-steps", 2, "--eval-frac", 0.3)
    assert r.exit_code == 3 and shard in r.output, r.output
    no_traceback(r)
    # a plain zarr reader detects it too: crc32c is part of the format
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_group(str(cache / "shards" / shard / "arrays.zarr"), mode="r")["tokens"][:]


def test_the_training_stream_and_evaluation_fail_on_a_damaged_chunk(cache):
    from student_train.data import CacheStream

    shard = shard_names(cache)[0]
    flip(cache / "shards" / shard / "arrays.zarr" / "entropy" / "c" / "0", 4)
    stream = CacheStream(str(cache), seq_len=64, batch_size=2, shuffle=False, rank=0, world_size=1)
    with pytest.raises(CorruptShardError, match=rf"shard '{shard}' is corrupt: array entropy"):
        list(stream)


def test_a_damaged_chunk_index_is_an_error_not_missing_chunks(cache):
    shard = shard_names(cache)[0]
    chunk = cache / "shards" / shard / "arrays.zarr" / "topk_logprobs" / "c" / "0" / "0"
    flip(chunk, chunk.stat().st_size - 6)          # inside the shard index at the end of the file
    with pytest.raises(CorruptShardError, match=rf"shard '{shard}' is corrupt: array topk_logprobs"):
        open_cache(str(cache)).read_rows(shard, 0, 5, ["topk_logprobs"])


def test_edited_zarr_metadata_is_refused_before_any_value_is_read(cache):
    shard = shard_names(cache)[0]
    meta = cache / "shards" / shard / "arrays.zarr" / "tokens" / "zarr.json"
    text = meta.read_text()
    assert '"fill_value": 0' in text
    meta.write_text(text.replace('"fill_value": 0', '"fill_value": 7', 1))      # same size
    with pytest.raises(CorruptShardError, match=rf"shard '{shard}' is corrupt: its Zarr metadata"):
        open_cache(str(cache)).read_rows(shard, 0, 3, ["tokens"])


def test_a_damaged_samples_table_fails_queries_training_and_the_reader(cache, tmp_path):
    shard = shard_names(cache)[0]
    flip(cache / "shards" / shard / "samples.parquet", 200)
    with pytest.raises(CorruptShardError, match=rf"shard '{shard}' is corrupt: samples.parquet has checksum"):
        open_cache(str(cache)).samples
    r = run("query", cache, "SELECT sample_id, response FROM samples")
    assert r.exit_code == 3 and shard in r.output, r.output
    r = run("select", cache, "--by", "mean_entropy", "--top-frac", "0.5", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 3 and not (tmp_path / "s.parquet").exists(), r.output
    no_traceback(r)


def test_a_damaged_derived_table_is_recomputed_not_used(cache):
    assert run("query", cache, "SELECT count(*) AS n FROM tokens").exit_code == 0
    m = json.loads((cache / "manifest.json").read_text())
    (rec,) = m["derived"]
    target = cache / rec["files"][0]["path"]
    flip(target, 100)
    want = open_cache(str(cache)).sample(0)["tokens"].tolist()
    r = run("query", cache, "SELECT token FROM tokens ORDER BY sample_id, position", "--json")
    assert r.exit_code == 0
    c = open_cache(str(cache))
    first = c.samples["sample_id"][0].as_py()
    got = json.loads(run("query", cache, f"SELECT token FROM tokens WHERE sample_id = '{first}' ORDER BY position",
                         "--json").stdout)
    assert [x["token"] for x in got] == want


def test_a_shard_of_an_earlier_format_is_verified_whole_on_first_read(tmp_path):
    legacy = Path(shutil.copytree(Path(__file__).parent / "fixtures" / "caches" / "v1.2-topk", tmp_path / "c"))
    shard = shard_names(legacy)[1]
    flip(legacy / "shards" / shard / "arrays.zarr" / "tokens" / "c" / "0", 3)
    c = open_cache(str(legacy))
    with pytest.raises(CorruptShardError, match=rf"shard '{shard}' is corrupt: checksum"):
        c.read_rows(shard, 0, 2, ["entropy"])      # another array of the shard: the whole shard is checked
    r = run("query", legacy, "SELECT count(*) FROM samples")
    assert r.exit_code == 3 and shard in r.output, r.output


# ---- the manifest is not trusted blindly ------------------------------------------------------------

def edit_manifest(cache: Path, edit, resign: bool) -> None:
    path = cache / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    if resign:
        m["checksum"] = manifest_checksum(m)
    path.write_text(json.dumps(m, indent=1))


@pytest.mark.parametrize("what, edit", [
    ("encoding.lo", lambda m: m["capture"]["encoding"].update(lo=-8.0)),
    ("dropped shard", lambda m: m["shards"].pop()),
    ("shard twice", lambda m: m["shards"].append(m["shards"][0])),
    ("tokens count", lambda m: m["shards"][0].update(tokens=m["shards"][0]["tokens"] - 3)),
])
def test_a_hand_edited_manifest_is_refused(tmp_path, tiny_teacher, data, what, edit):
    cache = capture(tmp_path / "c", tiny_teacher, data, encoding="compact", top_k=8)
    edit_manifest(cache, edit, resign=False)
    r = run("inspect", cache, "--verify")
    assert r.exit_code == 3 and "manifest.json: checksum" in r.output and "does not match its content" in r.output
    r = train_cli(cache, "--out", tmp_path / "run", "--keep-layers", "0", "--max-steps", 1)
    assert r.exit_code == 3 and "manifest.json: checksum" in r.output
    assert not (tmp_path / "run").exists()


def test_consistent_looking_edits_are_still_caught(tmp_path, tiny_teacher, data, pristine):
    """An editor who recomputes the checksum: the records must still agree with the shards."""
    cache = Path(shutil.copytree(pristine, tmp_path / "a"))
    edit_manifest(cache, lambda m: (m["shards"][0].update(tokens=m["shards"][0]["tokens"] - 3),
                                    m["totals"].update(tokens=m["totals"]["tokens"] - 3)), resign=True)
    r = run("inspect", cache, "--verify")
    assert r.exit_code == 3 and "the manifest records" in r.output, r.output
    with pytest.raises(CorruptShardError, match=r"bytes on storage|manifest records"):
        open_cache(str(cache)).samples
    cache = Path(shutil.copytree(pristine, tmp_path / "b"))
    edit_manifest(cache, lambda m: m["shards"].append(m["shards"][0]), resign=True)
    r = run("query", cache, "SELECT count(*) FROM samples")
    assert r.exit_code == 3 and "is listed twice" in r.output
    cache = Path(shutil.copytree(pristine, tmp_path / "d"))
    edit_manifest(cache, lambda m: (m["shards"].pop(), m.pop("totals")), resign=True)
    r = run("query", cache, "SELECT count(*) FROM samples")
    assert r.exit_code == 3 and "marked complete but 1 planned shard(s) are not listed" in r.output
    # a changed encoding parameter changes the fingerprint: selections, derived tables and checkpoints
    # made before are refused
    compact = capture(tmp_path / "e", tiny_teacher, data, encoding="compact", top_k=8)
    assert run("select", compact, "--by", "mean_entropy", "--top-frac", "1", "--out", tmp_path / "s.parquet").exit_code == 0
    edit_manifest(compact, lambda m: m["capture"]["encoding"].update(lo=-8.0), resign=True)
    r = run("export", compact, tmp_path / "x", "--selection", tmp_path / "s.parquet")
    assert r.exit_code == 1 and "was made from another cache" in r.output


# ---- paths are literal and stay inside the cache ---------------------------------------------------

def test_a_cache_path_with_glob_characters_is_itself(tmp_path, tiny_teacher, data):
    """``misc/g[1]`` beside ``misc/g1``, holding other texts under the same input name (so the same
    sample ids and shard names): a glob would read the neighbour's files and answer with its texts."""
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("".join(json.dumps({"text": f"the neighbour's text {i}"}) + "\n" for i in range(8)))
    other = capture(tmp_path / "misc" / "g1", tiny_teacher, theirs, source_name=data.name)
    mine = capture(tmp_path / "misc" / "g[1]", tiny_teacher, data)
    assert shard_names(other) == shard_names(mine)
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    r = run("query", mine, "SELECT response FROM samples ORDER BY row", "--json")
    assert r.exit_code == 0 and [x["response"] for x in json.loads(r.stdout)] == TEXTS, r.output
    want = open_cache(str(mine)).samples["num_tokens"].to_pylist()
    r = run("query", mine, "SELECT sample_id, count(*) AS n FROM tokens GROUP BY 1 ORDER BY min(position), 1",
            "--json")
    assert r.exit_code == 0 and sorted(x["n"] for x in json.loads(r.stdout)) == sorted(want), r.output
    r = run("select", mine, "--by", "num_tokens", "--top-frac", "1", "--out", tmp_path / "sel[1].parquet")
    assert r.exit_code == 0, r.output
    r = run("export", mine, tmp_path / "misc" / "out[1]", "--selection", tmp_path / "sel[1].parquet")
    assert r.exit_code == 0 and open_cache(str(tmp_path / "misc" / "out[1]")).manifest.num_samples == 8
    from logitcache.store.fs import CacheFS

    CacheFS(str(mine)).remove("derived")            # a removal inside g[1] never reaches g1
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_names_from_a_manifest_never_reach_outside_the_cache(tmp_path, pristine):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    cache = Path(shutil.copytree(pristine, tmp_path / "deep" / "c"))
    edit_manifest(cache, lambda m: m.update(derived=[{"name": "tokens", "params": {}, "columns": [],
                                                      "cache_fingerprint": "stale", "created_by": "",
                                                      "files": [{"path": "../../victim", "rows": 1, "bytes": 1,
                                                                 "checksum": "x"}]}]), resign=True)
    r = run("query", cache, "SELECT count(*) FROM tokens")
    assert r.exit_code == 3 and "'../../victim' is not a valid derived file" in r.output
    cache2 = Path(shutil.copytree(pristine, tmp_path / "deep" / "c2"))

    def rename_input(m):
        key = m["inputs"][0]["key"]
        m["inputs"][0]["key"] = "../../victim"
        for s in m["shards"]:
            s["input_key"], s["name"] = "../../victim", s["name"].replace(key, "../../victim")
    edit_manifest(cache2, rename_input, resign=True)
    r = run("export", cache2, tmp_path / "deep" / "out", "--selection", tmp_path / "nothing.parquet")
    assert r.exit_code == 3 and "is not a valid input key" in r.output
    assert (victim / "precious.txt").read_text() == "keep me" and sorted(os.listdir(victim)) == ["precious.txt"]


def test_sql_reads_nothing_but_the_cache(cache):
    from logitcache.query.engine import run_query
    from logitcache.query.errors import QueryError

    for sql in ("SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_text('/etc/hostname')",
                "SELECT * FROM glob('/root/**')", f"SELECT * FROM read_parquet('{cache}/../**/*.parquet')"):
        r = run("query", cache, sql)
        assert r.exit_code == 1 and "reading other files is disabled" in r.output, (sql, r.output)
        with pytest.raises(QueryError, match="reading other files is disabled"):
            run_query(open_cache(str(cache)), sql)
    assert run("query", cache, "SELECT count(*) FROM tokens").exit_code == 0   # the cache's own files


# ---- writers that race -----------------------------------------------------------------------------

def test_a_query_recording_a_derived_table_never_loses_a_finalize(tmp_path, tiny_teacher, data):
    """The lost update of issue 12: a query's read-modify-write of manifest.json stretched to 3 s while
    a finalize merges another input's shards. Both updates must survive."""
    cache = capture(tmp_path / "c", tiny_teacher, data)                  # 8 samples, finalized
    second = tmp_path / "more.jsonl"
    second.write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in TEXTS))
    # input 2, worker 0 of 2: its shard is committed in its part, the manifest does not list it yet
    capture(cache, tiny_teacher, second, num_workers=2, worker_index=0)
    assert open_cache(str(cache)).manifest.num_samples == 8
    env = {**os.environ, "LOGITCACHE_FAULT": "slow-manifest-update:3", "PYTHONPATH": str(Path.cwd())}
    query = subprocess.Popen([sys.executable, "-m", "logitcache.cli.main", "query", str(cache),
                              "SELECT count(*) FROM token_stats"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)                          # the query holds the lock, between its read and its write
    fin = subprocess.run([sys.executable, "-m", "logitcache.cli.main", "finalize", str(cache), "--allow-incomplete"],
                         env={**env, "LOGITCACHE_FAULT": ""}, capture_output=True, text=True, timeout=120)
    out, _ = query.communicate(timeout=120)
    assert query.returncode == 0 and fin.returncode == 0, (out, fin.stderr)
    c = open_cache(str(cache), verify=True)
    assert c.manifest.num_samples == 12          # 8 + the 4 of input 2's committed shard
    assert {i.source_name for i in c.manifest.inputs} == {"texts.jsonl", "more.jsonl"}


def test_two_captures_with_one_worker_index_cannot_interleave(tmp_path, tiny_teacher, data):
    from logitcache.store.fs import CacheFS
    from logitcache.store.lock import CacheLock, part_lock_name

    held = CacheLock(CacheFS(str(tmp_path / "c")), part_lock_name(0), "x").acquire(0)
    try:
        r = run("capture", tmp_path / "c", "--teacher", tiny_teacher, "--backend", "hf", "--mode", "score",
                "--input", data, "--no-progress")
        assert r.exit_code == 1 and "worker 0's part manifest is being written by pid" in r.output, r.output
    finally:
        held.release()


# ---- failures that must be clean -----------------------------------------------------------------

def test_a_file_given_as_the_cache_path(tmp_path):
    f = tmp_path / "not-a-cache"
    f.write_text("x")
    for args in (("inspect", f), ("query", f, "SELECT 1"), ("finalize", f)):
        r = run(*args)
        assert r.exit_code == 1 and f"{f} is a file, not a cache directory" in r.output, (args, r.output)
        no_traceback(r)


def test_a_truncated_shard_file_in_plain_inspect(cache):
    shard = shard_names(cache)[0]
    chunk = cache / "shards" / shard / "arrays.zarr" / "entropy" / "c" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[:10] + bytes(len(data) - 10))     # zeros, same size: undecodable
    r = run("inspect", cache)
    assert r.exit_code == 3 and shard in r.output and "entropy" in r.output, r.output
    no_traceback(r)


def test_a_full_disk_during_capture_is_a_clean_error_and_leaves_no_temporary_files(tmp_path, tiny_teacher, data):
    """RLIMIT_FSIZE stands in for a full disk without privileges: writes past it fail with EFBIG."""
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))
from logitcache.cli.main import cli
sys.argv = ["logitcache", "capture", {str(tmp_path / 'c')!r}, "--teacher", {str(tiny_teacher)!r}, "--backend", "hf",
            "--mode", "score", "--input", {str(data)!r}, "--no-progress", "--encoding", "topk", "--top-k", "64",
            "--samples-per-shard", "8"]
cli()
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert p.returncode == 1 and "error: " in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "File too large" in p.stderr or "No space left" in p.stderr, p.stderr
    leftovers = [q for q in (tmp_path / "c").rglob("*") if ".tmp-" in q.name]
    assert not leftovers, leftovers


def test_finalize_removes_stale_temporary_files(cache):
    old = time.time() - 7200
    for rel in ("manifest.json.tmp-aaaa", "parts/worker-00000.json.tmp-bbbb", "derived/x.parquet.tmp-cccc"):
        p = cache / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
        os.utime(p, (old, old))
    young = cache / "parts" / "worker-00000.json.tmp-dddd"
    young.write_bytes(b"a writer is on it")
    assert run("finalize", cache).exit_code == 0
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if ".tmp-" in p.name) == \
        ["parts/worker-00000.json.tmp-dddd"]
    open_cache(str(cache), verify=True)


def _unshare_available() -> bool:
    """A private mount namespace (``unshare -rm``): a real read-only or full filesystem without root."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_available(), reason="needs `unshare -rm` (user + mount namespaces) to mount a "
                                                     "read-only and a tiny filesystem without root")
def test_read_only_and_full_filesystems_are_clean_errors(tmp_path, tiny_teacher, data, pristine):
    """Inside a private mount namespace: a read-only tmpfs and a 32 KiB one (a real ENOSPC)."""
    ro, small = tmp_path / "ro", tmp_path / "small"
    ro.mkdir()
    small.mkdir()
    shutil.copy(data, tmp_path / "texts.jsonl")
    py = f"PYTHONPATH={Path.cwd()} {sys.executable}"
    capture_args = (f"--teacher {tiny_teacher} --backend hf --mode score --input {tmp_path / 'texts.jsonl'} "
                    "--encoding topk --top-k 64 --samples-per-shard 8 --no-progress")
    script = f"""
mount -t tmpfs -o ro tmpfs {ro} && mount -t tmpfs -o size=32k tmpfs {small} || exit 99
{py} -m logitcache.cli.main capture {ro}/c {capture_args} 2> {tmp_path}/ro-capture.err; echo "ro-capture $?"
{py} -m logitcache.cli.main query {pristine} "SELECT sample_id FROM samples" --out {ro}/s.parquet \\
    2> {tmp_path}/ro-query.err; echo "ro-query $?"
{py} -m student_train.cli {pristine} --out {ro}/run --keep-layers 0 --max-steps 1 --seq-len 32 --no-progress \\
    2> {tmp_path}/ro-train.err; echo "ro-train $?"
{py} -m logitcache.cli.main capture {small}/c {capture_args} 2> {tmp_path}/full-capture.err; echo "full-capture $?"
find {small} -name '*.tmp-*' | wc -l | sed 's/^/full-leftovers /'
"""
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode != 99, r.stderr
    codes = dict(line.split() for line in r.stdout.splitlines() if line.split()[0] in
                 ("ro-capture", "ro-query", "ro-train", "full-capture", "full-leftovers"))
    assert codes == {"ro-capture": "1", "ro-query": "1", "ro-train": "1", "full-capture": "1",
                     "full-leftovers": "0"}, (codes, r.stdout, [(tmp_path / f).read_text()[-800:] for f in
                                                               ("ro-capture.err", "ro-query.err", "ro-train.err",
                                                                "full-capture.err")])
    for name, what in (("ro-capture", "Read-only file system"), ("ro-query", "Read-only file system"),
                       ("ro-train", "Read-only file system"), ("full-capture", "No space left on device")):
        err = (tmp_path / f"{name}.err").read_text()
        assert f"error: {what}" in err and "Traceback" not in err, (name, err)


def test_every_test_docs_reliability_cites_exists():
    """docs/reliability.md names the test behind each fault: each must exist, in the file it says."""
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    tests_dir = Path(__file__).resolve().parent
    cited = re.findall(r"`(?:(test_\w+)\.py::)?(test_\w+)`", doc)
    assert len(cited) > 30
    everything: dict[str, str] = {}         # by module name; two folders may hold one (test_cli.py)
    for p in tests_dir.rglob("test_*.py"):
        everything[p.stem] = everything.get(p.stem, "") + p.read_text()
    for module, name in cited:
        where = [module] if module else list(everything)
        assert any(f"def {name}(" in everything.get(m, "") for m in where), f"docs/reliability.md cites {module}::{name}"
