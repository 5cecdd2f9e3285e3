"""Import layering of src/torchrpc, checked statically (no processes, nothing imported).

Every module of the package is parsed with :mod:`ast` and its imports of torchrpc
modules are collected, wherever they are (also inside functions), except those in an
``if TYPE_CHECKING:`` block. Importing ``torchrpc.a.b`` also runs
``torchrpc/a/__init__.py``, so it counts as an import of ``torchrpc.a`` too (but not
of ``torchrpc`` itself, which every import runs, nor of a package the importing
module is itself inside, which has already run by then).

The tests check that this graph has no cycle and that every import goes to the
same layer or a lower one, as given by :data:`LAYERS` below.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

# --------------------------------------------------------------------------
# The layer table (edit here). Lowest layer first; a module may import from
# its own layer and the ones below it, never from a higher one.
# --------------------------------------------------------------------------

BASE, PROTOCOL, RUNTIME, SERVICES, AGENT, PUBLIC = range(6)
LAYER_NAMES = ["base", "protocol", "runtime", "services", "agent", "public API"]

#: Module name (dotted) or package prefix ("pkg.*": the package and everything
#: under it) -> layer. An exact name wins over a prefix; a longer prefix wins.
LAYERS: dict[str, int] = {
    # 0 base
    "torchrpc.errors": BASE,
    "torchrpc.worker_info": BASE,
    "torchrpc.options": BASE,
    "torchrpc.transport.*": BASE,
    "torchrpc.rendezvous": BASE,
    "torchrpc.group": BASE,
    "torchrpc.job_secret": BASE,
    "torchrpc.protocol.tensor_codec": BASE,
    "torchrpc.protocol.sparse": BASE,
    "torchrpc.futures": BASE,
    "torchrpc.functions": BASE,
    "torchrpc.profiler_sessions": BASE,
    # 1 protocol (sans-I/O)
    "torchrpc.protocol.*": PROTOCOL,
    "torchrpc.serialization": PROTOCOL,
    "torchrpc.profiling": PROTOCOL,
    "torchrpc.remote_events": PROTOCOL,
    # 2 runtime
    "torchrpc.runtime.*": RUNTIME,
    # 3 services
    "torchrpc.services.*": SERVICES,
    # 4 agent
    "torchrpc.agent": AGENT,
    "torchrpc.current": AGENT,
    # 5 public API
    "torchrpc": PUBLIC,
    "torchrpc.api": PUBLIC,
    "torchrpc.internal": PUBLIC,
    "torchrpc.rref": PUBLIC,
    "torchrpc.autograd.*": PUBLIC,
    "torchrpc.optim": PUBLIC,
    "torchrpc.nn": PUBLIC,
    "torchrpc.demo": PUBLIC,
    "torchrpc.__main__": PUBLIC,
    "torchrpc.bench.*": PUBLIC,
}

TOP = "torchrpc"
SRC = Path(__file__).resolve().parent.parent / "src"


# --------------------------------------------------------------------------
# The walker
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Import:
    """One edge of the import graph: ``source`` imports ``target`` at ``where``."""

    source: str
    target: str
    where: str  # "path:line[,line...]"
    via_parent: bool = False  # the edge is to a package whose __init__ the import runs

    def __str__(self) -> str:
        how = " (package __init__ run by the import)" if self.via_parent else ""
        return f"{self.source} -> {self.target}{how} at {self.where}"


def find_modules(src_root: Path, top: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of package ``top`` under ``src_root``."""
    modules = {}
    for path in sorted((src_root / top).rglob("*.py")):
        parts = list(path.relative_to(src_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``<anything>.TYPE_CHECKING``."""
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


class _ImportCollector(ast.NodeVisitor):
    """Collects what a module imports, skipping ``if TYPE_CHECKING:`` bodies.

    ``found`` holds ``(module, line, direct)``: ``direct`` is False where the module is
    only a package whose ``__init__`` runs (``pkg`` in ``from pkg import submodule``).
    """

    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.found: list[tuple[str, int, bool]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for stmt in node.orelse:  # the else branch does run
                self.visit(stmt)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, node.lineno, True))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".")
            if node.level > 1:
                base_parts = base_parts[:-(node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in self.known]
        self.found += [(sub, node.lineno, True) for sub in subs]
        # ``base`` itself is only run, unless a name is taken from it.
        self.found.append((base, node.lineno, len(subs) < len(node.names)))


def _parents(module: str) -> list[str]:
    """``a.b.c`` -> ``["a.b", "a"]``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def import_graph(src_root: Path, top: str) -> dict[str, list[Import]]:
    """Module -> its imports of other modules of ``top`` (see the module docstring for the rules)."""
    modules = find_modules(src_root, top)
    known = set(modules)
    graph: dict[str, list[Import]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        collector = _ImportCollector(module, path.name == "__init__.py", known)
        collector.visit(tree)
        already_run = {module, *_parents(module)}  # packages that ran before this module
        lines: dict[str, list[int]] = {}  # target -> lines that import it
        via_parent: dict[str, bool] = {}  # target -> only ever as a parent package
        for name, line, direct in collector.found:
            if name not in known:
                continue  # another distribution, or a name that is not a module
            targets = [(name, False)] if direct and name != module else []
            targets += [(package, True) for package in ([] if direct else [name]) + _parents(name)
                        if package != top and package not in already_run]
            for target, parent in targets:
                if line not in lines.setdefault(target, []):
                    lines[target].append(line)
                via_parent[target] = via_parent.get(target, True) and parent
        rel = path.relative_to(src_root.parent)
        graph[module] = [Import(module, t, f"{rel}:{','.join(map(str, sorted(lines[t])))}", via_parent[t])
                         for t in sorted(lines)]
    return graph


def find_cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Cycles (``[a, b, ..., a]``) that between them use every edge that lies on a cycle.

    For each edge u -> v inside a strongly connected component: u, then the shortest
    path from v back to u.
    """
    succ = {m: sorted({e.target for e in edges}) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the package is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ.get(v, []):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            components.append(comp)

    for v in sorted(succ):
        if v not in index:
            strongconnect(v)

    cycles: set[tuple[str, ...]] = set()
    for comp in components:
        members = set(comp)
        for u in comp:
            for v in succ[u]:
                if v in members:  # edge u -> v closes a cycle with the shortest path v ~> u
                    cycles.add(_rotate([u] + _shortest_path(succ, v, u, members)[:-1]))
    return sorted([*c, c[0]] for c in cycles)


def _shortest_path(succ: dict[str, list[str]], start: str, end: str, within: set[str]) -> list[str]:
    """Nodes on a shortest path ``start`` ~> ``end`` inside ``within`` (BFS), both included."""
    prev: dict[str, str] = {start: start}
    frontier = [start]
    while end not in prev:  # ``end`` is reachable: both are in one component
        next_frontier = []
        for v in frontier:
            for w in succ[v]:
                if w in within and w not in prev:
                    prev[w] = v
                    next_frontier.append(w)
        frontier = next_frontier
    path = [end]
    while path[-1] != start:
        path.append(prev[path[-1]])
    return path[::-1]


def _rotate(cycle: list[str]) -> tuple[str, ...]:
    """The cycle started at its smallest name, so each cycle is reported once."""
    i = cycle.index(min(cycle))
    return tuple(cycle[i:] + cycle[:i])


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of ``module`` by exact name, else by its longest matching ``prefix.*``."""
    if module in layers:
        return layers[module]
    best = None
    for key, layer in layers.items():
        if key.endswith(".*"):
            prefix = key[:-2]
            if (module == prefix or module.startswith(prefix + ".")) and (
                    best is None or len(prefix) > len(best[0])):
                best = (prefix, layer)
    return None if best is None else best[1]


# --------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    return import_graph(SRC, TOP)


def test_every_module_has_a_layer(graph):
    missing = [m for m in sorted(graph) if layer_of(m, LAYERS) is None]
    if missing:
        pytest.fail("\n".join(f"put module {m} in a layer (LAYERS in {Path(__file__).name})"
                              for m in missing), pytrace=False)


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    edge = {(e.source, e.target): e for edges in graph.values() for e in edges}
    lines = []
    for cycle in cycles:
        lines.append(f"cycle: {cycle}")
        lines += [f"    {edge[a, b]}" for a, b in zip(cycle, cycle[1:])]
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s):\n" + "\n".join(lines), pytrace=False)


def test_imports_go_down_the_layers(graph):
    problems = [f"put module {m} in a layer (LAYERS in {Path(__file__).name})"
                for m in sorted(graph) if layer_of(m, LAYERS) is None]
    for edges in graph.values():
        for e in edges:
            src, dst = layer_of(e.source, LAYERS), layer_of(e.target, LAYERS)
            if src is not None and dst is not None and dst > src:
                problems.append(f"{LAYER_NAMES[src]} -> {LAYER_NAMES[dst]}: {e}")
    if problems:
        pytest.fail(f"{len(problems)} layering problem(s):\n" + "\n".join(problems), pytrace=False)


# --------------------------------------------------------------------------
# Self-tests of the walker on a synthetic package
# --------------------------------------------------------------------------


def _write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_walker_finds_a_cycle(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def f():\n    from .sub.c import x\n",  # inside a function: counted
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import pkg.a\nfrom .. import d\n",
        "pkg/d.py": "x = 1\n",
    })
    graph = import_graph(tmp_path, "pkg")
    targets = {m: [e.target for e in edges] for m, edges in graph.items()}
    assert targets["pkg.a"] == ["pkg.b"]
    assert targets["pkg.b"] == ["pkg.sub", "pkg.sub.c"]  # the package's __init__ too
    assert targets["pkg.sub.c"] == ["pkg.a", "pkg.d"]  # not its own package pkg.sub
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_walker_ignores_type_checking_imports(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import B\n",
        "pkg/b.py": (
            "import typing\n"
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from .a import A\n"
            "if typing.TYPE_CHECKING:\n"
            "    import pkg.a\n"
            "else:\n"
            "    from pkg import c\n"  # the else branch runs: counted
            "class B: ...\n"
        ),
        "pkg/c.py": "",
    })
    graph = import_graph(tmp_path, "pkg")
    assert [e.target for e in graph["pkg.b"]] == ["pkg.c"]
    assert find_cycles(graph) == []
    assert layer_of("pkg.x.y", {"pkg.x.*": 1, "pkg.*": 0, "pkg.x.z": 2}) == 1
    assert layer_of("pkg.x", {"pkg.x.*": 1, "pkg.x": 3}) == 3


#: The largest a module (the benchmark aside) and a class may grow, in lines: past that,
#: a part holds more than one concern and should be split.
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400


def test_modules_and_classes_stay_small():
    too_big = []
    for path in sorted((SRC / TOP).rglob("*.py")):
        if "bench" in path.relative_to(SRC / TOP).parts:
            continue
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_big.append(f"module {path.relative_to(SRC)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_big.append(f"class {node.name} in {path.relative_to(SRC)}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, "split these: " + "; ".join(too_big)
