"""The Keras-suite harness (tests/keras_suite) has teeth, and its allow-list is reviewed.

`scripts/keras_suite.sh` runs the installed Keras' optimizer tests with every
optimizer wrapped in a LayerwiseOptimizer. Here, on the current backend: they
all pass through the real wrapper (with explicit 1.0 rules), a deliberately
wrong wrapper (every multiplier 0.5) fails them, the allow-listed ones pass
unwrapped, and every allow-list entry names a Keras test that exists, a known
kind, a reason and our own public-behaviour test that exists.
"""

import ast
import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

import keras

from conftest import BACKEND

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tests" / "keras_suite"
KERAS_SRC = Path(keras.__file__).resolve().parent / "src"
sys.path.insert(0, str(SUITE))
from allowlist import ALLOWED, KINDS  # noqa: E402

SLICE = ["optimizers/sgd_test.py", "optimizers/adam_test.py"]


def run_suite(*args, files=SLICE):
    """The pytest command of scripts/keras_suite.sh, for one backend."""
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(SUITE), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("LAYERLR_SUITE_MODE", None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(SUITE / "pytest.ini"), "--rootdir", str(KERAS_SRC),
         "-q", "-rfEX", "--tb=no", *[str(KERAS_SRC / f) for f in files], *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    return out.returncode, out.stdout + out.stderr


def failed_tests(output):
    return {m.group(1) for m in re.finditer(r"^FAILED \S*::(\w+::\w+)", output, re.M)}


def wrapped_count(output):
    match = re.search(r"wrapped_optimizers=(\d+)", output)
    assert match, output[-3000:]
    return int(match.group(1))


ALL_FILES = ["optimizers/*_test.py", "optimizers/schedules/*_test.py"]


def test_keras_optimizer_tests_pass_through_the_wrapper_with_rules():
    # Explicit 1.0 rules: the rule machinery runs, the numbers are Keras' own.
    files = sorted(str(p.relative_to(KERAS_SRC)) for f in ALL_FILES for p in KERAS_SRC.glob(f))
    code, output = run_suite("--layerlr-mode=rules", files=files)
    assert code == 0, output[-3000:]
    assert wrapped_count(output) >= 100  # the tests really ran through the wrapper
    assert "mode=rules" in output
    assert " xfailed" in output and "XPASS" not in output  # the allow-list, and only it


def test_a_deliberately_wrong_wrapper_fails_keras_tests():
    code, output = run_suite("--layerlr-wrong")
    assert code == 1, output[-3000:]
    failed = failed_tests(output)
    for name in ("SGDTest::test_single_step", "SGDTest::test_correctness_with_golden",
                 "SGDTest::test_weight_decay", "AdamTest::test_single_step",
                 "AdamTest::test_correctness_with_golden", "AdamTest::test_weight_decay"):
        assert name in failed, (name, sorted(failed))
    # Tests that never look at a step size stay green: the failures are the multipliers.
    assert "SGDTest::test_config" not in failed and "AdamTest::test_clip_norm" not in failed


def test_allowlisted_tests_pass_without_the_wrapper():
    # They fail through the wrapper only for what they inspect, not for Keras itself.
    files = sorted({key.partition("::")[0] for key in ALLOWED})
    names = " or ".join(sorted({key.rpartition("::")[2].rstrip("*") for key in ALLOWED}))
    code, output = run_suite("--layerlr-mode=plain", "-k", names, files=files)
    assert code == 0, output[-3000:]
    assert "xfailed" not in output and wrapped_count(output) == 0
    assert re.search(r"(\d+) passed", output) and int(re.search(r"(\d+) passed", output).group(1)) >= 7


def _test_names(path: Path) -> set[str]:
    """``Class::method`` and ``function`` names defined in a test file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
    return names


def test_every_allowlist_entry_names_a_real_test_a_reason_and_our_test():
    assert len(ALLOWED) <= 12, "the allow-list is meant to stay small"
    for key, entry in ALLOWED.items():
        assert entry.kind in KINDS, key
        assert len(entry.reason) > 20, key
        assert set(entry.backends) <= {"tensorflow", "jax", "torch"}, key
        path, _, name = key.partition("::")
        keras_file = KERAS_SRC / path
        assert keras_file.is_file(), f"{key}: no such Keras test file"
        # A pattern stands for a parameterized method, named with a suffix.
        stem = name.split("*")[0]
        assert any(fnmatch.fnmatchcase(n, name) or ("*" in name and stem.startswith(n))
                   for n in _test_names(keras_file)), f"{key}: no such Keras test"
        assert entry.ours, key
        for ours in entry.ours:
            file, _, test = ours.partition("::")
            assert test in _test_names(ROOT / file), f"{key}: our test {ours} does not exist"
