"""JAX backend: all optimizer state lives in `optimizer.variables`.

Under JAX, `model.fit` and hand-written `jax.jit` steps run the optimizer
through `stateless_apply`: state is passed in and read back as arrays, so any
state kept outside `optimizer.variables` is silently reset every step. The
reference is one optimizer per multiplier group (Keras' MultiOptimizer),
trained with `model.fit` on a twin model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import keras

import layerlr
from conftest import only_on
from helpers import (
    DECAY_RULES, LR_RULES, data, hand_multipliers, make_model, max_abs_diff, reference_optimizer,
    twin_models,
)

pytestmark = only_on("jax")

NADAM = dict(learning_rate=0.01, weight_decay=0.02)
BATCH = 16
EPOCHS = 2


def nadam_u_product(steps, beta_1=0.9):
    """Keras Nadam: u_product_t = prod_{i<=t} beta_1 * (1 - 0.5 * 0.96**i)."""
    return math.prod(beta_1 * (1.0 - 0.5 * 0.96 ** i) for i in range(1, steps + 1))


def train_with_hand_written_jit_step(model, optimizer, x, y, epochs=EPOCHS):
    """The JAX custom-loop recipe: pure step under jax.jit, state threaded through."""
    import jax

    optimizer.build(model)  # model, not variables: layer-type rules need its layers

    def loss_fn(trainable, non_trainable, xb, yb):
        pred, non_trainable = model.stateless_call(trainable, non_trainable, xb, training=True)
        return keras.ops.mean(keras.losses.mean_squared_error(yb, pred)), non_trainable

    @jax.jit
    def train_step(state, xb, yb):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, xb, yb
        )
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    for _ in range(epochs):
        for start in range(0, len(x), BATCH):
            _, state = train_step(state, x[start:start + BATCH], y[start:start + BATCH])
    trainable, non_trainable, opt_vars = state
    for v, value in zip(model.trainable_variables, trainable):
        v.assign(value)
    for v, value in zip(model.non_trainable_variables, non_trainable):
        v.assign(value)
    for v, value in zip(optimizer.variables, opt_vars):
        v.assign(value)
    return model


def fit_reference(model, x, y):
    model.compile(
        optimizer=reference_optimizer(keras.optimizers.Nadam, NADAM, hand_multipliers), loss="mse"
    )
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return model


def test_nadam_state_is_all_in_optimizer_variables():
    inner = keras.optimizers.Nadam(**NADAM)
    opt = layerlr.LayerwiseOptimizer(inner, lr_mult=LR_RULES, decay_mult=DECAY_RULES)
    model, _ = twin_models()
    opt.build(model)
    variables = {id(v) for v in opt.variables}
    assert id(inner._u_product) in variables
    assert id(inner.iterations) in variables
    assert all(id(v) in variables for v in inner._momentums + inner._velocities)
    # LossScaleOptimizer builds its inner optimizer with tracking off; the
    # wrapper must still register Nadam's u_product.
    lso = keras.optimizers.LossScaleOptimizer(
        layerlr.LayerwiseOptimizer(keras.optimizers.Nadam(**NADAM), lr_mult={"d1": 0.1})
    )
    lso.build(model.trainable_variables)
    assert id(lso.inner_optimizer.inner_optimizer._u_product) in {id(v) for v in lso.variables}


def test_hand_written_jit_step_with_stateless_apply_matches_reference():
    x, y = data()
    model, reference = twin_models()
    inner = keras.optimizers.Nadam(**NADAM)
    opt = layerlr.LayerwiseOptimizer(inner, lr_mult=LR_RULES, decay_mult=DECAY_RULES)
    train_with_hand_written_jit_step(model, opt, x, y)
    fit_reference(reference, x, y)
    assert max_abs_diff(model, reference) < 1e-6

    steps = EPOCHS * len(x) // BATCH
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == steps
    # u_product carried from step to step (not reset to 1.0 each step).
    u_product = float(keras.ops.convert_to_numpy(inner._u_product))
    assert u_product == pytest.approx(nadam_u_product(steps), rel=1e-6)
    assert not math.isclose(u_product, nadam_u_product(1), rel_tol=0.5)


def test_model_fit_and_hand_written_jit_step_agree():
    x, y = data()
    fitted, hand = twin_models()
    plain = keras.models.clone_model(fitted)
    plain.set_weights(fitted.get_weights())

    fit_opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.Nadam(**NADAM), lr_mult=LR_RULES, decay_mult=DECAY_RULES
    )
    fitted.compile(optimizer=fit_opt, loss="mse")
    fitted.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    hand_opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.Nadam(**NADAM), lr_mult=LR_RULES, decay_mult=DECAY_RULES
    )
    train_with_hand_written_jit_step(hand, hand_opt, x, y)
    assert max_abs_diff(fitted, hand) < 1e-6
    # Optimizer state agrees too, variable for variable.
    for a, b in zip(fit_opt.variables, hand_opt.variables):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), atol=1e-6
        )

    plain.compile(optimizer=keras.optimizers.Nadam(**NADAM), loss="mse")
    plain.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    assert max_abs_diff(fitted, plain) > 1e-3


def test_multipliers_are_compile_time_constants_of_the_jitted_step():
    """Changing rules means a new optimizer; the traced step keeps its values.

    Documented behaviour: multipliers are Python floats baked into the trace,
    so one trace serves every step (no retracing per step or per group).
    """
    import jax

    x, y = data()
    model, _ = twin_models()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Nadam(0.01), lr_mult=LR_RULES)
    opt.build(model)
    traces = []

    @jax.jit
    def apply(opt_vars, grads, trainable):
        traces.append(1)
        return opt.stateless_apply(opt_vars, grads, trainable)

    trainable = [v.value for v in model.trainable_variables]
    opt_vars = [v.value for v in opt.variables]
    grads = [keras.ops.ones_like(v) for v in trainable]
    for _ in range(5):
        trainable, opt_vars = apply(opt_vars, grads, trainable)
    assert len(traces) == 1
    # The head (lr_mult 1) moved ~10x more than d1 (lr_mult 0.1) under equal grads.
    paths = [v.path for v in model.trainable_variables]
    moved = {
        p: float(np.max(np.abs(np.asarray(new) - keras.ops.convert_to_numpy(v))))
        for p, new, v in zip(paths, trainable, model.trainable_variables)
    }
    d1 = next(m for p, m in moved.items() if p.endswith("d1/bias"))
    head = next(m for p, m in moved.items() if p.endswith("head/bias"))
    assert head / d1 == pytest.approx(10.0, rel=1e-3)


def jitted_stateless_steps(opt, model, steps):
    """``steps`` calls of ``jax.jit(opt.stateless_apply)`` with fixed gradients; the weights."""
    import jax

    opt.build(model)
    apply = jax.jit(opt.stateless_apply)
    trainable = [v.value for v in model.trainable_variables]
    opt_vars = [v.value for v in opt.variables]
    grads = [keras.ops.ones_like(v) * (i + 1) for i, v in enumerate(trainable)]
    for _ in range(steps):
        trainable, opt_vars = apply(opt_vars, grads, trainable)
    return [np.asarray(t) for t in trainable]


def test_distinct_constant_multipliers_reach_the_jitted_step_as_the_same_values(monkeypatch):
    """Two or more distinct constants are read at run time (one XLA kernel for their
    step sizes, not one each) and train bit-identically to the constants folded in."""

    from layerlr.core import _keras as _backend

    models = twin_models()  # the same initial weights
    opaque = _backend.opaque_constants
    returned = []

    def spy(values, reference):
        result = opaque(values, reference)
        returned.append(result is not None)
        return result

    def train(read_at_run_time):
        monkeypatch.setattr(_backend, "opaque_constants", spy if read_at_run_time else (lambda *a: None))
        model = models[read_at_run_time]
        opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01), lr_mult=LR_RULES)
        return jitted_stateless_steps(opt, model, steps=4)

    folded = train(False)
    at_run_time = train(True)
    assert returned == [True]  # traced once, with the run-time values
    assert all(np.array_equal(a, b) for a, b in zip(folded, at_run_time))


def test_distinct_constant_multipliers_stay_folded_off_cpu(monkeypatch):
    """On an accelerator the conditional would read its predicate back to the host
    every step, so the constants stay in the compiled code there."""
    import jax

    from layerlr.core import _keras as _backend

    returned = []

    def probe(lr):
        returned.append(_backend.opaque_constants((0.5, 0.25), lr))
        return lr

    jax.jit(probe)(jax.numpy.float32(0.1))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    jax.jit(lambda lr: probe(lr))(jax.numpy.float32(0.1))  # a new function: traced again
    assert sorted(returned[0]) == [0.25, 0.5] and returned[1] is None


def test_the_variable_that_holds_the_run_time_constants_is_left_exactly_as_its_update_makes_it():
    """The first variable also reads the run-time constants (``_keras.hold_until_updated``):
    frozen by ``lr_mult=0`` it stays bit-identical, and the others train as before."""
    model = make_model()
    first = model.trainable_variables[0].path
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.Adam(0.01), lr_mult=[(first, 0.0)] + LR_RULES[1:] + [("d1/bias", 0.25)]
    )
    before = [np.asarray(v.value) for v in model.trainable_variables]
    trained = jitted_stateless_steps(opt, model, steps=3)
    assert np.array_equal(trained[0], before[0])
    assert not np.array_equal(trained[1], before[1])
