"""Variables that start training late train like a torch param group added then.

The reference is PyTorch (`tests/torch_reference.py`): the backbone joins the
optimizer with ``add_param_group`` at step k, with fresh state and its own step
count, while the head has trained since step 0. layerlr must give the same
weights however the backbone joins: recompiling after ``trainable = True``,
`GradualUnfreezing`, a `FreezeThenWarmup` multiplier, or ``load_model`` in a
fresh process followed by unfreezing. Errors are relative to how far the
weights moved, as in the other equivalence tests.

The CI slice runs the cases most likely to break; ``-m slow`` runs the whole
matrix (every optimizer x every way of joining x EMA, mixed precision and
gradient accumulation).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import keras

import layerlr
import torch_reference
from conftest import BACKEND

ROWS, BATCH, FROZEN_EPOCHS, EPOCHS = 32, 8, 2, 4
STEPS_PER_EPOCH = ROWS // BATCH
BASE_LR = {"sgd": 0.05, "adam": 0.01, "adamw": 0.01, "nadam": 0.01, "adamax": 0.01,
           "rmsprop": 0.005, "adagrad": 0.05, "lion": 0.002, "lamb": 0.01,
           "adafactor": 0.05}
BACKBONE_MULT = 0.3
BIAS_DECAY_MULT = 0.0
JOINS = ("recompile", "gradual", "schedule", "reload")


def make_model(dtype=None):
    return keras.Sequential(
        [keras.Input((6,)),
         keras.layers.Dense(8, activation="tanh", name="backbone", dtype=dtype),
         keras.layers.Dense(3, name="head", dtype=dtype)],
        name="net",
    )


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 6)).astype("float32")
    y = rng.normal(size=(ROWS, 3)).astype("float32")
    return x, y


def make_optimizer(name, join, accumulate=None, ema=None, backbone=None):
    kwargs = dict(torch_reference.KERAS_KWARGS[name], learning_rate=BASE_LR[name])
    if accumulate:
        kwargs["gradient_accumulation_steps"] = accumulate
    if ema:
        kwargs.update(use_ema=True, ema_momentum=ema)
    inner = getattr(keras.optimizers, torch_reference.KERAS_CLASS[name])(**kwargs)
    steps_frozen = FROZEN_EPOCHS * STEPS_PER_EPOCH // (accumulate or 1)
    mult = (layerlr.schedules.FreezeThenWarmup(steps_frozen, value=BACKBONE_MULT)
            if join == "schedule" else BACKBONE_MULT)
    decay = {"*bias": BIAS_DECAY_MULT} if inner.weight_decay else None
    return layerlr.LayerwiseOptimizer(inner, lr_mult={backbone or "backbone": mult}, decay_mult=decay)


def reference(name, weights, accumulate=1, ema=None):
    x, y = make_data()
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, ROWS, BATCH)] * EPOCHS
    lr = BASE_LR[name]
    wd = torch_reference.KERAS_KWARGS[name].get("weight_decay", 0.0)
    start = FROZEN_EPOCHS * STEPS_PER_EPOCH // accumulate
    rates = [lr * BACKBONE_MULT, lr * BACKBONE_MULT, lr, lr]
    decays = [wd, wd * BIAS_DECAY_MULT, wd, wd * BIAS_DECAY_MULT]
    return torch_reference.train(name, weights, batches, rates, decays, [start, start, 0, 0],
                                 accumulate=accumulate, ema_momentum=ema)


def train_keras(name, join, tmp_path, accumulate=None, ema=None, policy=None, callbacks=()):
    """Trains with the backbone joining after FROZEN_EPOCHS; returns (initial, final) weights."""
    x, y = make_data()
    model = make_model(dtype=policy)
    initial = [w.copy() for w in model.get_weights()]
    backbone = model.get_layer("backbone")
    opt = make_optimizer(name, join, accumulate, ema, backbone)
    fit = dict(batch_size=BATCH, shuffle=False, verbose=0)
    if join == "schedule":
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, epochs=EPOCHS, callbacks=list(callbacks), **fit)
    elif join == "gradual":
        model.compile(optimizer=opt, loss="mse")
        unfreeze = layerlr.GradualUnfreezing([model.get_layer("head"), backbone], every=FROZEN_EPOCHS)
        model.fit(x, y, epochs=EPOCHS, callbacks=[unfreeze, *callbacks], **fit)
    elif join == "recompile":
        backbone.trainable = False
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, epochs=FROZEN_EPOCHS, **fit)
        backbone.trainable = True
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, epochs=EPOCHS - FROZEN_EPOCHS, **fit)
    else:  # reload: first phase here, second in a fresh process
        backbone.trainable = False
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, epochs=FROZEN_EPOCHS, **fit)
        path = tmp_path / "phase1.keras"
        model.save(path)
        out = tmp_path / "final.npz"
        run_fresh_process(path, out)
        return initial, list(np.load(out).values())
    return initial, model.get_weights()


SECOND_PHASE = """
import sys, numpy as np, keras, layerlr
from test_late_start import make_data, BATCH, EPOCHS, FROZEN_EPOCHS
model = keras.models.load_model(sys.argv[1])
model.get_layer("backbone").trainable = True
model.compile(optimizer=model.optimizer, loss="mse")
x, y = make_data()
model.fit(x, y, batch_size=BATCH, epochs=EPOCHS - FROZEN_EPOCHS, shuffle=False, verbose=0)
np.savez(sys.argv[2], *model.get_weights())
"""


def run_fresh_process(model_path: Path, out: Path) -> None:
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", SECOND_PHASE, str(model_path), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def relative_error(initial, final, expected) -> float:
    moved = max(float(np.max(np.abs(e - i))) for i, e in zip(initial, expected))
    return max(float(np.max(np.abs(f - e))) for f, e in zip(final, expected)) / moved


# The CI slice: every way of joining with Adam (whose bias correction shows
# a shared step count at once), and the other step-counting optimizers.
FAST = {("adam", j) for j in JOINS} | {("nadam", "gradual"), ("adamw", "recompile"),
                                       ("adamax", "schedule"), ("lamb", "recompile"),
                                       ("sgd", "gradual"), ("adafactor", "gradual")}
CASES = [
    pytest.param(name, join, id=f"{name}-{join}",
                 marks=() if (name, join) in FAST else pytest.mark.slow)
    for name in torch_reference.KERAS_CLASS for join in JOINS
]


@pytest.mark.parametrize("name, join", CASES)
def test_late_backbone_trains_like_a_torch_param_group_added_then(name, join, tmp_path):
    initial, final = train_keras(name, join, tmp_path)
    expected = reference(name, initial)
    assert relative_error(initial, final, expected) < 1e-4


@pytest.mark.parametrize("join", ["gradual", pytest.param("schedule", marks=pytest.mark.slow)])
def test_gradient_accumulation(join, tmp_path):
    initial, final = train_keras("adam", join, tmp_path, accumulate=2)
    assert relative_error(initial, final, reference("adam", initial, accumulate=2)) < 1e-4


@pytest.mark.parametrize("join", ["gradual", "recompile", pytest.param("schedule", marks=pytest.mark.slow)])
def test_mixed_float16_trains_the_late_backbone_and_the_head(join, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        initial, final = train_keras("adam", join, tmp_path, policy="mixed_float16")
    finally:
        keras.config.set_dtype_policy("float32")
    expected = reference("adam", initial)
    # float16 activations: looser, but a shared step count (first backbone
    # steps off by ~40%) or a head that stopped training is far outside it.
    assert relative_error(initial, final, expected) < 2e-2


@pytest.mark.parametrize("join", ["gradual", pytest.param("schedule", marks=pytest.mark.slow)])
def test_ema_average_of_a_late_variable_starts_at_its_own_first_step(join, tmp_path):
    swapped = {}

    class RecordSwapped(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after SwapEMAWeights put the averages in
            swapped[epoch] = [w.copy() for w in self.model.get_weights()]

    callbacks = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True), RecordSwapped()]
    initial, final = train_keras("adam", join, tmp_path, ema=0.8, callbacks=callbacks)
    weights, averages = reference("adam", initial, ema=0.8)
    moved = max(float(np.max(np.abs(w - i))) for i, w in zip(initial, weights))
    # fit ends by writing the averages into the model (finalize_variable_values).
    assert max(float(np.max(np.abs(f - a))) for f, a in zip(final, averages)) / moved < 1e-4
    assert max(float(np.max(np.abs(s - a))) for s, a in zip(swapped[EPOCHS - 1], averages)) / moved < 1e-4


def test_after_load_a_saved_layer_rule_never_selects_an_equally_named_layer(tmp_path):
    def block(name):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="d")], name=name)

    inputs = keras.Input((4,))
    enc, dec = block("enc"), block("dec")
    model = keras.Model(inputs, dec(enc(inputs)), name="outer")
    dec.trainable = False
    model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={enc: 0.1}), loss="mse")
    x = np.ones((8, 4), "float32")
    model.fit(x, x, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")

    loaded = keras.models.load_model(tmp_path / "m.keras")
    for layer in (loaded.get_layer("dec"), loaded.get_layer("dec").get_layer("d")):
        layer.trainable = True  # a loaded Sequential keeps its layers' own saved flags
    loaded.compile(optimizer=loaded.optimizer, loss="mse")
    loaded.fit(x, x, epochs=1, verbose=0)
    # Keras drops the outer prefixes: both kernels are now "d/kernel".
    assert [v.path for v in loaded.trainable_variables] == ["d/kernel", "d/bias"] * 2
    lr = [m.lr_mult for m in loaded.optimizer.multipliers.values()]
    assert lr == [0.1, 0.1, 1.0, 1.0]  # enc (trained before saving), then dec


def test_apply_without_variables_checks_the_gradient_count():
    model = make_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1))
    opt.build(model.trainable_variables)
    grads = [keras.ops.zeros(v.shape) for v in model.trainable_variables]
    with pytest.raises(ValueError, match="Got 3 gradients, but the optimizer updates 4 variables"):
        opt.apply(grads[:3])


@pytest.mark.parametrize("name", ["nadam", pytest.param("adam", marks=pytest.mark.slow)])
def test_backup_and_restore_resumes_exactly_after_unfreezing(name, tmp_path):
    """Killed after the backbone joined; the resumed run ends where torch's uninterrupted one does."""

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == EPOCHS - 1:
                raise RuntimeError("simulated crash")

    def run(model, crash):
        x, y = make_data()
        backbone = model.get_layer("backbone")
        model.compile(optimizer=make_optimizer(name, "gradual", backbone=backbone), loss="mse")
        callbacks = [keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
                     layerlr.GradualUnfreezing([model.get_layer("head"), backbone], every=FROZEN_EPOCHS)]
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=callbacks + ([Crash()] if crash else []))

    first = make_model()
    initial = [w.copy() for w in first.get_weights()]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(first, crash=True)
    resumed = make_model()  # fresh model and optimizer, restored from the backup
    run(resumed, crash=False)
    opt = resumed.optimizer
    assert int(opt.iterations) == EPOCHS * STEPS_PER_EPOCH
    assert sorted(m.start_step for m in opt.multipliers.values()) == [0, 0] + [FROZEN_EPOCHS * STEPS_PER_EPOCH] * 2
    assert relative_error(initial, resumed.get_weights(), reference(name, initial)) < 1e-4


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute needs the tensorflow backend")
@pytest.mark.parametrize("name", ["nadam", pytest.param("adam", marks=pytest.mark.slow)])
def test_mirrored_strategy_with_two_replicas(name, tmp_path):
    import _procs
    import _scenarios as sc

    initial = make_model().get_weights()
    sc.save_weights(tmp_path / "init.npz", initial)
    job = {"mode": "tf_mirrored_late_start", "init": str(tmp_path / "init.npz"),
           "out": str(tmp_path / "out.npz"), "optimizer": name}
    distributed, facts = _procs.run_one(job, _procs.worker_env("tensorflow"), 240)
    assert facts["replicas"] == 2
    assert relative_error(initial, distributed, reference(name, initial)) < 1e-4


def test_a_schedule_at_zero_without_start_step_is_refused_naming_it():
    model = make_model()
    at_zero = keras.optimizers.schedules.PolynomialDecay(0.0, 10, end_learning_rate=1.0)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01), lr_mult={"backbone": at_zero})
    with pytest.raises(ValueError, match=r"'net/backbone/kernel' is 0 at step 0, and Adam counts steps") as info:
        opt.build(model)
    assert "start_step" in str(info.value)


def test_a_saved_path_that_could_be_two_variables_is_refused_naming_both():
    from types import SimpleNamespace

    from layerlr.core._resolution import match_saved

    enc, dec = SimpleNamespace(path="enc/d/kernel"), SimpleNamespace(path="dec/d/kernel")
    result = match_saved(["d/kernel"], [enc, dec], [])
    assert isinstance(result, str)
    assert "'enc/d/kernel'" in result and "'dec/d/kernel'" in result
