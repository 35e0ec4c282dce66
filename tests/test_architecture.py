"""The architecture, checked from the source: imports point down the layers, no module imports another
in a circle (lazy imports inside functions included), no module uses another's ``_private`` names,
nothing outside ``format/encodings/`` branches on an encoding's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("logitcache", "student_train")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


MODULES = modules()


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module of ours or a third-party name, names imported, line) of every import, lazy ones
    included."""
    path = MODULES[module]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                full = f"{target}.{a.name}"
                out.append((full if full in MODULES else target, [a.name], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
    return out


def ours(target: str) -> str | None:
    while target and target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target if target in MODULES else None


def graph() -> dict[str, set[str]]:
    return {m: {t for t in (ours(i[0]) for i in imports(m)) if t and t != m} for m in MODULES}


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = "open"
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack + [v])
        state[u] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# (layer, the layers of ours it may import, third-party modules it may import: None = any)
LAYERS = [
    ("logitcache.format", ("logitcache.format",), {"numpy", "pyarrow", "zarr", "numcodecs"}),
    ("logitcache.store", ("logitcache.format", "logitcache.store", "logitcache"), None),
    ("student_train", ("logitcache.format", "logitcache.store", "logitcache.query", "logitcache", "student_train"),
     None),
    # other tools' caches in and out: beside query, on the format and the store; never the teacher or a trainer
    ("logitcache.interop", ("logitcache.format", "logitcache.store", "logitcache.query", "logitcache.interop",
                            "logitcache"), None),
]
STDLIB_ROOTS = {"__future__", "hashlib", "json", "dataclasses", "typing", "math", "re", "posixpath", "os", "io",
                "enum", "functools", "collections", "itertools", "uuid", "time", "socket", "contextlib", "types"}


@pytest.mark.parametrize("layer, may_import, third_party", LAYERS, ids=[x[0] for x in LAYERS])
def test_imports_point_down_the_layers(layer, may_import, third_party):
    bad = []
    for m in MODULES:
        if m != layer and not m.startswith(layer + "."):
            continue
        for target, _, line in imports(m):
            mine = ours(target)
            if mine is not None:
                if not any(mine == a or mine.startswith(a + ".") for a in may_import):
                    bad.append(f"{m}:{line} imports {mine}")
            elif third_party is not None and target.split(".")[0] not in third_party | STDLIB_ROOTS:
                bad.append(f"{m}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_module_uses_another_modules_private_names():
    bad = [f"{m}:{line} imports {target}.{name}" for m in MODULES for target, names, line in imports(m)
           for name in names if name.startswith("_") and not name.startswith("__") and ours(target)]
    assert not bad, "\n".join(bad)


def test_nothing_outside_the_encodings_branches_on_an_encoding_name():
    from logitcache.format.encodings import names

    found = []
    for m, path in MODULES.items():
        if m.startswith("logitcache.format.encodings"):
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        found += [f"{m}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in set(names()) and id(n) not in docs]
    assert not found, "\n".join(found)
