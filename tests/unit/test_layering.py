"""The package structure holds: no import cycle in src/, and the sans-I/O core stays below the edge.

Every import counts, including those under ``if TYPE_CHECKING:`` and inside functions: a
cycle hidden in a lazy import is still a cycle for whoever reads or changes the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "pyovpn"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The pyovpn modules that ``name`` imports (``from pkg import mod`` names the module)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets = [f"{mod}.{alias.name}" for alias in node.names] + [mod]
        else:
            continue
        for target in targets:
            # the longest known module that the imported name lies in
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith(PACKAGE + "."):
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    # importing pkg.mod runs pkg/__init__ first, but that edge says nothing about the design
    return {name: _imports(name, path, known) - {PACKAGE} for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "pyovpn.proto.session" in graph
    assert "pyovpn.datachannel.api" in graph["pyovpn.proto.session"]


def test_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_protocol_core_stays_sans_io() -> None:
    """proto/ may use only itself, the error types and the data-channel command types."""
    allowed = ("pyovpn.proto", "pyovpn.errors", "pyovpn.datachannel.api")
    graph = _graph()
    bad = {
        mod: sorted(dep for dep in deps if not dep.startswith(allowed))
        for mod, deps in graph.items()
        if mod.startswith("pyovpn.proto.")
    }
    assert {m: d for m, d in bad.items() if d} == {}
