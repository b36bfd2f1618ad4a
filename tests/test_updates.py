"""UpdateLogger: per-group update ratios, weight and gradient norms.

Every number the logger records is checked against an independent
computation: a twin model trained by a hand-written loop (its gradients from
`helpers.gradients`, its weights read before and after each step), or a
recorder callback that copies the weights itself, with the norms taken by
numpy here. Grouping follows the rules (by identity), as in LearningRateLogger.
"""

import csv
import math

import numpy as np
import pytest
import keras

import layerlr
from layerlr.callbacks import UpdateLogger
from conftest import BACKEND
from helpers import data, gradients, make_model

# Backend-neutral bookkeeping (epoch logs, files, argument checks) runs on
# TensorFlow only; what reads weights and optimizer state runs on every backend.
tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="backend-neutral")

# make_model(): d1, d2 (Dense), ln (LayerNormalization), head (Dense).
RULES = {"d1": 0.1, keras.layers.LayerNormalization: 0.5}
GROUPS = {"d1": ["d1"], "LayerNormalization": ["ln"], "default": ["d2", "head"]}


def layer_of(path):
    return path.split("/")[-2]


def by_path(model):
    return {v.path: np.array(keras.ops.convert_to_numpy(v.value), dtype=np.float64)
            for v in model.trainable_variables}


def group_numbers(before, after, grads, layers):
    paths = [p for p in before if layer_of(p) in layers]
    delta = math.sqrt(sum(np.sum((after[p] - before[p]) ** 2) for p in paths))
    weight = math.sqrt(sum(np.sum(before[p] ** 2) for p in paths))
    grad = math.sqrt(sum(np.sum(grads[p] ** 2) for p in paths)) if grads else None
    return delta / weight, weight, grad


class Recorder(keras.callbacks.Callback):
    """Copies every trainable weight before each step and after the last one."""

    def on_train_begin(self, logs=None):
        self.before = []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append(by_path(self.model))

    def on_train_end(self, logs=None):
        self.final = by_path(self.model)

    def step(self, i):
        after = self.before[i + 1] if i + 1 < len(self.before) else self.final
        return self.before[i], after


@pytest.mark.parametrize("optimizer", [
    keras.optimizers.Adam, pytest.param(keras.optimizers.Lion, marks=tensorflow_only)])
def test_numbers_match_a_hand_written_training_loop(optimizer):
    x, y = data(16)
    model = make_model()
    twin = make_model()
    twin.set_weights(model.get_weights())
    model.compile(optimizer=layerlr.LayerwiseOptimizer(optimizer(1e-2), lr_mult=RULES), loss="mse")
    reference = layerlr.LayerwiseOptimizer(optimizer(1e-2), lr_mult=RULES)
    reference.build(twin)
    logger = UpdateLogger(every=2)
    # One batch per epoch: the step's gradient is the full-data gradient.
    model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0, callbacks=[logger])

    assert logger.history["step"] == [0, 2, 4]
    # The groups of the summary (and of `layerlr inspect`, LearningRateLogger).
    assert {r["group"] for r in layerlr.summary_records(model)} == set(GROUPS)
    expected = {f"{m}/{g}": [] for m in ("update_ratio", "weight_norm", "grad_norm") for g in GROUPS}
    for step in range(5):
        before = by_path(twin)
        grads = gradients(twin, x, y)
        grads_by_path = {v.path: np.asarray(keras.ops.convert_to_numpy(g), dtype=np.float64)
                         for v, g in zip(twin.trainable_variables, grads)}
        reference.apply(grads, twin.trainable_variables)
        if step % 2 == 0:
            for group, layers in GROUPS.items():
                ratio, weight, grad = group_numbers(before, by_path(twin), grads_by_path, layers)
                expected[f"update_ratio/{group}"].append(ratio)
                expected[f"weight_norm/{group}"].append(weight)
                expected[f"grad_norm/{group}"].append(grad)
    for key, values in expected.items():
        assert logger.history[key] == pytest.approx(values, rel=2e-3), key
    for group in GROUPS:
        assert logger.history[f"status/{group}"] == ["trained"] * 3
    # The groups are the rates': lr_mult 0.1 moves d1 far less than the default.
    assert max(logger.history["update_ratio/d1"]) < min(logger.history["update_ratio/default"])


def test_training_is_bit_identical_with_and_without_the_logger():
    x, y = data(32)
    first = make_model()
    second = make_model()
    second.set_weights(first.get_weights())
    for model in (first, second):
        model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-2), lr_mult=RULES),
                      loss="mse")
    first.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    second.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
               callbacks=[UpdateLogger(every=1)])
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_frozen_groups_unfreezing_and_lr_mult_zero():
    x, y = data(16)
    model = make_model()
    d1, d2, ln, head = (model.get_layer(n) for n in ("d1", "d2", "ln", "head"))
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.Adam(1e-2), lr_mult=[(d1, 0.0), (d2, 0.5), (ln, 0.5)]
    )
    model.compile(optimizer=opt, loss="mse")
    logger, recorder = UpdateLogger(every=1), Recorder()
    unfreeze = layerlr.GradualUnfreezing([[head, ln], d2, d1], every=1)
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
              callbacks=[unfreeze, logger, recorder])
    history = logger.history
    assert history["step"] == [0, 1, 2, 3, 4, 5]
    # d2 trains from epoch 1 (steps 2-5); d1 is unfrozen at epoch 2 but at lr_mult 0.
    assert history["status/d2"] == ["frozen"] * 2 + ["trained"] * 4
    assert history["status/d1"] == ["frozen"] * 4 + ["not updated"] * 2
    assert history["status/ln"] == history["status/default"] == ["trained"] * 6
    assert np.isnan(history["update_ratio/d2"][:2]).all()
    assert history["update_ratio/d1"][4:] == [0.0, 0.0]
    assert np.isnan(history["grad_norm/d1"][4:]).all()  # its moments never moved
    for step in range(6):
        before, after = recorder.step(step)
        for group, layers in (("d2", ["d2"]), ("ln", ["ln"]), ("default", ["head"])):
            if history[f"status/{group}"][step] != "trained":
                continue
            ratio, weight, _ = group_numbers(before, after, None, layers)
            assert history[f"update_ratio/{group}"][step] == pytest.approx(ratio, rel=1e-6)
            assert history[f"weight_norm/{group}"][step] == pytest.approx(weight, rel=1e-6)
    # The unfrozen group's gradient is read from moments created at unfreezing.
    assert all(g > 0 for g in history["grad_norm/d2"][2:])


@tensorflow_only
def test_epoch_logs_history_csv_and_tensorboard(tmp_path):
    x, y = data(32)
    model = make_model()
    model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-2), lr_mult=RULES),
                  loss="mse")
    logger = UpdateLogger(every=3)
    callbacks = [logger, keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))]
    board = None
    try:
        import tensorboard  # noqa: F401
        board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb"), write_graph=False)
        callbacks.insert(0, board)  # before the logger: the logger writes the epoch means itself
    except ImportError:
        pass
    history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
    steps = logger.history["step"]
    assert steps == [0, 3, 6, 9]  # 4 steps per epoch
    # Epoch e gets the mean of its measured steps: epoch 0 has 0 and 3, epoch 1 has 6...
    per_epoch = {0: [0, 1], 1: [2], 2: [3]}
    for group in GROUPS:
        key = f"update_ratio/{group}"
        means = [np.mean([logger.history[key][i] for i in idx]) for idx in per_epoch.values()]
        assert history.history[key] == pytest.approx(means, rel=1e-12)
    assert history.layerlr_updates is logger.history  # what plot.update_ratios(history) reads
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert float(rows[1]["grad_norm/d1"]) == pytest.approx(history.history["grad_norm/d1"][1])
    if board is not None:
        from test_summary import read_scalars

        scalars = read_scalars(str(tmp_path / "tb"))
        points = sorted(scalars["update_ratio/d1"])
        assert [s for s, _ in points] == steps
        assert [v for _, v in points] == pytest.approx(logger.history["update_ratio/d1"], rel=1e-6)
        epochs = sorted(scalars["epoch_update_ratio/d1"])
        assert [s for s, _ in epochs] == [0, 1, 2]
        assert [v for _, v in epochs] == pytest.approx(history.history["update_ratio/d1"], rel=1e-6)


def test_multi_optimizer_groups_are_its_sub_optimizers():
    x, y = data(16)
    model = make_model()
    inner = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-2), lr_mult={"d2": 0.1})
    opt = layerlr.multi_optimizer({"d1": keras.optimizers.SGD(0.1), ("d2", "ln", "head"): inner})
    model.compile(optimizer=opt, loss="mse")
    logger, recorder = UpdateLogger(every=1), Recorder()
    with pytest.warns(UserWarning, match="SGD keeps none"):
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[logger, recorder])
    groups = {k.split("/", 1)[1] for k in logger.history if k.startswith("update_ratio/")}
    # The wrapper is named after the optimizer it wraps.
    assert groups == {"sgd", "adam/d2", "adam/default"}
    layers = {"sgd": ["d1"], "adam/d2": ["d2"], "adam/default": ["ln", "head"]}
    for step in range(2):
        before, after = recorder.step(step)
        for group, members in layers.items():
            ratio, _, _ = group_numbers(before, after, None, members)
            assert logger.history[f"update_ratio/{group}"][step] == pytest.approx(ratio, rel=1e-6)
    assert np.isnan(logger.history["grad_norm/sgd"]).all()
    assert all(g > 0 for g in logger.history["grad_norm/adam/d2"])


def test_mixed_precision_reads_the_unscaled_gradient():
    x, y = data(16)
    twin = make_model()  # float32: the reference gradients
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = make_model()
    model.set_weights(twin.get_weights())
    model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-2), lr_mult=RULES),
                  loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    logger, recorder = UpdateLogger(every=1), Recorder()
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[logger, recorder])
    trained = [i for i, s in enumerate(logger.history["status/default"]) if s == "trained"]
    assert trained, logger.history["status/default"]
    for step in trained:
        before, after = recorder.step(step)
        twin.set_weights([before[v.path].astype("float32") for v in twin.trainable_variables])
        grads = {v.path: np.asarray(keras.ops.convert_to_numpy(g), dtype=np.float64)
                 for v, g in zip(twin.trainable_variables, gradients(twin, x, y))}
        for group, layers in GROUPS.items():
            ratio, _, grad = group_numbers(before, after, grads, layers)
            assert logger.history[f"update_ratio/{group}"][step] == pytest.approx(ratio, rel=1e-6)
            # float16 forward pass against a float32 one: a loose match.
            assert logger.history[f"grad_norm/{group}"][step] == pytest.approx(grad, rel=2e-2)


@tensorflow_only
def test_layer_groups_and_a_plain_optimizer():
    x, y = data(16)
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    by_layer, default = UpdateLogger(every=1, groups="layers"), UpdateLogger(every=1)
    recorder = Recorder()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[by_layer, default, recorder])
    assert {k for k in by_layer.history if k.startswith("update_ratio/")} == {
        "update_ratio/d1", "update_ratio/d2", "update_ratio/ln", "update_ratio/head"
    }
    assert {k for k in default.history if k.startswith("update_ratio/")} == {"update_ratio/default"}
    before, after = recorder.step(0)
    for layer in ("d1", "d2", "ln", "head"):
        ratio, _, _ = group_numbers(before, after, None, [layer])
        assert by_layer.history[f"update_ratio/{layer}"][0] == pytest.approx(ratio, rel=1e-6)
    ratio, _, _ = group_numbers(before, after, None, ["d1", "d2", "ln", "head"])
    assert default.history["update_ratio/default"][0] == pytest.approx(ratio, rel=1e-6)


@tensorflow_only
def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="every must be a positive number of steps"):
        UpdateLogger(every=0)
    with pytest.raises(ValueError, match="every must be a positive number"):
        UpdateLogger(every=2.5)
    with pytest.raises(ValueError, match="groups must be None .* or 'layers'"):
        UpdateLogger(groups="layer")
    model = make_model()
    model.compile(optimizer="adam", loss="mse", steps_per_execution=2)
    with pytest.raises(ValueError, match="steps_per_execution=2"):
        model.fit(*data(8), verbose=0, callbacks=[UpdateLogger()])


@pytest.mark.skipif(BACKEND != "jax", reason="JAX dispatches fit's steps asynchronously")
def test_on_jax_the_logger_waits_for_the_dispatched_steps_before_it_reads():
    # The wait is done once, apart from the reads (the benchmark times it
    # apart): after it, every array of the training state is computed.
    from layerlr.core import _keras

    seen = []

    class Waiting(UpdateLogger):
        def _settle(self):
            super()._settle()
            state = _keras.jax_training_state(self._bare_model())
            if state is not None:
                arrays = [*state["trainable_variables"], *state["optimizer_variables"]]
                seen.append(all(a.is_ready() for a in arrays))

    x, y = data(64)
    model = make_model()
    model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-2), lr_mult=RULES), loss="mse")
    logger = Waiting(every=3)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    assert logger.history["step"] == [0, 3, 6, 9, 12, 15]
    assert seen and all(seen)
