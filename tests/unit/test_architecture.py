"""The import graph: one-way dependencies between the packages, and no cycle between modules.

Read from the source (every import, those inside functions included; those under ``TYPE_CHECKING`` are
for the type checker only and left out), so a dependency that only a rarely taken path imports counts too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: import package -> its folder (pyproject.toml's package-dir mapping)
PACKAGES = {
    "clemserve.registry": ROOT / "registry",
    "clemserve.client": ROOT / "client",
    "clemserve.service": ROOT / "service",
    "clemserve.v1": ROOT / "proto" / "clemserve" / "v1",
}
#: the one client module that hands ``serve`` and ``prepare`` to the server (imported only for them)
DISPATCHER = "clemserve.client.cli"


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        else:
            yield from _import_nodes(node)


def _target(name: str) -> str | None:
    """The project module that importing ``name`` runs: the module itself, else its package."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """The project modules that ``module`` imports."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from package import module`` imports the module; ``from module import name`` the module
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        found.update(t for t in map(_target, names) if t is not None and t != module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def _edges(source: str, target: str) -> list[str]:
    return sorted(
        f"{module} -> {imported}"
        for module, imported_set in GRAPH.items()
        if module.startswith(source + ".") or module == source
        for imported in imported_set
        if imported.startswith(target + ".") or imported == target
    )


def test_the_graph_sees_the_imports_it_should() -> None:
    """The walker itself: known edges are found (so the tests below cannot pass on an empty graph)."""
    assert "clemserve.service.model_cache" in GRAPH["clemserve.service.servicer"]
    assert "clemserve.service.backends" in GRAPH["clemserve.service.model_cache"]
    assert "clemserve.registry" in GRAPH["clemserve.client.model"]
    assert "clemserve.service.cli" in GRAPH[DISPATCHER]


def test_the_service_never_imports_the_client() -> None:
    assert _edges("clemserve.service", "clemserve.client") == []


def test_the_registry_imports_neither_service_nor_client() -> None:
    assert _edges("clemserve.registry", "clemserve.service") == []
    assert _edges("clemserve.registry", "clemserve.client") == []


def test_the_client_imports_the_service_only_to_hand_it_serve_and_prepare() -> None:
    assert [edge for edge in _edges("clemserve.client", "clemserve.service") if not edge.startswith(DISPATCHER)] == []


def test_metrics_is_a_leaf() -> None:
    """Metrics consume plain data: they import no server module but the domain types."""
    assert GRAPH["clemserve.service.metrics"] <= {"clemserve.service.domain"}


def test_no_import_cycle() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == 1:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert cycles == [], "\n".join(" -> ".join(cycle) for cycle in cycles)


# -- what lives where -----------------------------------------------------------------------------

SERVICE = ROOT / "service"
BACKENDS = SERVICE / "backends"
#: every name a registry entry's ``backend`` may hold that clemserve knows of, served or not
BACKEND_NAMES = {
    "echo", "fault", "huggingface_local", "vllm", "llamacpp", "openai", "openai_compatible", "openrouter", "azure",
    "anthropic", "google", "mistral", "cohere", "slurk", "_player_human", "_player_programmed",
}  # fmt: skip


def _strings(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_the_catalog_knows_every_backend_name_the_test_checks_for() -> None:
    from clemserve.service.backends import KNOWN_BACKENDS, PLAYER_BACKENDS

    assert set(KNOWN_BACKENDS) | set(PLAYER_BACKENDS) == BACKEND_NAMES


def test_no_service_module_outside_the_backends_names_a_backend() -> None:
    """What a backend is lives in its module and its catalog entry: core modules ask the catalog."""
    named = [
        f"{path.relative_to(ROOT)}:{line}: {value!r}"
        for path in sorted(SERVICE.rglob("*.py"))
        if BACKENDS not in path.parents
        for line, value in _strings(path)
        if value in BACKEND_NAMES
    ]
    assert named == []
    assert not any(imported.startswith("clemserve.service.backends") for imported in GRAPH["clemserve.service.memory"])


def test_no_service_class_is_over_300_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(SERVICE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None and node.end_lineno - node.lineno >= 300
    ]
    assert long == []


def test_every_rpc_converts_makes_one_call_and_converts_back_in_at_most_8_lines() -> None:
    """Fan-out, policy and stamping belong to the cache, validation and conversion, not to the servicer."""
    tree = ast.parse((SERVICE / "servicer.py").read_text())
    servicer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ModelServicer")
    rpcs = {
        node.name: node
        for node in servicer.body
        if isinstance(node, ast.AsyncFunctionDef)
        and any(ast.unparse(d) in ("rpc", "stream_rpc") for d in node.decorator_list)
    }
    assert {"Generate", "GenerateStream", "GenerateBatch", "LeaseModel", "ResolveModel", "ListModels"} <= set(rpcs)
    sizes = {}
    for name, node in rpcs.items():
        body = node.body[1:] if ast.get_docstring(node) else node.body
        sizes[name] = body[-1].end_lineno - body[0].lineno + 1  # type: ignore[operator]
    assert {name: size for name, size in sizes.items() if size > 8} == {}
