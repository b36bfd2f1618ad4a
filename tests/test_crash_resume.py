"""Crash and resume: nothing is lost.

- A training process killed with SIGKILL in the middle of an epoch and started
  again with `keras.callbacks.BackupAndRestore` ends with the weights and the
  optimizer state of an uninterrupted run (within 1e-6), multipliers included.
  The test starts and kills a real process (tests/_crash_worker.py) on the
  backend under test; every process is bounded in time and always killed.
- `ModelCheckpoint` files, weights-only and full-model, resume to the same
  result as uninterrupted training, with the same multipliers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import keras

import _crash_worker as worker
from conftest import BACKEND

WORKER = Path(worker.__file__)
TIMEOUT = 240  # per process: imports alone can take a while on a busy machine
STEPS_PER_EPOCH = worker.ROWS // worker.BATCH_SIZE


def start(job: dict, log: Path) -> subprocess.Popen:
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(WORKER.parent), os.environ.get("PYTHONPATH")])))
    with open(log, "w") as out:
        # Its own session, so killing it kills whatever it started as well.
        return subprocess.Popen([sys.executable, str(WORKER), json.dumps(job)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_until(condition, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None and not condition():
            raise AssertionError(f"the worker exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {TIMEOUT} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


@pytest.fixture
def initial_weights(tmp_path):
    path = tmp_path / "init.npz"
    np.savez(path, *worker.make_model().get_weights())
    return path


def uninterrupted(init_path):
    """The same training in this process, never stopped."""
    model = worker.compiled_model(init_path)
    x, y = worker.make_data()
    model.fit(x, y, batch_size=worker.BATCH_SIZE, epochs=worker.EPOCHS, shuffle=False, verbose=0)
    return worker.state_arrays(model), worker.multipliers_of(model.optimizer)


def assert_same_state(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, i
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=f"array #{i}")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_epoch_then_backup_and_restore_equals_uninterrupted(tmp_path, initial_weights):
    hang_at = [2, 3]  # epoch 2 (0-based) after its 4th batch: 2 epochs backed up
    job = {"out": str(tmp_path / "resumed"), "backup_dir": str(tmp_path / "backup"),
           "init": str(initial_weights), "marker": str(tmp_path / "marker.json"), "hang_at": hang_at}
    marker = Path(job["marker"])
    procs = []
    try:
        crashing = start(job, tmp_path / "crashing.log")
        procs.append(crashing)
        wait_until(marker.exists, crashing, tmp_path / "crashing.log", "marker")
        kill(crashing)
        assert crashing.returncode == -signal.SIGKILL
        assert json.loads(marker.read_text())["iterations"] == 2 * STEPS_PER_EPOCH + 4
        assert (tmp_path / "backup").exists()

        resumed = start(dict(job, hang_at=None), tmp_path / "resumed.log")
        procs.append(resumed)
        resumed.wait(timeout=TIMEOUT)
        assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    finally:
        for proc in procs:
            kill(proc)

    facts = json.loads((tmp_path / "resumed.json").read_text())
    # It resumed at the start of the interrupted epoch, with the state backed
    # up at the end of the one before (not from scratch, not mid-epoch).
    assert facts["epochs"] == [2, 3]
    assert facts["start_iterations"] == 2 * STEPS_PER_EPOCH
    assert facts["iterations"] == worker.EPOCHS * STEPS_PER_EPOCH
    assert facts["multipliers"] == worker.expected_multipliers()

    want, multipliers = uninterrupted(initial_weights)
    assert multipliers == worker.expected_multipliers()
    loaded = np.load(tmp_path / "resumed.npz")
    assert_same_state([loaded[f"arr_{i}"] for i in range(len(loaded.files))], want)


# --- ModelCheckpoint ---------------------------------------------------------------


def checkpointed_run(init_path, checkpoint):
    model = worker.compiled_model(init_path)
    x, y = worker.make_data()
    model.fit(x, y, batch_size=worker.BATCH_SIZE, epochs=2, shuffle=False, verbose=0,
              callbacks=[checkpoint])
    return model


def one_more_epoch(model):
    x, y = worker.make_data()
    model.fit(x, y, batch_size=worker.BATCH_SIZE, initial_epoch=1, epochs=2, shuffle=False, verbose=0)
    return worker.state_arrays(model)


def test_weights_only_checkpoint_resumes_with_the_same_multipliers_and_state(tmp_path, initial_weights):
    path = str(tmp_path / "ckpt-{epoch}.weights.h5")
    done = checkpointed_run(initial_weights, keras.callbacks.ModelCheckpoint(path, save_weights_only=True))

    model = worker.compiled_model(initial_weights)  # the same code: the same rules
    # Loading optimizer state needs a built optimizer; from the model, so that
    # the layer-type rule sees the layers.
    model.optimizer.build(model)
    model.load_weights(path.format(epoch=1))
    assert int(model.optimizer.iterations) == STEPS_PER_EPOCH
    assert worker.multipliers_of(model.optimizer) == worker.expected_multipliers()
    assert_same_state(one_more_epoch(model), worker.state_arrays(done))


def test_full_model_checkpoint_keeps_the_multipliers(tmp_path, initial_weights):
    path = str(tmp_path / "ckpt-{epoch}.keras")
    done = checkpointed_run(initial_weights, keras.callbacks.ModelCheckpoint(path))

    model = keras.models.load_model(path.format(epoch=1))
    # The layer-object rule cannot be saved; the per-variable multipliers are.
    assert type(model.optimizer).__name__ == "LayerwiseOptimizer"
    assert worker.multipliers_of(model.optimizer) == worker.expected_multipliers()
    assert int(model.optimizer.iterations) == STEPS_PER_EPOCH
    assert_same_state(one_more_epoch(model), worker.state_arrays(done))
