"""The shape of the package: imports inside ``moe_adapt`` form no cycle, and only the stages read the
root config.

The graph is read from the source (``ast``), so nothing is imported. Every import counts, at the top
of a module or inside a function, except those under ``if TYPE_CHECKING:`` (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_adapt"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` (at ``path``) imports at run time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # a submodule, or a name defined in ``source``
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return [*stack[stack.index(nxt) :], nxt]
            if colour[nxt] == WHITE and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for start in sorted(graph):
        if colour[start] == WHITE and (cycle := dfs(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


ROOT_CONFIG_READERS = ("moe_adapt.stages", "moe_adapt.config", "moe_adapt.runner", "moe_adapt.__main__")
"""Modules (and packages) allowed to import the root :class:`~moe_adapt.config.schema.Config`."""

ROOT_CONFIG_MODULES = ("moe_adapt.config", "moe_adapt.config.schema")
"""Where the root ``Config`` can be imported from."""


def _root_config_imports(path: Path) -> list[int]:
    """Lines where the module at ``path`` imports the root ``Config`` (under ``TYPE_CHECKING`` too)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        is_config = isinstance(node, ast.ImportFrom) and node.module in ROOT_CONFIG_MODULES
        if is_config and any(alias.name in ("Config", "*") for alias in node.names):
            lines.append(node.lineno)
    return lines


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` with every module collapsed to its top-level package (or root module) of moe_adapt."""

    def top(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for module, imported in graph.items():
        targets = packages.setdefault(top(module), set())
        targets.update(top(m) for m in imported if top(m) != top(module))
    for targets in list(packages.values()):
        for t in targets:
            packages.setdefault(t, set())
    return packages


def test_only_the_stages_read_the_root_config() -> None:
    offenders = [
        f"{name} (line {line})"
        for name, path in sorted(_modules().items())
        if not any(name == allowed or name.startswith(allowed + ".") for allowed in ROOT_CONFIG_READERS)
        for line in _root_config_imports(path)
    ]
    assert not offenders, "the root Config is imported outside stages/: " + ", ".join(offenders)


def test_the_package_graph_collapses_modules_to_packages() -> None:
    graph = {
        "moe_adapt.a.x": {"moe_adapt.b.y", "moe_adapt.a.z"},
        "moe_adapt.a.z": set(),
        "moe_adapt.b.y": set(),
    }
    assert package_graph(graph) == {"moe_adapt.a": {"moe_adapt.b"}, "moe_adapt.b": set()}


def test_no_import_cycles_between_packages() -> None:
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "package import cycle: " + " -> ".join(cycle or [])


LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__",),
    ("runner",),
    ("stages",),
    ("config",),
    ("demo", "data", "upcycle", "cpt", "distill", "eval", "export"),
    ("train",),
    ("engines",),
    ("checkpoint", "distributed"),
    ("fs", "errors", "lock", "redact", "resume", "plots", "hydra_dumps", ""),
)
"""The package's floors, top first (docs/architecture.md): a module imports only from its own package,
from a lower floor, or from another package of the pipeline's floor (its libraries may use each
other). ``""`` is ``moe_adapt/__init__.py``."""


def floor_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for floor, names in enumerate(LAYERS):
        if top in names:
            return floor
    raise AssertionError(f"{module} is on no floor of LAYERS: add its package to tests/test_architecture.py")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of ``graph`` that run up the floors, or sideways between packages of one floor other
    than the pipeline's and the ground floor."""
    pipeline, ground = floor_of("moe_adapt.data"), len(LAYERS) - 1
    return [
        f"{module} -> {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if floor_of(target) < floor_of(module)
        or (
            floor_of(target) == floor_of(module) not in (pipeline, ground)
            and module.split(".")[:2] != target.split(".")[:2]
        )
    ]


def test_the_floor_check_flags_upward_and_sideways_imports() -> None:
    graph = {
        "moe_adapt.engines.base": {"moe_adapt.train.trainer", "moe_adapt.fs"},  # up, down
        "moe_adapt.checkpoint.hf": {"moe_adapt.distributed"},  # sideways on one floor
        "moe_adapt.cpt.sampler": {"moe_adapt.data.shards"},  # the pipeline's floor: allowed
        "moe_adapt.train.trainer": {"moe_adapt.train.callbacks"},  # inside a package: allowed
    }
    assert upward_imports(graph) == [
        "moe_adapt.checkpoint.hf -> moe_adapt.distributed",
        "moe_adapt.engines.base -> moe_adapt.train.trainer",
    ]


def test_imports_run_down_the_floors() -> None:
    upward = upward_imports(import_graph())
    assert not upward, "imports that run up the floors: " + ", ".join(upward)
