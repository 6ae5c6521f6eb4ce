"""The package's shape: imports point one way (layers), no import cycle, no reach into another
module's private names. Read from the source with `ast`, function-level imports included (a lazy
import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lower layers never import higher ones; packages of one layer do not import each other
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"root"}),  # reled_hpc/__init__, config (typed-config machinery), errors, finite, text
    frozenset({"sim", "llm", "io", "dist"}),
    frozenset({"learn", "pettingzoo"}),  # pettingzoo.py: the PettingZoo adapter over sim.env; nothing imports it
    frozenset({"expert"}),
    frozenset({"experiment"}),
    frozenset({"analysis", "launch", "bench"}),
    frozenset({"cli"}),
)


def _modules() -> dict[str, Path]:
    mods = {}
    for p in [*(ROOT / "reled_hpc").rglob("*.py"), *(ROOT / "analysis").rglob("*.py")]:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> the package modules it imports; (importer, module, name) of private names imported."""
    edges: dict[str, set[str]] = {}
    private = []
    for m, p in mods.items():
        here = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here[: len(here) - (node.level - 1)]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                targets = []
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.append(full if full in mods else base)
                    if full not in mods and base in mods and a.name.startswith("_") and not a.name.startswith("__"):
                        private.append((m, base, a.name))
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    edges.setdefault(m, set()).add(t)
    return edges, private


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "analysis":
        return "analysis"
    if len(parts) == 1 or parts[1] in ("config", "errors", "finite", "text"):
        return "root"
    return parts[1]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative enough for this size)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_and_no_private_imports():
    mods = _modules()
    assert "reled_hpc.experiment.train" in mods and "reled_hpc.sim.env" in mods
    edges, private = _imports(mods)
    assert _cycles(edges) == []
    assert private == []


def test_imports_point_down_the_layers():
    mods = _modules()
    edges, _ = _imports(mods)
    layer = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}
    packages = {_package(m) for m in mods}
    assert packages <= set(layer), f"packages without a layer: {packages - set(layer)}"
    wrong = [
        (a, b)
        for a, targets in edges.items()
        for b in targets
        if _package(a) != _package(b) and layer[_package(b)] >= layer[_package(a)]
    ]
    assert wrong == []


def test_the_checker_sees_cycles_and_private_imports(tmp_path):
    """The helpers above find what they are for (so an empty result means something)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _package("reled_hpc.sim.env") == "sim" and _package("reled_hpc.errors") == "root"
    assert _package("analysis.load") == "analysis" and _package("reled_hpc.cli") == "cli"
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import _hidden, shown\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    mods = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
    edges, private = _imports(mods)
    assert edges == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}  # the lazy import counts
    assert private == [("pkg.a", "pkg.b", "_hidden")]
