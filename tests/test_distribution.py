"""Distributed training gives the same weights as training on one device.

Each distributed run happens in a subprocess (`_dist_worker.py`), because the
device setup (2 logical TF CPUs, 2 forced XLA host devices, a TF_CONFIG
cluster) has to precede backend initialization. The test process trains the
same model single-device and compares: the wrapper there is itself checked
against the independent reference (one optimizer per group), and the plain
optimizer gives the teeth (it ends far away).
"""

from __future__ import annotations

import json

import pytest

import _procs
import _scenarios as sc
from conftest import only_on
from helpers import data, make_model

TOL = 1e-6
EPOCHS = 2
TIMEOUT_S = 180


@pytest.fixture
def initial_weights(tmp_path):
    weights = make_model().get_weights()
    path = tmp_path / "init.npz"
    sc.save_weights(path, weights)
    return weights, str(path)


def single_device(weights, kind="layerwise", name="nadam"):
    x, y = data()
    return sc.fit(sc.compiled_model(weights, kind, name), x, y, epochs=EPOCHS).get_weights()


def assert_matches_single_device(distributed, weights, name="nadam"):
    ours = single_device(weights, name=name)
    assert sc.max_diff(distributed, ours) < TOL
    assert sc.max_diff(ours, single_device(weights, "reference", name)) < TOL
    assert sc.max_diff(distributed, single_device(weights, "plain", name)) > 1e-3


def job(mode, tmp_path, init, name="nadam", out="out"):
    return {
        "mode": mode,
        "init": init,
        "out": str(tmp_path / f"{out}.npz"),
        "optimizer": name,
        "epochs": EPOCHS,
    }


# --- tf.distribute -----------------------------------------------------------


@only_on("tensorflow")
def test_mirrored_strategy_on_two_logical_cpus(tmp_path, initial_weights):
    weights, init = initial_weights
    distributed, facts = _procs.run_one(
        job("tf_mirrored", tmp_path, init), _procs.worker_env("tensorflow"), TIMEOUT_S
    )
    assert facts["replicas"] == 2 and len(facts["devices"]) == 2
    assert facts["iterations"] == EPOCHS * sc.STEPS_PER_EPOCH
    assert_matches_single_device(distributed, weights)


@only_on("tensorflow")
@pytest.mark.parametrize("name", ["nadam", pytest.param("adamw", marks=pytest.mark.slow)])
def test_multi_worker_mirrored_strategy_two_processes(tmp_path, initial_weights, name):
    weights, init = initial_weights
    ports = _procs.free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    jobs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        jobs.append((
            job("tf_multi_worker", tmp_path, init, name, out=f"worker{index}"),
            _procs.worker_env("tensorflow", TF_CONFIG=tf_config),
        ))
    results = _procs.run_all(jobs, TIMEOUT_S)

    for index, (distributed, facts) in enumerate(results):
        assert facts["task"] == {"type": "worker", "index": index}
        assert facts["replicas"] == 2
        assert facts["iterations"] == EPOCHS * sc.STEPS_PER_EPOCH
    # Both workers hold the same (mirrored) weights, equal to one process's.
    assert sc.max_diff(results[0][0], results[1][0]) == 0.0
    assert_matches_single_device(results[0][0], weights, name)


# --- keras.distribution on JAX -------------------------------------------------

FORCE_TWO_DEVICES = "--xla_force_host_platform_device_count=2"


@only_on("jax")
def test_jax_data_parallel_on_two_host_devices(tmp_path, initial_weights):
    weights, init = initial_weights
    distributed, facts = _procs.run_one(
        job("jax_data_parallel", tmp_path, init),
        _procs.worker_env("jax", XLA_FLAGS=FORCE_TWO_DEVICES),
        TIMEOUT_S,
    )
    assert facts["devices"] == 2
    # Replicated: every device holds the whole kernel.
    assert facts["d1_kernel"]["shard_shape"] == facts["d1_kernel"]["shape"]
    assert facts["iterations"] == EPOCHS * sc.STEPS_PER_EPOCH
    assert_matches_single_device(distributed, weights)


@only_on("jax")
def test_jax_model_parallel_shards_a_kernel_on_two_host_devices(tmp_path, initial_weights):
    weights, init = initial_weights
    distributed, facts = _procs.run_one(
        job("jax_model_parallel", tmp_path, init),
        _procs.worker_env("jax", XLA_FLAGS=FORCE_TWO_DEVICES),
        TIMEOUT_S,
    )
    kernel = facts["d1_kernel"]
    rows, cols = kernel["shape"]
    # The LayoutMap split d1/kernel's columns over both devices ...
    assert kernel["devices"] == 2 and kernel["shard_shape"] == [rows, cols // 2]
    # ... and the optimizer's slots for it (Nadam momentum, velocity) followed.
    assert len(facts["d1_kernel_slots"]) == 2
    assert all(s == kernel for s in facts["d1_kernel_slots"])
    assert_matches_single_device(distributed, weights)



@only_on("tensorflow")
@pytest.mark.slow
def test_readme_multi_worker_example_runs(tmp_path):
    """examples/multi_worker.py: two local workers, chief saves a loadable model."""
    import subprocess
    import sys
    from pathlib import Path

    import keras

    example = Path(__file__).parents[1] / "examples" / "multi_worker.py"
    saved = tmp_path / "model.keras"
    proc = subprocess.Popen(
        [sys.executable, str(example), "--save", str(saved), "--timeout", str(TIMEOUT_S)],
        env=_procs.worker_env("tensorflow"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S + 30)
    finally:
        _procs.stop(proc)
    assert proc.returncode == 0, out[-4000:]
    losses = [float(line.split("loss")[1]) for line in out.splitlines() if line.startswith("epoch")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    opt = keras.saving.load_model(saved).optimizer
    assert {p.split("/")[-2]: m.lr_mult for p, m in opt.multipliers.items()} == {
        "b1": 0.1, "b2": 0.1, "head": 1.0
    }
