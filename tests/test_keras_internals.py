"""The inventory of private Keras internals is complete, checked, and names what broke."""

import ast
import re
from pathlib import Path

import keras
import pytest

from layerlr.core import _keras_internals
from layerlr.core._keras_internals import INTERNALS, KerasInternalsChanged, check

SRC = Path(_keras_internals.__file__).resolve().parents[1]  # the package


def test_every_internal_still_has_the_shape_we_rely_on():
    passed = check()
    backend = keras.backend.backend()
    assert len(passed) == sum(backend in i.backends for i in INTERNALS)


def test_a_changed_internal_is_reported_by_name(monkeypatch):
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    monkeypatch.delattr(BaseOptimizer, "_get_variable_index")
    monkeypatch.setattr(keras.optimizers.Muon, "_should_use_adamw", lambda self, v: None)
    with pytest.raises(KerasInternalsChanged) as raised:
        check()
    message = str(raised.value)
    assert "BaseOptimizer._get_variable_index" in message and "tests/test_equivalence.py" in message
    assert "Muon._should_use_adamw" in message


def _own_names() -> set[str]:
    """Private names layerlr itself defines (its own functions, classes, attributes)."""
    names = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names


def _is_super_call(node) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "super"


def _private_uses() -> dict[str, set[str]]:
    """Private attribute names layerlr's code reads, and where (``super()`` calls aside)."""
    private = re.compile(r"_[a-z]\w*")
    uses: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        if path.name == "_keras_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Attribute) and not _is_super_call(node.value):
                names = [node.attr]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                    "getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1:
                names = [getattr(node.args[1], "value", None)]
            elif isinstance(node, (ast.Tuple, ast.List)):  # name lists read with getattr
                names = [getattr(e, "value", None) for e in node.elts]
            for name in names:
                if isinstance(name, str) and private.fullmatch(name):
                    uses.setdefault(name, set()).add(path.relative_to(SRC).as_posix())
    return uses


def test_every_private_keras_name_layerlr_touches_is_in_the_inventory():
    listed = {name for internal in INTERNALS for name in internal.names}
    # Defined by layerlr but also Keras' (overridden or assigned by us): still Keras'.
    keras_names = {name for name in _private_uses() if hasattr(keras.optimizers.Optimizer, name)
                   or hasattr(keras.Layer, name)}
    unlisted = {
        name: sorted(files) for name, files in _private_uses().items()
        if name not in listed and (name not in _own_names() or name in keras_names)
    }
    # Names only layerlr defines, and private-but-ours prefixes.
    unlisted = {n: f for n, f in unlisted.items() if not n.startswith("_layerlr")}
    assert not unlisted, f"private Keras names used but not in _keras_internals.INTERNALS: {unlisted}"


def test_every_keras_src_import_is_in_the_inventory():
    inventory = (SRC / "core" / "_keras_internals.py").read_text()
    used = set()
    for path in SRC.rglob("*.py"):
        used |= set(re.findall(r"keras\.src(?:\.\w+)+", path.read_text()))
    missing = sorted(m for m in used if m not in inventory)
    assert not missing, f"keras.src modules used but not checked in _keras_internals: {missing}"


def test_only_core_keras_touches_private_keras_names():
    # Overrides of private Keras methods (a `def`, or a `super()` call inside
    # one) stay in their classes; every other access is a function of _keras.
    listed = {name for internal in INTERNALS for name in internal.names}
    elsewhere = {
        name: sorted(files - {"core/_keras.py"}) for name, files in _private_uses().items()
        if name in listed and files - {"core/_keras.py"}
    }
    assert not elsewhere, f"private Keras names used outside core/_keras.py: {elsewhere}"


def test_each_access_in_core_keras_names_its_internal_versions_and_test():
    source = (SRC / "core" / "_keras.py").read_text()
    comments = re.findall(r"^# Keras: (.*?)(?=^[^#]|\Z)", source, flags=re.M | re.S)
    assert comments
    for comment in comments:
        text = " ".join(line.lstrip("# ").strip() for line in comment.splitlines())
        assert "checked with 3.15.1" in text and "Caught by: tests/" in text, text
