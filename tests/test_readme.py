"""README's Python example runs as written, on a cache at ./cache (a committed 1.3 compact fixture)."""

import re
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "caches" / "v1.3-compact"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert blocks, "README.md has no python example"
    shutil.copytree(FIXTURE, tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
    # what the comments say it returns
    assert {"tokens", "entropy", "dist/counts", "dist/ids", "dist/codes", "dist/tail"} <= set(scope["arrays"])
    view = scope["view"]
    assert {"tokens", "entropy", "ids", "probs", "tail"} <= set(view)
    np.testing.assert_array_equal(view["tokens"], scope["arrays"]["tokens"])
