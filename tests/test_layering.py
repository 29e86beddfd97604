"""The tree's layering, read from the source (docs/architecture.md): which package may import
which, what inside portal/ may import what, and no import cycles between modules. A module's
imports are every ``import``/``from ... import`` in it, at the top or inside functions."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("portal", "slurm", "containers", "storage", "monitor", "inference")

#: what each top-level package may import of ours (DESIGN.md, docs/architecture.md)
ALLOWED = {
    "slurm": set(),
    "containers": set(),
    "storage": set(),
    "monitor": {"slurm", "containers"},
    "inference": {"slurm", "containers", "storage"},
    "portal": set(OURS),
}

#: inside portal/: what a role may not import
FORBIDDEN_IN_PORTAL = {
    "portal.services": ("portal.daemons", "portal.web", "portal.api", "portal.cli"),
    "portal.models": ("portal.services", "portal.daemons", "portal.web", "portal.api", "portal.cli", "portal.logs"),
    "portal.daemons": ("portal.web", "portal.api", "portal.cli"),
    "portal.logs": ("portal.services", "portal.daemons", "portal.web", "portal.api", "portal.cli"),
    "portal.web": ("portal.api", "portal.daemons", "portal.cli"),
    "portal.api": ("portal.web", "portal.daemons", "portal.cli"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in OURS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            out[module_name(path)] = path
    return out


MODULES = modules()


def imports_of(name: str) -> set[str]:
    """The modules of ours that ``name`` imports (``from a.b import c`` is ``a.b.c`` when that
    is a module of ours, else ``a.b``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                found.add("%s.%s" % (base, a.name) if "%s.%s" % (base, a.name) in MODULES else base)
    return {m for m in found if m.split(".")[0] in OURS and m in MODULES}


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for type hints only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_packages_import_only_what_they_may(name):
    top = name.split(".")[0]
    bad = {m for m in imports_of(name) if m.split(".")[0] not in ALLOWED[top] | {top}}
    assert not bad, "%s imports %s; %s may import only %s" % (name, sorted(bad), top, sorted(ALLOWED[top]) or "nothing")


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("portal.")))
def test_portal_roles_keep_to_their_layer(name):
    for role, forbidden in FORBIDDEN_IN_PORTAL.items():
        if name == role or name.startswith(role + "."):
            bad = {m for m in imports_of(name) if m.startswith(forbidden)}
            assert not bad, "%s (%s) imports %s" % (name, role, sorted(bad))


def test_no_import_cycles():
    graph = {name: imports_of(name) - {name} for name in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: %s" % " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_reader_sees_imports():
    """The checks above can fail: the reader finds known imports, and skips type-hint-only ones."""
    assert "portal.services.submit" in imports_of("portal.services.jobs")
    assert "slurm.spec" in imports_of("portal.services.submit")
    assert "monitor.checks" not in imports_of("monitor.ownership")   # under TYPE_CHECKING
