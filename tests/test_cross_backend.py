"""A model saved on one backend loads and keeps training on another.

This process's backend saves after one epoch (Nadam with weight decay, so
momentum, velocity, u_product and the per-variable multipliers must all
survive); the other two backends, each in its own subprocess, load the file
and train one more epoch. The result must equal uninterrupted two-epoch
training. Each backend's CI run covers the two pairs it is the source of, so
the three runs together cover all six.
"""

from __future__ import annotations

import pytest
import keras

import _procs
import _scenarios as sc
from conftest import BACKEND
from helpers import data, make_model

TOL = 1e-6
TIMEOUT_S = 180
OTHER_BACKENDS = [b for b in ("tensorflow", "jax", "torch") if b != BACKEND]


def _layer_and_name(path):
    return "/".join(path.split("/")[-2:])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cross_backend")
    keras.utils.set_random_seed(0)
    init = make_model().get_weights()
    x, y = data()
    first = sc.fit(sc.compiled_model(init), x, y, epochs=1)
    path = tmp / f"saved_on_{BACKEND}.keras"
    first.save(path)
    uninterrupted = sc.fit(sc.compiled_model(init), x, y, epochs=2).get_weights()
    multipliers = {
        _layer_and_name(p): [m.lr_mult, m.decay_mult]
        for p, m in first.optimizer.multipliers.items()
    }
    return {"tmp": tmp, "model": str(path), "uninterrupted": uninterrupted,
            "multipliers": multipliers}


@pytest.fixture(scope="module")
def resumed(saved):
    """Both other backends resume the saved model, side by side."""
    jobs = [
        ({"mode": "resume", "model": saved["model"],
          "out": str(saved["tmp"] / f"resumed_on_{target}.npz")},
         _procs.worker_env(target))
        for target in OTHER_BACKENDS
    ]
    return dict(zip(OTHER_BACKENDS, _procs.run_all(jobs, TIMEOUT_S)))


@pytest.mark.parametrize("target", OTHER_BACKENDS)
def test_saved_here_resumes_there_like_uninterrupted_training(saved, resumed, target):
    weights, facts = resumed[target]
    assert facts["backend"] == target
    assert (facts["wrapper"], facts["inner"]) == ("LayerwiseOptimizer", "Nadam")
    assert facts["iterations_loaded"] == sc.STEPS_PER_EPOCH
    assert facts["iterations_after"] == 2 * sc.STEPS_PER_EPOCH
    # The resolved per-variable multipliers came along (paths may lose the
    # model prefix on reload, so compare by layer/variable).
    assert {_layer_and_name(p): m for p, m in facts["multipliers"].items()} == saved["multipliers"]
    assert sc.max_diff(weights, saved["uninterrupted"]) < TOL


def test_resume_equality_has_teeth(saved):
    """Resuming with a fresh optimizer (state lost) ends measurably elsewhere."""
    x, y = data()
    model = keras.saving.load_model(saved["model"])
    model.compile(optimizer=sc.optimizer("layerwise"), loss="mse")
    sc.fit(model, x, y, epochs=1)
    assert sc.max_diff(model.get_weights(), saved["uninterrupted"]) > 1e-4
