"""The package's shape: one folder per stage, imports running one way down the pipeline, no circles,
no module too long to read in one sitting.

Every `import` and `from ... import` of netdsl's own modules is read from the source (at module
level, inside functions and under `TYPE_CHECKING` alike), so a lazy import cannot hide a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The stages, lowest first: a module may import its own stage and the ones before it, never one after.
# (docs/architecture.md shows the same order.)
STAGES = [
    ("core", ("netdsl._version", "netdsl.errors", "netdsl.files", "netdsl.tables")),
    ("codegen", ("netdsl.codegen",)),
    ("ir", ("netdsl.ir",)),
    ("lang", ("netdsl.lang",)),
    ("compiler", ("netdsl.compiler",)),
    ("runtime", ("netdsl.runtime",)),
    ("interop", ("netdsl.interop",)),
    ("train", ("netdsl.train",)),
    ("cli", ("netdsl.cli", "netdsl.__main__")),
    ("api", ("netdsl",)),  # the package's face: netdsl.load, netdsl.load_graph
]
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    """Every module of the installed package by dotted name (codegen/ is installed as netdsl.codegen)."""
    found = {}
    for top, package in ((ROOT / "netdsl", "netdsl"), (ROOT / "codegen", "netdsl.codegen")):
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _stage(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no stage: add it to STAGES"
    return best[0]


def _imports(module: str, path: Path) -> set[str]:
    """The netdsl modules `module` imports (a name imported from a package counts as its submodule
    when there is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import netdsl.ir.ops as x` -> netdsl.ir.ops; attributes dropped
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_module_belongs_to_a_stage():
    for module in MODULES:
        _stage(module)


def test_no_import_circles():
    graph = nx.DiGraph((module, target) for module, targets in IMPORTS.items() for target in targets)
    circles = sorted(sorted(cycle) for cycle in nx.simple_cycles(graph))
    assert circles == [], f"import circles: {circles}"


def test_imports_run_down_the_pipeline():
    wrong = []
    for module, targets in sorted(IMPORTS.items()):
        for target in sorted(targets):
            if _stage(target) > _stage(module):
                wrong.append(f"{module} ({STAGES[_stage(module)][0]}) imports {target} ({STAGES[_stage(target)][0]})")
    assert wrong == [], "imports that run back up the stages:\n" + "\n".join(wrong)


def test_the_front_end_runs_without_torch():
    """`netdsl check` and `info` read a net without importing torch or triton (seconds saved per call)."""
    heavy = {"torch", "triton"}
    front_stages = {index for index, (name, _) in enumerate(STAGES) if name in ("ir", "lang")}
    front = [module for module in MODULES if _stage(module) in front_stages]
    for module in front:
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = {alias.name.split(".")[0] for node in top_level if isinstance(node, ast.Import) for alias in node.names}
        names |= {(node.module or "").split(".")[0] for node in top_level if isinstance(node, ast.ImportFrom)}
        assert not names & heavy, f"{module} imports {names & heavy} at module level"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_too_long(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines: is it two concepts?"


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The checks above are not vacuous: a made-up lower module importing a higher one is caught."""
    fake = tmp_path / "fake.py"
    fake.write_text("from netdsl.cli.main import main\nimport netdsl.compiler.fuse\n")
    MODULES["netdsl.ir.fake"] = fake
    try:
        targets = _imports("netdsl.ir.fake", fake)
    finally:
        del MODULES["netdsl.ir.fake"]
    assert targets == {"netdsl.cli.main", "netdsl.compiler.fuse"}
    assert all(_stage(target) > _stage("netdsl.ir.fake") for target in targets)
