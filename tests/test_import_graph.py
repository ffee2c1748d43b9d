"""The boundaries of the two paths, checked on the import graph (every import statement of every
module, function-level ones included), not by convention:

- the contract (``ctrserve.contract``) imports nothing else of ctrserve;
- the feature store imports only the contract; the gateway (``ctrserve.service``) only the
  contract and the feature store; never ``ctrserve.models`` or ``ctrserve.export``;
- none of them reaches torch or pandas, however indirectly (the serving image has neither);
- only ``models/``, ``export/`` and the command line import torch themselves.
- only ``models/``, ``export/`` and the command line import torch themselves.

Besides these packages, the online path may use the torch-free top-level helpers in ``LEAVES``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"ctrserve": "ctrserve", "ctrserve.models": "models", "ctrserve.service": "service",
           "ctrserve.export": "export", "ctrserve.feature_store": "feature_store",
           "ctrserve.loadtests": "loadtests"}
#: top-level modules of the ``ctrserve`` package the online path may import (settings helpers)
LEAVES = {"ctrserve", "ctrserve.paths", "ctrserve.validation"}
OFFLINE_ONLY = {"torch", "pandas", "onnx", "onnxscript", "sklearn", "matplotlib"}

pytestmark = pytest.mark.quick


def _modules() -> dict[str, Path]:
    """Every module of the project: dotted name -> file."""
    out: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "ctrserve" and parts and parts[0] in ("models", "service", "export", "feature_store",
                                                                "loadtests"):
                continue
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str) -> Iterator[str]:
    """Dotted names imported by module ``name`` (relative imports resolved)."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            # ``from pkg import mod`` imports the submodule ``pkg.mod`` when there is one
            yield from (f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES)


def _project_module(dotted: str) -> str | None:
    """The project module a dotted import name refers to (None for third-party names)."""
    while dotted:
        if dotted in MODULES:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def closure(roots: list[str]) -> tuple[set[str], set[str]]:
    """(project modules, third-party top-level names) reachable from ``roots``."""
    seen: set[str] = set()
    external: set[str] = set()
    todo = list(roots)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for target in _imports(mod):
            internal = _project_module(target)
            if internal is None:
                if not target.startswith("ctrserve"):
                    external.add(target.split(".")[0])
                continue
            todo.append(internal)
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = internal.split(".")
            todo += [".".join(parts[:k]) for k in range(1, len(parts)) if ".".join(parts[:k]) in MODULES]
    return seen, external


def _package(prefix: str) -> list[str]:
    return [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]


@pytest.mark.parametrize(("package", "allowed"), [
    ("ctrserve.contract", {"ctrserve.contract"}),
    ("ctrserve.feature_store", {"ctrserve.contract", "ctrserve.feature_store"}),
    ("ctrserve.service", {"ctrserve.contract", "ctrserve.feature_store", "ctrserve.service"}),
])
def test_online_path_imports_only_the_contract(package: str, allowed: set[str]) -> None:
    modules, external = closure(_package(package))
    stray = sorted(m for m in modules - LEAVES if not any(m == a or m.startswith(a + ".") for a in allowed))
    assert not stray, f"{package} reaches {stray}"
    assert not external & OFFLINE_ONLY, f"{package} reaches {sorted(external & OFFLINE_ONLY)}"
    assert _package(package), f"no modules found for {package}"


def test_only_the_offline_path_and_the_cli_import_torch() -> None:
    """The benchmarks and the online path reach the models through ``ctrserve.export`` (e.g.
    ``export.runtimes``), never by importing torch themselves."""
    cli = {"ctrserve.cli", "ctrserve.demo"}
    direct = sorted(m for m in MODULES if "torch" in {t.split(".")[0] for t in _imports(m)}
                    and not m.startswith(("ctrserve.models", "ctrserve.export")) and m not in cli)
    assert not direct, f"modules outside models/, export/ and the command line import torch: {direct}"


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The closure follows relative and function-level imports (a checker that saw nothing would pass)."""
    modules, external = closure(["ctrserve.models.cli"])
    assert "torch" in external or any(m.startswith("ctrserve.models.train") for m in modules)
    service, _ = closure(["ctrserve.service.app"])
    assert {"ctrserve.service.gateway", "ctrserve.feature_store.redis_store"} <= service
