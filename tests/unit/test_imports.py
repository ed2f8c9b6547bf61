"""The package map of docs/architecture.md, checked against the code: every import of every module of
``bookshop`` (function-local ones included; ``if TYPE_CHECKING:`` blocks are names for readers, not imports)."""
from __future__ import annotations

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "bookshop"
LIBRARIES_OF_THE_EDGE = ("tornado", "motor", "pymongo", "aiohttp", "bson")


def module_name(path: pathlib.Path) -> str:
    parts = ("bookshop",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: pathlib.Path) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # ``from pkg import module``

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imported(path) if m in modules and m != name} for name, path in modules.items()}


def third_party(module: str) -> set[str]:
    path = ROOT.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return {m.split(".")[0] for m in imported(path) if not m.startswith("bookshop")}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def unit(module: str) -> str:
    """The package (or top-level module) a module belongs to: ``bookshop.handlers.base`` -> ``bookshop.handlers``."""
    return ".".join(module.split(".")[:2])


def test_the_walk_sees_the_imports_it_must():
    edges = graph()
    assert "bookshop.context" in edges["bookshop.wiring"]
    assert "bookshop.storage.catalog" in edges["bookshop.wiring"]  # function-local
    assert "bookshop.storage.catalog" not in edges["bookshop.deps"]  # TYPE_CHECKING only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_through_others():
    assert cycles(graph()) == []


def test_no_package_imports_itself_through_others():
    edges: dict[str, set[str]] = {}
    for module, imports in graph().items():
        edges.setdefault(unit(module), set()).update(unit(m) for m in imports if unit(m) != unit(module))
    edges.pop("bookshop", None)  # the package's own __init__ (SERVICES) is imported by everyone, imports nothing
    assert cycles(edges) == []


@pytest.mark.parametrize("module", sorted(m for m in graph() if m.startswith("bookshop.services.")))
def test_services_are_plain_python(module):
    """STYLE.md: the shop itself imports no web framework, driver or other layer of ours."""
    assert not {m for m in graph()[module] if not m.startswith("bookshop.services")}
    assert not third_party(module) & set(LIBRARIES_OF_THE_EDGE)


def test_handlers_do_not_reach_into_storage():
    leaks = {m for m, imports in graph().items()
             if m.startswith("bookshop.handlers") and any(i.startswith("bookshop.storage") for i in imports)}
    assert not leaks


def test_the_hub_knows_nothing_of_handlers_or_storage():
    for module, imports in graph().items():
        if module.startswith("bookshop.ws"):
            assert not {i for i in imports if i.startswith(("bookshop.handlers", "bookshop.storage"))}, module


def test_the_hub_reaches_services_through_clients():
    for module in graph():
        if module.startswith("bookshop.ws"):
            assert "aiohttp" not in third_party(module), module


#: docs/architecture.md's table "what each may import" (the package's own ``__init__``, the service names, is
#: open to all)
MAY_IMPORT = {
    "bookshop.services": {"bookshop.services"},
    "bookshop.storage": {"bookshop.storage", "bookshop.services", "bookshop.tracing", "bookshop.errors"},
    "bookshop.clients": {"bookshop.clients", "bookshop.services", "bookshop.tracing", "bookshop.logs"},
    "bookshop.auth": {"bookshop.services"},
    "bookshop.ws": {"bookshop.ws", "bookshop.services", "bookshop.clients", "bookshop.auth", "bookshop.validation"},
    "bookshop.handlers": {"bookshop.handlers", "bookshop.services", "bookshop.ws", "bookshop.auth", "bookshop.deps",
                          "bookshop.validation", "bookshop.logs", "bookshop.tracing", "bookshop.net",
                          "bookshop.errors"},
}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_what_the_map_allows(package):
    beyond = {(module, unit(i)) for module, imports in graph().items() if unit(module) == package
              for i in imports if unit(i) not in MAY_IMPORT[package] | {"bookshop"}}
    assert not beyond


def test_only_the_process_entry_points_import_the_wiring():
    importers = {m for m, imports in graph().items() if "bookshop.wiring" in imports}
    assert importers == {"bookshop.app", "bookshop.supervisor"}
