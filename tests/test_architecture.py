"""The shape of the code, read from its source (ast): docs/architecture.md's direction of flow.

Each package has a layer; a module may import its own layer and the layers to its left, never to
its right. Every import counts, module-level or inside a function, so a function-level import
cannot hide a backward arrow or a cycle. Also checked: no import cycle between modules, no private
(underscore) name imported from another module, no re-exports from sub-package ``__init__`` files,
no library function over 8 parameters, no docstring pointing at a path users do not have.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# docs/architecture.md, left to right. The root package (errors, device, outdir), formats/ and
# the lazy facade spectra/__init__.py are the base every stage may use.
LAYERS = {
    "spectra": 0,
    "spectra.formats": 0,
    "spectra.sources": 1,
    "spectra.linalg": 2,
    "spectra.analysis": 3,
    "spectra.adapt": 4,
    "spectra.export": 5,
    "spectra.distributed": 6,
    "spectra.jobs": 7,
    "spectra.reports": 8,
    "spectra.cli": 9,
    "spectra.__main__": 10,
}
MAX_PARAMS = 8


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (the defining module when the name is one)
    name: str | None  # the imported name for `from x import name`
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("cli", "reports"):  # installed as spectra.cli / spectra.reports
        parts = ["spectra", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Module]:
    found = {}
    for top in ("spectra", "cli", "reports"):
        for path in sorted((ROOT / top).rglob("*.py")):
            name = _module_name(path)
            found[name] = Module(name, path, ast.parse(path.read_text(), filename=str(path)))
    return found


MODULES = _modules()


def _imports(mod: Module) -> Iterator[Import]:
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "spectra":
                    yield Import(mod.name, alias.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.package.split(".")[: len(mod.package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "spectra":
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield Import(mod.name, full if full in MODULES else target, alias.name, node.lineno)


IMPORTS = [imp for mod in MODULES.values() for imp in _imports(mod)]


def _layer(module: str) -> tuple[str, int]:
    best = ""
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    if not best:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it (and to the docs map)")
    return best, LAYERS[best]


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        _layer(name)


def test_imports_follow_the_direction_of_flow() -> None:
    bad = []
    for imp in IMPORTS:
        (src_pkg, src), (dst_pkg, dst) = _layer(imp.source), _layer(imp.target)
        if dst > src:
            bad.append(f"{imp.source}:{imp.line} imports {imp.target} ({src_pkg} -> {dst_pkg})")
    assert not bad, "imports against docs/architecture.md's direction:\n" + "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycles() -> None:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        # `from spectra.pkg import name` runs spectra/pkg/__init__.py first
        if imp.target in MODULES and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    assert not _cycles(edges)


def test_cycle_finder_finds_a_cycle() -> None:
    """Negative control: the finder is not blind."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_imported_across_modules() -> None:
    bad = [
        f"{imp.source}:{imp.line} imports {imp.name} from {imp.target}"
        for imp in IMPORTS
        if imp.name and imp.name.startswith("_") and not imp.name.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def test_subpackage_inits_reexport_nothing() -> None:
    """Callers import a name from the module that defines it; an ``__init__`` is a map (its
    docstring). The root ``spectra/__init__.py`` is the one public facade."""
    bad = []
    for mod in MODULES.values():
        if mod.is_package and mod.name != "spectra":
            for imp in _imports(mod):
                bad.append(f"{mod.name} re-exports {imp.name or imp.target} from {imp.target}")
    assert not bad, "\n".join(bad)


def _param_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
    n += (a.vararg is not None) + (a.kwarg is not None)
    if (a.posonlyargs or a.args) and (a.posonlyargs or a.args)[0].arg in ("self", "cls"):
        n -= 1
    return n


def _is_typer_command(mod: Module, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A typer command declares one parameter per CLI option: the CLI's shape, not a library
    signature."""
    return mod.name.startswith("spectra.cli.") and any(
        "Annotated" in ast.unparse(arg.annotation) for arg in fn.args.args if arg.annotation
    )


def test_no_library_function_over_eight_parameters() -> None:
    bad = []
    for mod in MODULES.values():
        for node in ast.walk(mod.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _param_count(node)
                if n > MAX_PARAMS and not _is_typer_command(mod, node):
                    bad.append(f"{mod.name}.{node.name}: {n} parameters")
    assert not bad, "use a frozen options dataclass:\n" + "\n".join(bad)


def test_no_reference_to_paths_users_do_not_have() -> None:
    bad = [mod.name for mod in MODULES.values() if "shared/docs" in mod.path.read_text()]
    assert not bad, f"cite docs/ (shipped with the project), not ../shared/docs: {bad}"


@pytest.mark.parametrize("doc", ["docs/architecture.md"])
def test_architecture_map_names_every_package(doc: str) -> None:
    text = (ROOT / doc).read_text()
    for prefix in LAYERS:
        if prefix.count(".") == 1 and prefix != "spectra.__main__":
            short = prefix.split(".", 1)[1]
            assert f"{short}/" in text or f"spectra/{short}" in text, f"{doc} misses {short}/"


def _top_level_imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


#: Names that resolve only when the repository root is on sys.path (`python -m pytest` from the
#: root): `make test` runs bare pytest, which puts tests/ there instead, and the installed package
#: is `spectra` with `spectra.cli` and `spectra.reports` inside it.
_ROOT_ONLY = ("tests", "cli", "reports", "benchmarks")


def _root_only_imports(paths: list[Path]) -> list[str]:
    return [
        f"{path.name}:{line} imports {name}"
        for path in paths
        for line, name in _top_level_imports(path)
        if name.split(".")[0] in _ROOT_ONLY
    ]


def test_tests_import_what_bare_pytest_can_find() -> None:
    bad = _root_only_imports(sorted((ROOT / "tests").rglob("*.py")))
    assert not bad, "\n".join(bad)


def test_root_only_import_finder_finds_one(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text("import os\nfrom tests._hub_server import x\nimport cli.main\n")
    assert _root_only_imports([sample]) == [
        "test_sample.py:2 imports tests._hub_server",
        "test_sample.py:3 imports cli.main",
    ]
