"""`logitcache export --to` and `logitcache import --from`: JSON results, and one-line errors that name the
flag, file or row (exit 1), never a traceback; docs/interop.md's commands run as written."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from logitcache import open_cache
from logitcache.cli.main import cli

from tests.interop.conftest import fixture

DOC = Path(__file__).resolve().parents[2] / "docs" / "interop.md"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_export_then_import_through_the_cli(tokenizer_dir, tmp_path):
    r = run("export", fixture("topk"), tmp_path / "dk", "--to", "distillkit", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["to"] == "distillkit" and out["samples"] == 4 and out["tokens"] == 44
    assert out["bytes_per_token"] == out["bytes"] / 44 and out["options"]["compression_config"]["k"] == 8
    r = run("import", tmp_path / "dk", tmp_path / "back", "--from", "distillkit", "--tokenizer", tokenizer_dir,
            "--samples-per-shard", "3", "--teacher-name", "tiny", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["shards"] == 2
    assert open_cache(str(tmp_path / "back")).manifest.teacher.name == "tiny"
    r = run("inspect", tmp_path / "back")
    assert r.exit_code == 0 and "entropy      not stored" in r.output, r.output
    r = run("export", fixture("compact"), tmp_path / "ax", "--to", "axolotl", "--top-k", "4", "--kd-temperature", "2")
    assert r.exit_code == 0 and "axolotl files of 4 samples, 44 tokens" in r.output, r.output


def test_mistakes_are_one_line_errors_naming_the_flag_file_or_row(tokenizer_dir, tmp_path):
    cases = [
        (["export", fixture("topk"), tmp_path / "a", "--to", "distillkit", "--kd-temperature", "2"],
         "error: --kd-temperature applies to --to axolotl, not distillkit"),
        (["export", fixture("topk"), tmp_path / "a"], "error: --selection: --to logitcache copies a selection"),
        (["export", fixture("topk"), tmp_path / "a", "--top-k", "3", "--selection", "s.parquet"],
         "error: --top-k applies to --to distillkit/axolotl, not logitcache"),
        (["export", fixture("sampled"), tmp_path / "a", "--to", "axolotl"], "its encoding sampled stores unbiased"),
        (["export", fixture("topk"), tmp_path / "a", "--to", "axolotl", "--top-k", "99"], "--top-k must be in 1..8"),
        (["import", tmp_path / "nothing", tmp_path / "a", "--from", "distillkit", "--tokenizer", tokenizer_dir],
         "nothing: no such file or directory"),
        (["import", fixture("topk"), tmp_path / "a", "--from", "distillkit", "--tokenizer", tokenizer_dir,
          "--samples-per-shard", "0"], "--samples-per-shard must be at least 1"),
        (["import", fixture("topk"), tmp_path / "a", "--from", "distillkit", "--tokenizer", tokenizer_dir],
         "no parquet files"),
    ]
    for args, words in cases:
        r = run(*args)
        assert r.exit_code == 1, (args, r.output)
        assert words in r.output and r.output.strip().count("\n") == 0, (args, r.output)
        assert not (tmp_path / "a").exists()
    run("export", fixture("topk"), tmp_path / "dk", "--to", "distillkit")
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "dk" / "data_0.parquet")
    ids = t.column("input_ids").to_pylist()
    ids[1][3] = 10 ** 9
    pq.write_table(t.set_column(0, "input_ids", pa.array(ids, t.schema.field(0).type)), tmp_path / "dk" / "data_0.parquet")
    r = run("import", tmp_path / "dk", tmp_path / "a", "--from", "distillkit", "--tokenizer", tokenizer_dir)
    assert r.exit_code == 1 and r.output.strip().count("\n") == 0
    assert "error: data_0.parquet row 1: input_ids holds 1000000000, outside the tokenizer's 49152 ids" in r.output


def documented_commands() -> list[list[str]]:
    text = re.sub(r"\\\n\s*", " ", DOC.read_text())
    return [shlex.split(line.strip().split(" #")[0])[1:] for line in text.splitlines()
            if line.strip().startswith("logitcache ")]


def test_the_documented_commands_run_as_written(tokenizer_dir, tmp_path, monkeypatch):
    """docs/interop.md's commands, in order, in a directory holding ./cache (a committed topk fixture) and
    ./teacher (its teacher's tokenizer)."""
    commands = documented_commands()
    assert {c[0] for c in commands} >= {"export", "import"} and len(commands) >= 5
    shutil.copytree(fixture("topk"), tmp_path / "cache")
    (tmp_path / "teacher").symlink_to(tokenizer_dir)
    monkeypatch.chdir(tmp_path)
    for args in commands:
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, (args, r.output)
    for name in ("distillkit-data", "axolotl-data"):
        assert (tmp_path / name / ".logitcache" / "export.json").exists()
    back = open_cache("cache-again")
    assert back.samples.column("sample_id").to_pylist() == open_cache("cache").samples.column("sample_id").to_pylist()
    assert np.isnan(back.sample(0)["entropy"]).all()
