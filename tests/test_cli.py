"""The command line: help without heavy imports, JSON output, exit codes and messages."""

import json
import subprocess
import sys

from click.testing import CliRunner

from logitcache.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_help_is_instant_and_imports_neither_torch_nor_vllm():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom logitcache.cli.main import cli\n"
            "for args in (['--help'], ['capture', '--help'], ['inspect', '--help'], ['finalize', '--help'],\n"
            "             ['query', '--help'], ['select', '--help'], ['export', '--help'], ['import', '--help']):\n"
            "    r = CliRunner().invoke(cli, args)\n    assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'transformers', 'duckdb', "
            "'zarr')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_capture_help_teaches():
    r = run("capture", "--help")
    for flag in ("--mode", "--top-k", "--hidden-layers", "--num-workers", "--worker-index", "--with-prompt",
                 "--truncate", "--json", "Re-running the same command resumes"):
        assert flag in r.output


def test_capture_then_inspect_json(tmp_path, tiny_teacher, text_file):
    r = run("capture", tmp_path / "c", "--encoding", "topk", "--teacher", tiny_teacher, "--backend", "hf", "--mode", "score", "--input", text_file,
            "--top-k", 4, "--samples-per-shard", 5, "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["samples"], summary["shards_written"], summary["complete"]) == (8, 2, True)
    assert summary["bytes_per_token"]["topk_ids"] > 0
    r = run("inspect", tmp_path / "c", "--json", "--verify", "--plot", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert (s["samples"], s["shards"], s["capture"]["top_k"], s["verified_shards"]) == (8, 2, 4, 2)
    assert s["tokens"] == summary["tokens"] and s["scored_tokens"] == summary["scored_tokens"]
    mass = s["token_stats"]["topk_mass_mean"]
    assert len(mass) == 4 and all(0 < a <= b <= 1 for a, b in zip(mass, mass[1:]))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run("inspect", tmp_path / "c").output
    assert "score mode, top-k 4" in text and "bytes/token" in text and "entropy      mean" in text


def test_cli_errors_have_messages_and_exit_codes(tmp_path, tiny_teacher, text_file):
    r = run("capture", tmp_path / "c", "--encoding", "topk", "--teacher", tiny_teacher, "--backend", "hf", "--mode", "score", "--input", text_file,
            "--text-column", "nope", "--no-progress")
    assert r.exit_code == 1 and "no column 'nope' (given as --text-column)" in r.output
    r = run("capture", tmp_path / "c", "--hidden-layers", "4,x")
    assert r.exit_code == 2 and "expected comma-separated integers" in r.output
    r = run("inspect", tmp_path / "nothing")
    assert r.exit_code == 1 and "no manifest.json here: not a logitcache cache" in r.output
    r = run("capture", tmp_path / "c", "--teacher", tmp_path / "nowhere")
    assert r.exit_code == 1 and "is neither an embedded teacher" in r.output


def test_corrupt_cache_exits_3_naming_the_shard(tmp_path, tiny_teacher, text_file):
    assert run("capture", tmp_path / "c", "--encoding", "topk", "--teacher", tiny_teacher, "--backend", "hf", "--mode", "score", "--input", text_file,
               "--top-k", 4, "--no-progress").exit_code == 0
    parquet = next((tmp_path / "c" / "shards").glob("*/samples.parquet"))
    parquet.write_bytes(parquet.read_bytes()[:-10] + b"0123456789")
    r = run("inspect", tmp_path / "c", "--verify")
    assert r.exit_code == 3 and f"shard '{parquet.parent.name}' is corrupt" in r.output


def test_a_kubernetes_indexed_job_gives_the_index_and_needs_the_count(tmp_path, tiny_teacher, text_file, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    args = ["capture", tmp_path / "c", "--encoding", "topk", "--teacher", tiny_teacher, "--backend", "hf", "--mode", "score",
            "--input", text_file, "--top-k", 4, "--samples-per-shard", 3, "--no-progress", "--json"]
    r = run(*args)
    assert r.exit_code == 2 and "JOB_COMPLETION_INDEX is set" in r.output and "--num-workers" in r.output
    s = json.loads(run(*args, "--num-workers", 2).stdout)
    assert (s["worker_index"], s["num_workers"], s["shards_planned"], s["complete"]) == (1, 2, 1, False)


def test_worker_flags_default_from_the_environment(tmp_path, tiny_teacher, text_file, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r = run("capture", tmp_path / "c", "--encoding", "topk", "--teacher", tiny_teacher, "--backend", "hf", "--mode", "score", "--input", text_file,
            "--top-k", 4, "--samples-per-shard", 3, "--no-progress", "--json")
    s = json.loads(r.stdout)
    assert (s["worker_index"], s["num_workers"], s["shards_planned"], s["complete"]) == (1, 2, 1, False)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    s = json.loads(run("capture", tmp_path / "c", "--encoding", "topk", "--teacher", tiny_teacher, "--backend", "hf", "--mode", "score", "--input",
                       text_file, "--top-k", 4, "--samples-per-shard", 3, "--no-progress", "--json").stdout)
    assert (s["worker_index"], s["shards_planned"], s["complete"]) == (0, 2, True)
    r = run("finalize", tmp_path / "c", "--json")
    assert json.loads(r.stdout)["complete"] is True
