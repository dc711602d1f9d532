"""The package's shape (docs/architecture.md): no import circles among
module-level imports, and no module reaches into another's private names.

Module-level imports are the ones that run at import time; a circle among them
makes import order matter. A private name (leading underscore) of another
module is that module's to change; shared helpers get a public name or live
in a private module (``_fileio``, ``_tokentext``), which any module may import.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "python" / "logitparity"


def _modules() -> dict[str, Path | None]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = ["logitparity", *p.relative_to(PKG).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    out["logitparity._core"] = None  # the compiled extension: a module, not a name
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str, path: Path, modules: dict[str, Path]):
    """(module-level imported modules, private names taken from other modules)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    top, private = set(), []
    toplevel = set(map(id, tree.body))
    # Statements under a module-level `if`/`try` run at import time too
    # (but not under `if TYPE_CHECKING:`).
    for stmt in tree.body:
        if isinstance(stmt, (ast.If, ast.Try)) and not (
                isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)):
            toplevel |= {id(n) for n in ast.walk(stmt)}
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [(a.name, a.asname or a.name.split(".")[0]) for a in node.names]
            targets = [n for n, _ in names if n.startswith("logitparity")]
            for n, asname in names:
                if n.startswith("logitparity") and asname != n.split(".")[0]:
                    aliases[asname] = n
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(mod, is_pkg, node)
            if not src.startswith("logitparity"):
                continue
            targets = []
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in modules:  # `from logitparity import dump`: a module
                    targets.append(sub)
                    aliases[a.asname or a.name] = sub
                else:
                    targets.append(src)
                    if a.name.startswith("_") and src != mod:
                        private.append(f"{mod} imports {src}.{a.name}")
        else:
            continue
        if id(node) in toplevel:
            top |= {t for t in targets if t in modules and t != mod}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_") and node.attr != "__name__"):
            private.append(f"{mod} uses {aliases[node.value.id]}.{node.attr}")
    return top, private


def _graph():
    modules = _modules()
    graph, private = {}, []
    for mod, path in modules.items():
        if path is None:
            continue
        top, priv = _imports(mod, path, modules)
        graph[mod] = top
        private += priv
    return graph, private


def _circles(graph: dict[str, set[str]]) -> list[str]:
    circles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                circles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return circles


def test_no_import_circles():
    graph, _ = _graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 40  # the scan sees the package
    # The detector finds a planted circle through the real graph.
    planted = {k: set(v) for k, v in graph.items()}
    planted["logitparity.fields"].add("logitparity.compare")
    assert any("logitparity.compare" in c and "logitparity.fields" in c for c in _circles(planted))
    assert _circles(graph) == []


def test_no_module_uses_another_modules_private_names(tmp_path):
    # The scan finds both ways of reaching in, on a planted module.
    planted = tmp_path / "planted.py"
    planted.write_text("from logitparity.metrics import _hidden\nfrom logitparity import dump as d\nd._secret()\n")
    _, found = _imports("logitparity.planted", planted, _modules())
    assert found == ["logitparity.planted imports logitparity.metrics._hidden",
                     "logitparity.planted uses logitparity.dump._secret"]
    _, private = _graph()
    assert not private, "\n".join(private)
