"""The import graph of ``jscale/``: every import between jscale modules — module-level and inside
functions (a lazy import is still an edge) — points down the floors of :data:`FLOORS`, and there are
no cycles. ``python tests/test_imports.py`` prints the graph, floor by floor, and any violation.

The floors, top to bottom (DESIGN.md's layout; "arrows only point down this list"): a module may
import any module on a lower floor; on its own floor only modules of its own package (``laws.report``
may import ``laws.fitting``; ``growth`` may not import ``hf``). Every package import is an edge to
the package's ``__init__``; a submodule's own package ``__init__`` is not an edge (Python runs it
first, but the submodule does not depend on what it re-exports). Not an edge either: a module
named in a string (``jscale.registry`` imports the built-in families with ``importlib`` on a
lookup that misses, so that a config can be read before anything imported the models).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jscale"

#: Floors from the top down. A pattern ``"laws"`` is the module ``jscale.laws`` and, for a package,
#: every module under it (``jscale.laws.fitting``); the first matching floor wins.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("cli",),                       # the jscale command, experiment scripts (argparse lives here)
    ("sweep",),                     # grids, packing, group execution, results store
    ("train",),                     # the single-run driver
    ("records",),                   # metrics rows, divergence, summaries (both drivers)
    ("core",),                      # the training core both drivers share
    ("growth", "hf"),               # growth operators; Hugging Face checkpoints
    ("presets",),                   # named RunConfigs
    ("models",),                    # families, the LM scaffold, parts, the protocol, sizing
    ("data",),                      # grain pipelines, corpora
    ("tokenize",),                  # tokenizers
    ("optim",),                     # optax chains from config
    ("checkpoint",),                # orbax save/restore
    ("mesh",),                      # device meshes, check_mesh, global batches, multi-host
    ("sharding",),                  # logical-dim rules, specs from names, constrain
    ("laws",),                      # pure math on tables: forms, fitting, uncertainty, plots, report
    ("config",),                    # RunConfig and its sections
    ("registry",),                  # the one registry of model families
    ("configpath", "files"),        # dotted config paths and coercion; atomic files, JSONL, cache
    ("nn",),                        # stateless primitives
)
#: ``jscale/__init__.py`` exports lazily (PEP 562): it sits above every floor.
TOP = "jscale"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the jscale package: dotted name -> file."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or ``module.attribute``) names."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The jscale modules ``name`` imports anywhere in its file (top level, functions, classes,
    ``if TYPE_CHECKING`` blocks)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                   # relative: from . import x
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from jscale import sweep`` imports the module jscale.sweep; ``from jscale.laws
            # import fit`` the attribute of jscale.laws
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            if t == "jscale" or t.startswith("jscale."):
                hit = _resolve(t, known)
                if hit is not None and hit != name:
                    out.add(hit)
    # a submodule's own parent packages are run first but are not a dependency
    return {m for m in out if not name.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def floor_of(module: str) -> int:
    """Index into :data:`FLOORS` (0 is the top); -1 for the lazy top-level ``jscale``."""
    if module == TOP:
        return -1
    rel = module.removeprefix("jscale.")
    for i, floor in enumerate(FLOORS):
        if any(rel == p or rel.startswith(p + ".") for p in floor):
            return i
    raise KeyError(f"{module}: on no floor of FLOORS (add it to the table)")


def _package(module: str) -> str:
    """The top-level name under jscale a module belongs to (``jscale.laws.fit`` -> ``laws``)."""
    return module.removeprefix("jscale.").split(".")[0]


def violations(g: dict[str, set[str]]) -> list[str]:
    """Edges that point up or sideways between packages."""
    bad = []
    for src, dsts in sorted(g.items()):
        fs = floor_of(src)
        for dst in sorted(dsts):
            fd = floor_of(dst)
            if fd > fs or (fd == fs and _package(src) == _package(dst) and fs >= 0):
                continue
            where = "up" if fd < fs else "sideways"
            bad.append(f"{src} -> {dst} ({where}: floor {fs} imports floor {fd})")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


# ---------------------------------------------------------------------------------------------------
# tests


def test_every_module_is_on_a_floor():
    for m in modules():
        floor_of(m)


def test_imports_point_down_the_floors():
    bad = violations(graph())
    assert not bad, "imports against the floors (see FLOORS):\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    """The parser itself: a function-level import is an edge; ``from jscale import x`` names the
    module ``jscale.x``; an attribute import names its module."""
    known = {"jscale.a": tmp_path / "a.py", "jscale.b": tmp_path / "b.py",
             "jscale.c": tmp_path / "c.py", "jscale.pkg": tmp_path / "pkg" / "__init__.py",
             "jscale.pkg.d": tmp_path / "pkg" / "d.py"}
    (tmp_path / "a.py").write_text(
        "from jscale import b\n"
        "def f():\n    from jscale.c import thing\n    import jscale.pkg.d\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "d.py").write_text("from . import x\nfrom jscale.pkg import y\n")
    assert imports_of("jscale.a", known["jscale.a"], known) == {"jscale.b", "jscale.c",
                                                                 "jscale.pkg.d"}
    assert imports_of("jscale.pkg.d", known["jscale.pkg.d"], known) == set()   # its own package
    g = {"jscale.laws": {"jscale.sweep"}, "jscale.sweep": {"jscale.laws"}}
    assert cycles(g) == [["jscale.laws", "jscale.sweep"]]
    up = f"floor {floor_of('jscale.laws')} imports floor {floor_of('jscale.sweep')}"
    assert violations(g) == [f"jscale.laws -> jscale.sweep (up: {up})"]


@pytest.mark.slow
def test_import_laws_loads_no_models_sweep_or_cli():
    """``import jscale.laws`` (and its report and plots) in a fresh interpreter."""
    code = ("import sys, jscale.laws, jscale.laws.report, jscale.laws.plots\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('jscale.sweep', 'jscale.models', "
            "'jscale.cli', 'jscale.train', 'jscale.core', 'jscale.data')))\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def main() -> int:
    g = graph()
    by_floor: dict[int, list[str]] = {}
    for m in g:
        by_floor.setdefault(floor_of(m), []).append(m)
    for i in sorted(by_floor):
        label = "jscale (lazy exports)" if i < 0 else " / ".join(FLOORS[i])
        print(f"floor {i:2d}: {label}")
        for m in sorted(by_floor[i]):
            deps = ", ".join(d.removeprefix("jscale.") for d in sorted(g[m]))
            print(f"    {m.removeprefix('jscale.') or m:28s} -> {deps or '-'}")
    bad, found = violations(g), cycles(g)
    print(f"\n{len(bad)} edge(s) against the floors" + (":" if bad else ""))
    for b in bad:
        print("  " + b)
    print(f"{len(found)} cycle(s)" + (":" if found else ""))
    for c in found:
        print("  " + " <-> ".join(c))
    return 1 if bad or found else 0


if __name__ == "__main__":
    sys.exit(main())
