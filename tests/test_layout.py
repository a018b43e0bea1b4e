"""Layout rules: the core library does not pull in the app's UI stack."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_every_core_module_loads_neither_streamlit_nor_plotly():
    """``lems_core`` and all its submodules import without streamlit or plotly (those are app_pages/'s)."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import lems_core
        for info in pkgutil.walk_packages(lems_core.__path__, "lems_core."):
            if info.name != "lems_core.__main__":  # importing it runs the CLI (its imports are cli's)
                importlib.import_module(info.name)
        print(",".join(sorted({m.split(".")[0] for m in sys.modules} & {"streamlit", "plotly"})))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"lems_core imports UI packages: {done.stdout.strip()}"


def _module_imports(path: Path, module: str, package_root: str = "lems_core") -> set[str]:
    """The lems_core modules that ``module`` (file ``path``) imports, absolute or relative, at any depth."""
    import ast

    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package_root}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != package_root:
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return found


def _import_graph() -> dict[str, set[str]]:
    files = {}
    for path in (ROOT / "lems_core").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        files[".".join(parts)] = path
    graph = {}
    for module, path in files.items():
        targets = {t for t in _module_imports(path, module) if t in files}
        # Importing pkg.sub first runs pkg/__init__: an edge to each enclosing package the importer is not inside.
        parents = {".".join(t.split(".")[:i]) for t in targets for i in range(2, t.count(".") + 1)}
        targets |= {p for p in parents if p in files and not module.startswith(p + ".") and module != p}
        # `from . import sub` inside a package names the package, which is already initialising: not an edge.
        graph[module] = {t for t in targets if t != module and not module.startswith(t + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_lems_core_has_no_import_cycles():
    """Every import in lems_core, including those inside functions, points down the data flow.

    A package's ``__init__`` counts as importing what it re-exports, so ``plan`` importing
    ``allocators.base`` would show up as a cycle through ``allocators/__init__``.
    """
    graph = _import_graph()
    assert "lems_core.allocators.registry" in graph and "lems_core.decompositions.registry" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
