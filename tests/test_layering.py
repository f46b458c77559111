"""The package's layering, read from the code's own imports (AST: every import, also inside functions and under
TYPE_CHECKING), and its module size limit.

Parts are the packages and top-level modules of csi_driver. Each may import only the parts ALLOWED names; no
cycle between parts; the engine imports no gRPC and no Kubernetes; no hand-written module is over MAX_LINES.
The checker is also run on a small synthetic package, so a forbidden import is shown to fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "csi_driver"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 800
GENERATED = {"proto_gen"}

#: part -> the parts it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "engine": set(),
    "api": {"engine"},
    "status": {"engine"},
    "logs": set(),
    "sockets": set(),
    "proto_gen": set(),
    "embedded": {"api", "engine"},
    "csi": {"api", "engine", "status", "proto_gen", "logs"},
    "datapath": {"api", "engine"},
    "remote": {"api", "engine", "status", "proto_gen", "embedded", "datapath", "sockets", "logs", "k8s",
               "metrics"},
    "metrics": {"engine", "datapath"},
    "k8s": {"api", "engine", "logs"},
    "demo": {"engine"},
    "server": {"api", "engine", "status", "proto_gen", "embedded", "datapath", "remote", "csi", "sockets",
               "logs", "k8s", "ops", "metrics"},
    "ops": {"api", "engine", "status", "csi", "k8s", "embedded", "remote", "logs"},
    "cli": {"server", "remote", "k8s", "demo", "logs", "engine", "api", "ops"},
    "__main__": {"cli"},
    "__init__": set(),
}
#: third-party packages a part must not import
FORBIDDEN_LIBS: dict[str, set[str]] = {
    "engine": {"grpc", "kubernetes", "google"},
    "api": {"grpc", "kubernetes", "google"},
    "datapath": {"grpc", "kubernetes"},
    "csi": {"kubernetes"},
}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    names = list(rel.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def _is_part(root: Path, name: str) -> bool:
    return (root / name).is_dir() or (root / f"{name}.py").is_file()


def imports_of(root: Path, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(root, path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == PACKAGE:  # `from csi_driver import engine` names a part; `__version__` is the package's
                found += [(f"{PACKAGE}.{a.name}" if _is_part(root, a.name) else PACKAGE, node.lineno)
                          for a in node.names]
            else:
                found.append((mod, node.lineno))
    return found


def check(root: Path, allowed: dict[str, set[str]], forbidden_libs: dict[str, set[str]]) -> list[str]:
    """Every layering violation in the package at root, as readable lines (empty = clean)."""
    problems: list[str] = []
    edges: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        mod = _module_name(root, path)
        src = _part(mod)
        if src is None or src in GENERATED:
            continue
        where = f"{path.relative_to(root.parent)}"
        if src not in allowed:
            problems.append(f"{where}: part {src!r} has no layering rule")
            continue
        for target, line in imports_of(root, path):
            dst = _part(target)
            lib = target.split(".")[0]
            if dst is None:
                if lib in forbidden_libs.get(src, set()):
                    problems.append(f"{where}:{line}: {src} must not import {lib} ({target})")
                continue
            if dst == src:
                continue
            edges.setdefault(src, set()).add(dst)
            if dst != "__init__" and dst not in allowed[src]:
                problems.append(f"{where}:{line}: {src} must not import {dst} ({target})")
    problems += [f"import cycle between parts: {' -> '.join(c)}" for c in _cycles(edges)]
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if m == "__init__":
                continue
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    return found


def test_layers_point_one_way() -> None:
    problems = check(ROOT, ALLOWED, FORBIDDEN_LIBS)
    assert problems == [], "\n".join(problems)


def test_no_hand_written_module_over_the_limit() -> None:
    big = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
           if not set(p.relative_to(ROOT).parts) & GENERATED and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}, f"modules over {MAX_LINES} lines: {big}"


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / PACKAGE
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


@pytest.mark.parametrize("files, expected", [
    # an upward import inside a function is still an import
    ({"engine/__init__.py": "", "engine/core.py": "def f():\n    from csi_driver.csi import x\n",
      "csi/__init__.py": "from csi_driver.engine import core\n"},
     ["csi_driver/engine/core.py:2: engine must not import csi (csi_driver.csi)",
      "import cycle between parts: csi -> engine -> csi"]),
    # under TYPE_CHECKING, and relative
    ({"datapath/__init__.py": "", "datapath/node.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
      "    from ..csi import backend\n", "csi/__init__.py": "", "csi/backend.py": ""},
     ["csi_driver/datapath/node.py:3: datapath must not import csi (csi_driver.csi)"]),
    # a forbidden library, and `from csi_driver import part`
    ({"engine/__init__.py": "import grpc\n", "datapath/__init__.py": "from csi_driver import remote\n",
      "remote/__init__.py": ""},
     ["csi_driver/datapath/__init__.py:1: datapath must not import remote (csi_driver.remote)",
      "csi_driver/engine/__init__.py:1: engine must not import grpc (grpc)"]),
    ({"engine/__init__.py": "import os\n", "csi/__init__.py": "from csi_driver.engine import x\n"}, []),
])
def test_the_checker_catches_forbidden_imports(tmp_path: Path, files: dict[str, str], expected: list[str]) -> None:
    assert check(_write(tmp_path, files), ALLOWED, FORBIDDEN_LIBS) == expected
