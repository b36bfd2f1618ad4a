"""The package layout is the architecture: imports only go downward, Keras internals stay in core."""

import ast
from pathlib import Path

import layerlr

PACKAGE = Path(layerlr.__file__).resolve().parent
# Lower rooms never import higher ones.
LEVEL = {"core": 0, "presets": 1, "interop": 1, "report": 2}
TOP = 3  # layerlr/__init__.py, cli.py, demo.py
# The one upward reference: `LayerwiseOptimizer.summary` prints the report's
# table, imported when called (as `keras.Model.summary` does).
ALLOWED_UPWARD = {("core/_optimizer.py", "layerlr.report._summary")}


def _room(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "layerlr":
        return -1
    return LEVEL.get(parts[1], TOP) if len(parts) > 1 else TOP


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            # `from layerlr.core import _rules` names a module too.
            found += [f"{node.module}.{alias.name}" for alias in node.names
                      if (PACKAGE / node.module.replace("layerlr", ".", 1).strip(".").replace(".", "/")
                          / f"{alias.name}.py").exists()]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [m for m in found if m == "layerlr" or m.startswith("layerlr.")]


def test_imports_only_go_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        own = LEVEL.get(relative.split("/")[0], TOP) if "/" in relative else TOP
        for module in _imports(path):
            if _room(module) > own and (relative, module) not in ALLOWED_UPWARD:
                upward.append(f"{relative} imports {module}")
            if module == "layerlr" and own < TOP:
                upward.append(f"{relative} imports the top-level package")
    assert not upward, upward


def test_each_room_is_a_package_with_its_story():
    for room in LEVEL:
        init = PACKAGE / room / "__init__.py"
        assert init.exists() and len(ast.get_docstring(ast.parse(init.read_text())) or "") > 80, room


def test_nothing_outside_core_reads_the_optimizers_private_state():
    # LayerwiseOptimizer's own state, and the methods that resolve it.
    private = {"_layerlr", "_resolve", "_multipliers_of", "_known_entries", "_from_rules", "_keep_or_resolve"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("core/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private and not (
                    isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"{relative}:{node.lineno} .{node.attr}")
    assert not found, found
