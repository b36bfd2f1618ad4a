"""Every way of training reaches the multipliers: fit, train_on_batch, custom
loops, jit, schedules and LR callbacks, EMA, accumulation, clipping, loss
scaling and mixed precision. References are one optimizer per group."""

import numpy as np
import pytest
import keras

import layerlr
from conftest import only_on
from helpers import (
    data, group_optimizer, hand_multipliers, make_model,
    max_abs_diff, reference_optimizer, twin_models, wrapped,
)


def fit_pair(opt_class, kwargs, reference=None, epochs=2, callbacks=(), ref_callbacks=(), **compile_kwargs):
    model, ref_model = twin_models()
    x, y = data()
    opt = wrapped(opt_class, kwargs)
    model.compile(optimizer=opt, loss="mse", **compile_kwargs)
    reference = reference or reference_optimizer(opt_class, kwargs, hand_multipliers)
    # Built here, not inside LossScaleOptimizer.build, whose disabled tracking
    # would drop Nadam's u_product from the reference's state (a Keras bug).
    reference.build(ref_model.trainable_variables)
    ref_model.compile(optimizer=reference, loss="mse", **compile_kwargs)
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=list(callbacks))
    ref_model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=list(ref_callbacks))
    return model, ref_model, opt


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(learning_rate=0.01, use_ema=True, ema_overwrite_frequency=3),
        dict(learning_rate=0.01, gradient_accumulation_steps=2, weight_decay=0.05),
        dict(learning_rate=0.01, clipvalue=0.01),
        dict(learning_rate=0.01, clipnorm=0.05),
    ],
    ids=["ema", "grad_accumulation", "clipvalue", "clipnorm"],
)
def test_optimizer_features_match_reference(kwargs):
    model, ref_model, _ = fit_pair(keras.optimizers.Adam, kwargs)
    assert max_abs_diff(model, ref_model) < 1e-6


def test_loss_scale_factor_matches_reference():
    kwargs = dict(learning_rate=0.01, loss_scale_factor=128.0)
    reference = reference_optimizer(keras.optimizers.Adam, kwargs, hand_multipliers)
    reference.loss_scale_factor = 128.0
    model, ref_model, opt = fit_pair(keras.optimizers.Adam, kwargs, reference=reference)
    assert opt.loss_scale_factor == 128.0
    assert float(opt.scale_loss(2.0)) == 256.0
    assert max_abs_diff(model, ref_model) < 1e-6


def test_callable_learning_rate():
    model, ref_model, opt = fit_pair(keras.optimizers.SGD, dict(learning_rate=lambda: 0.05, momentum=0.9))
    assert max_abs_diff(model, ref_model) < 1e-6
    assert float(opt.learning_rate) == pytest.approx(0.05)


class SetGroupRates(keras.callbacks.Callback):
    """Reference for an LR callback: set each group's absolute rate by hand."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def on_epoch_begin(self, epoch, logs=None):
        for (lr_mult, _), opt in self.groups.items():
            opt.learning_rate = self.schedule(epoch) * lr_mult


def test_learning_rate_scheduler_keeps_every_ratio():
    schedule = lambda epoch: 0.02 / (epoch + 1)  # noqa: E731
    groups = {}

    def route(variable):
        key = hand_multipliers(variable.path)
        if key not in groups:
            groups[key] = group_optimizer(keras.optimizers.Adam, dict(learning_rate=0.02), *key)
        return groups[key]

    setter = SetGroupRates(schedule)
    setter.groups = groups
    model, ref_model, opt = fit_pair(
        keras.optimizers.Adam, dict(learning_rate=0.02),
        reference=keras.optimizers.MultiOptimizer(route), epochs=3,
        callbacks=[keras.callbacks.LearningRateScheduler(lambda e, lr: schedule(e))],
        ref_callbacks=[setter],
    )
    assert float(opt.learning_rate) == pytest.approx(schedule(2))
    assert float(opt.inner_optimizer.learning_rate) == pytest.approx(schedule(2))
    assert max_abs_diff(model, ref_model) < 1e-6


def test_reduce_lr_on_plateau_reads_and_sets_the_base_rate():
    model = make_model()
    x, y = data()
    opt = wrapped(keras.optimizers.Adam, dict(learning_rate=0.01))
    model.compile(optimizer=opt, loss="mse")
    # min_delta so large that every epoch counts as a plateau.
    reduce = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9, min_lr=0.0)
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[reduce])
    # Epoch 0 improves on the initial inf; epochs 1 and 2 each halve the rate.
    assert float(opt.learning_rate) == pytest.approx(0.01 * 0.5**2)
    # History records the rate each epoch trained with.
    assert history.history["learning_rate"] == pytest.approx([0.01, 0.01, 0.005])
    assert opt.multipliers["d1/kernel"].lr_mult == 0.1


def test_train_on_batch_matches_reference():
    model, ref_model = twin_models()
    x, y = data()
    model.compile(optimizer=wrapped(keras.optimizers.RMSprop, dict(learning_rate=0.01)), loss="mse")
    ref_model.compile(optimizer=reference_optimizer(keras.optimizers.RMSprop, dict(learning_rate=0.01), hand_multipliers), loss="mse")
    for start in range(0, 64, 16):
        for m in (model, ref_model):
            m.train_on_batch(x[start:start + 16], y[start:start + 16])
    assert max_abs_diff(model, ref_model) < 1e-6


@only_on("tensorflow")
@pytest.mark.parametrize("jit", [False, True])
def test_gradient_tape_loop_with_apply_gradients(jit):
    import tensorflow as tf

    model, ref_model = twin_models()
    x, y = data()
    opt = wrapped(keras.optimizers.AdamW, dict(learning_rate=0.01, weight_decay=0.1))
    ref = reference_optimizer(keras.optimizers.AdamW, dict(learning_rate=0.01, weight_decay=0.1), hand_multipliers)

    def make_step(m, o):
        @tf.function(jit_compile=jit)
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.mean_squared_error(yb, m(xb)))
            grads = tape.gradient(loss, m.trainable_variables)
            return o.apply_gradients(zip(grads, m.trainable_variables))
        return step

    opt.build(model)  # the layer-type rule needs the model's layers
    steps = [make_step(model, opt), make_step(ref_model, ref)]
    for start in range(0, 64, 16):
        for step in steps:
            step(x[start:start + 16], y[start:start + 16])
    assert int(opt.iterations) == 4
    assert max_abs_diff(model, ref_model) < 1e-6


def test_global_clipnorm_is_over_all_variables():
    """Documented choice: one norm over the whole model, like clip_grad_norm_."""
    model, ref_model = twin_models()
    x, y = data()
    model.compile(optimizer=wrapped(keras.optimizers.SGD, dict(learning_rate=0.1, global_clipnorm=0.01)), loss="mse")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)

    grads = _grads_of(ref_model, x, y)
    norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in grads))
    scale = min(1.0, 0.01 / norm)
    for var, g in zip(ref_model.trainable_variables, grads):
        lr_mult = hand_multipliers(var.path)[0]
        var.assign(var.numpy() - 0.1 * lr_mult * scale * g)
    assert max_abs_diff(model, ref_model) < 1e-6


def _grads_of(model, x, y):
    """Gradients by finite-free autodiff of the reference copy (numpy arrays)."""
    probe = keras.optimizers.SGD(1.0)
    snapshot = [v.numpy().copy() for v in model.trainable_variables]
    model.compile(optimizer=probe, loss="mse")
    model.train_on_batch(x, y)  # one SGD step at lr 1: w_new = w - g
    grads = [s - v.numpy() for s, v in zip(snapshot, model.trainable_variables)]
    for v, s in zip(model.trainable_variables, snapshot):
        v.assign(s)
    return grads


@pytest.mark.parametrize(
    "opt_class, kwargs",
    [(keras.optimizers.Ftrl, dict(learning_rate=0.1)),
     (keras.optimizers.Adam, dict(learning_rate=0.1, weight_decay=0.5)),
     (keras.optimizers.Nadam, dict(learning_rate=0.1))],
    ids=["ftrl", "adam", "nadam"],
)
def test_zero_lr_mult_leaves_variable_and_slots_untouched(opt_class, kwargs):
    model, ref_model = twin_models()
    x, y = data()
    opt = layerlr.LayerwiseOptimizer(opt_class(**kwargs), lr_mult={"d1": 0.0})
    model.compile(optimizer=opt, loss="mse")
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    after = {v.path: v.numpy() for v in model.trainable_variables}
    for path in before:
        frozen = path.startswith("d1/")
        assert np.array_equal(before[path], after[path]) == frozen, path
    assert all(np.isfinite(a).all() for a in after.values())
    # Slots of the zero-rate variables keep their initial values.
    fresh = opt_class(**kwargs)
    fresh.build(ref_model.trainable_variables)
    d1_slots = lambda o: {v.name: v.numpy() for v in o.variables if v.name.startswith("d1_")}  # noqa: E731
    trained, initial = d1_slots(opt.inner_optimizer), d1_slots(fresh)
    assert trained and trained.keys() == initial.keys()
    for name in trained:
        assert np.array_equal(trained[name], initial[name]), name
    # ...while the other variables' slots did move.
    moved = [v for v in opt.inner_optimizer.variables if v.name.startswith("d2_kernel")]
    assert moved and any(np.any(v.numpy() != 0) for v in moved)


def test_exclude_from_weight_decay_is_still_honoured():
    model, ref_model = twin_models()
    x, y = data()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.AdamW(0.01, weight_decay=0.2), lr_mult={"d2": 0.5})
    opt.exclude_from_weight_decay(var_list=[model.get_layer("d2").kernel])
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)

    def route_mults(path):
        lr = 0.5 if path.startswith("d2/") else 1.0
        return lr, (0.0 if path == "d2/kernel" else 1.0)

    ref_model.compile(optimizer=reference_optimizer(keras.optimizers.AdamW, dict(learning_rate=0.01, weight_decay=0.2), route_mults), loss="mse")
    ref_model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert max_abs_diff(model, ref_model) < 1e-6


@pytest.mark.parametrize("opt_class", [keras.optimizers.Adam, keras.optimizers.Nadam], ids=["adam", "nadam"])
def test_mixed_float16_wraps_us_in_loss_scaling_and_trains_correctly(opt_class):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model, ref_model, opt = fit_pair(opt_class, dict(learning_rate=0.01))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer is opt
    assert isinstance(ref_model.optimizer, keras.optimizers.LossScaleOptimizer)
    # Nadam's u_product must be tracked even though LSO.build turns tracking off.
    assert len(model.optimizer.variables) == len(model.optimizer._variables) + len(opt.variables)
    plain = opt_class(learning_rate=0.01)
    plain.build(model.trainable_variables)
    assert len(opt.inner_optimizer.variables) == len(plain.variables)
    assert max_abs_diff(model, ref_model) < 1e-6


def test_swap_ema_weights_under_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = make_model()
    x, y = data()
    model.compile(optimizer=wrapped(keras.optimizers.Adam, dict(learning_rate=0.01, use_ema=True)), loss="mse")
    model.fit(x, y, epochs=1, verbose=0, callbacks=[keras.callbacks.SwapEMAWeights(swap_on_epoch=True)])
    assert np.isfinite(model.get_weights()[0]).all()
