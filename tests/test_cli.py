"""The `layerlr` command line: `inspect` on saved models, and the entry point."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import keras

import layerlr
from layerlr.cli import main


def saved_model(tmp_path, optimizer, compile=True, name="model.keras"):
    backbone = keras.Sequential([keras.layers.Dense(8, name="b1")], name="backbone")
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3, name="head")(backbone(inputs))
    model = keras.Model(inputs, outputs, name="net")
    if compile:
        model.compile(optimizer=optimizer(backbone) if callable(optimizer) else optimizer, loss="mse")
        model.fit(np.ones((8, 6)), np.zeros((8, 3)), batch_size=4, verbose=0)  # 2 steps
    path = tmp_path / name
    model.save(path)
    return str(path)


def layerwise(backbone):
    return layerlr.LayerwiseOptimizer(
        keras.optimizers.SGD(0.1), lr_mult={backbone: 0.01}, decay_mult={"*bias": 0.0}
    )


def test_inspect_prints_the_table(tmp_path, capsys):
    path = saved_model(tmp_path, layerwise)
    assert main(["inspect", path, "--width", "150"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "LayerwiseOptimizer(SGD) at step 2"
    b1_kernel = next(line for line in out if "b1/kernel" in line)
    assert b1_kernel.split()[:8] == [
        "b1", "(Dense)", "b1/kernel", "(6,", "8)", "48", "0.01", "1",
    ]
    assert "0.001" in b1_kernel.split()  # 0.1 * 0.01, by hand
    head_bias = next(line for line in out if "head/bias" in line)
    assert head_bias.split()[-1] == "'*bias'" and " 0.1 " in head_bias
    assert "Trainable: 83 params in 4 variables." in out


def test_inspect_json(tmp_path, capsys):
    path = saved_model(tmp_path, layerwise)
    assert main(["inspect", path, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["path"], r["lr_mult"], r["decay_mult"]) for r in records] == [
        ("b1/kernel", 0.01, 1.0),
        ("b1/bias", 0.01, 0.0),
        ("head/kernel", 1.0, 1.0),
        ("head/bias", 1.0, 0.0),
    ]
    assert records[0]["learning_rate"] == pytest.approx(0.001, rel=1e-6)


def test_inspect_says_when_there_is_no_layerwise_optimizer(tmp_path, capsys):
    plain = saved_model(tmp_path, keras.optimizers.Adam(0.002), name="plain.keras")
    assert main(["inspect", plain]) == 1
    err = capsys.readouterr().err
    assert "plain Adam, not a LayerwiseOptimizer" in err and "0.002" in err

    bare = saved_model(tmp_path, None, compile=False, name="bare.keras")
    assert main(["inspect", bare]) == 1
    assert "has no optimizer" in capsys.readouterr().err


def test_inspect_bad_files(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.keras")]) == 2
    assert "no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a keras file")
    assert main(["inspect", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "could not load" in err and "--import MODULE" in err
    assert main(["inspect", str(broken), "--import", "no_such_module_xyz"]) == 2
    assert "cannot import no_such_module_xyz" in capsys.readouterr().err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit, match="--seeds must be at least 1"):
        main(["demo", "--seeds", "0"])


def test_console_script(tmp_path):
    path = saved_model(tmp_path, layerwise)
    script = os.path.join(os.path.dirname(sys.executable), "layerlr")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "layerlr.cli"]
    done = subprocess.run(
        [*command, "inspect", path, "--width", "150"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr
    assert "b1/kernel" in done.stdout and "Trainable: 83 params" in done.stdout


# What the console script pip writes for the entry point does, plus a report
# of the exit status and of which backends got imported.
CONSOLE_SCRIPT = """
import importlib, json, sys
module, _, name = sys.argv[1].partition(":")
try:
    status = getattr(importlib.import_module(module), name)(sys.argv[3:])
except SystemExit as exit:
    status = exit.code
backends = [m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules]
with open(sys.argv[2], "w") as f:
    json.dump({"status": status, "backends": backends}, f)
"""
ENTRY_POINT = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())[
    "project"]["scripts"]["layerlr"]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "--help"]])
def test_help_and_version_import_no_backend(tmp_path, args):
    report = tmp_path / "report.json"
    # Without TF_CPP_MIN_LOG_LEVEL, importing TensorFlow would log to stderr.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, ENTRY_POINT, str(report), *args],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert json.loads(report.read_text()) == {"status": 0, "backends": []}
    if args == ["--version"]:
        assert done.stdout == f"layerlr {layerlr.__version__}\n"
    else:
        assert done.stdout.startswith("usage: layerlr ")
        assert ("inspect" in done.stdout and "demo" in done.stdout) if args == ["--help"] else (
            "--import MODULE" in done.stdout)


def test_demo_help_lists_the_demos_own_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: layerlr demo ") and "--quick" in out and "--out-dir" in out
