"""Numerics: non-finite gradients, loss scaling, and long runs without drift.

- Non-finite gradients reach each variable exactly as they would reach the
  wrapped optimizer alone (the reference: one optimizer per multiplier group),
  except that ``lr_mult=0`` leaves its variable and slots untouched, as
  documented.
- Under a LossScaleOptimizer a non-finite step is skipped and advances nothing.
- Over a long run the learning rate each variable is updated with stays equal
  to ``schedule(step) * lr_mult`` computed in float64 (read back through SGD
  without momentum: from zero, one step with gradient 1 leaves ``-lr``).
"""


import numpy as np
import pytest
import keras

import layerlr
from conftest import BACKEND
from helpers import DECAY_RULES, LR_RULES, group_optimizer, hand_multipliers, reference_optimizer, twin_models

# --- non-finite gradients through apply() -------------------------------------------

SHAPES = {"a": (3,), "b": (2, 2), "c": (2,), "z": (2,)}
MULTS = {"a": 1.0, "b": 0.5, "c": 2.0, "z": 0.0}


def variables(seed=0):
    rng = np.random.default_rng(seed)
    return {name: keras.Variable(rng.normal(size=shape).astype("float32"), name=name)
            for name, shape in SHAPES.items()}


def gradient_steps():
    """Finite, then NaN/inf in a, c and z, then finite again."""
    rng = np.random.default_rng(1)
    steps = [{n: rng.normal(size=s).astype("float32") for n, s in SHAPES.items()} for _ in range(3)]
    steps[1]["a"][0] = np.nan
    steps[1]["c"][1] = np.inf
    steps[1]["z"][:] = np.nan
    # Tensors: torch's fused optimizers take no numpy arrays.
    return [{n: keras.ops.convert_to_tensor(g) for n, g in step.items()} for step in steps]


NONFINITE_OPTIMIZERS = {
    "sgd_momentum": (keras.optimizers.SGD, dict(learning_rate=0.1, momentum=0.9)),
    "adam": (keras.optimizers.Adam, dict(learning_rate=0.01, weight_decay=0.01)),
    "rmsprop": (keras.optimizers.RMSprop, dict(learning_rate=0.01)),
}


def as_numpy(vs):
    return {n: np.array(v.numpy()) for n, v in vs.items()}


@pytest.mark.parametrize("name", sorted(NONFINITE_OPTIMIZERS))
def test_non_finite_gradients_reach_each_group_as_with_its_own_optimizer(name):
    opt_class, kwargs = NONFINITE_OPTIMIZERS[name]
    ours, ref = variables(), variables()
    opt = layerlr.LayerwiseOptimizer(
        opt_class(**kwargs), lr_mult=[(ours[n], m) for n, m in MULTS.items() if m != 1.0])
    opt.build(list(ours.values()))
    refs = {n: group_optimizer(opt_class, kwargs, m, 1.0) for n, m in MULTS.items() if m != 0.0}
    for n, r in refs.items():
        r.build([ref[n]])
    z_before = np.array(ours["z"].numpy())
    z_slots = [np.array(v.numpy()) for v in slots_of(opt.inner_optimizer, ours["z"])]
    assert z_slots, "the optimizer has slots for z"

    for grads in gradient_steps():
        opt.apply([grads[n] for n in ours], list(ours.values()))
        for n, r in refs.items():
            r.apply([grads[n]], [ref[n]])

    got, want = as_numpy(ours), as_numpy(ref)
    for n in ("a", "b", "c"):
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=0, equal_nan=True)
    assert np.isnan(got["a"]).any() and not np.isfinite(got["c"]).all()
    assert np.isfinite(got["b"]).all()
    # lr_mult=0: variable and slots untouched, NaN gradient included.
    np.testing.assert_array_equal(got["z"], z_before)
    for before, after in zip(z_slots, slots_of(opt.inner_optimizer, ours["z"])):
        np.testing.assert_array_equal(before, after.numpy())
    assert int(opt.iterations) == 3


def slots_of(inner, variable):
    """The optimizer variables created for ``variable`` (momentums, velocities...)."""
    index = inner._get_variable_index(variable)
    slots = []
    for attr in ("momentums", "_momentums", "_velocities"):
        values = getattr(inner, attr, None)
        if isinstance(values, list) and len(values) == len(inner._trainable_variables):
            slots.append(values[index])
    return slots


@pytest.mark.parametrize("kwargs", [dict(learning_rate=0.01), dict(learning_rate=0.01, global_clipnorm=1.0),
                                    dict(learning_rate=0.01, clipvalue=0.5)],
                         ids=["adam", "adam_global_clipnorm", "adam_clipvalue"])
def test_non_finite_gradients_without_rules_are_bit_identical_to_the_optimizer_alone(kwargs):
    ours, plain = variables(), variables()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(**kwargs))
    alone = keras.optimizers.Adam(**kwargs)
    for grads in gradient_steps():
        opt.apply([grads[n] for n in ours], list(ours.values()))
        alone.apply([grads[n] for n in plain], list(plain.values()))
    got, want = as_numpy(ours), as_numpy(plain)
    for n in SHAPES:
        np.testing.assert_array_equal(got[n], want[n])
    assert any(np.isnan(v).any() for v in got.values())
    for a, b in zip(opt.inner_optimizer.variables, alone.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# --- loss scaling: a non-finite step is skipped -------------------------------------


def batches():
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(16, 6)).astype("float32") for _ in range(3)]
    ys = [rng.normal(size=(16, 3)).astype("float32") for _ in range(3)]
    xs[1][0, 0] = np.inf  # the loss, and so every gradient, is non-finite
    return list(zip(xs, ys))


def lso_state(lso):
    inner = lso.inner_optimizer
    if isinstance(inner, layerlr.LayerwiseOptimizer):
        inner = inner.inner_optimizer
    return {
        "iterations": int(inner.iterations),
        "scale": float(lso.dynamic_scale.numpy()),
        "slots": [np.array(v.numpy()) for v in inner.variables],
    }


def test_loss_scale_optimizer_skips_the_step_and_advances_nothing():
    model, ref_model = twin_models()
    plain_model = keras.models.clone_model(model)
    plain_model.set_weights(model.get_weights())
    kwargs = dict(learning_rate=0.01, weight_decay=0.02)
    lso = keras.optimizers.LossScaleOptimizer(
        layerlr.LayerwiseOptimizer(keras.optimizers.Adam(**kwargs), lr_mult=LR_RULES, decay_mult=DECAY_RULES))
    plain_lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(**kwargs))
    model.compile(optimizer=lso, loss="mse")
    plain_model.compile(optimizer=plain_lso, loss="mse")
    reference = reference_optimizer(keras.optimizers.Adam, kwargs, hand_multipliers)
    ref_model.compile(optimizer=reference, loss="mse")

    (x1, y1), (x2, y2), (x3, y3) = batches()
    for m in (model, plain_model):
        m.train_on_batch(x1, y1)
    weights = model.get_weights()
    before, plain_before = lso_state(lso), lso_state(plain_lso)
    for m in (model, plain_model):
        m.train_on_batch(x2, y2)
    after, plain_after = lso_state(lso), lso_state(plain_lso)

    # Skipped: weights, step counter and slots unchanged, scale halved ...
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    assert after["iterations"] == before["iterations"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(before["slots"], after["slots"]))
    assert after["scale"] == before["scale"] / 2
    # ... exactly as the wrapped optimizer alone does.
    assert (plain_after["iterations"], plain_after["scale"]) == (1, plain_before["scale"] / 2)

    for m in (model, plain_model):
        m.train_on_batch(x3, y3)
    assert lso_state(lso)["iterations"] == 2
    # The next steps are those of the reference that never saw the bad batch.
    for x, y in ((x1, y1), (x3, y3)):
        ref_model.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), ref_model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert max(np.max(np.abs(a - b)) for a, b in zip(model.get_weights(), plain_model.get_weights())) > 1e-4


def test_non_finite_loss_without_loss_scaling_behaves_like_the_optimizer_alone():
    """No skipping without a LossScaleOptimizer: NaN reaches the weights, as for Adam alone."""
    model, plain = twin_models()
    model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01)), loss="mse")
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    for x, y in batches():
        for m in (model, plain):
            m.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert all(np.isnan(w).any() for w in model.get_weights())


# --- long runs: the effective learning rate does not drift ---------------------------------

STEPS = 20_000
RUN_MULTS = {"d1": 0.1, "d2": 3.0, "head": 1e-3}  # unmatched "out" keeps 1.0


def tiny_model():
    inputs = keras.Input((1,))
    h = inputs
    for name in ("d1", "d2", "head", "out"):
        h = keras.layers.Dense(1, name=name)(h)
    return keras.Model(inputs, h)


def schedule():
    return keras.optimizers.schedules.CosineDecay(
        0.01, decay_steps=STEPS - 1000, alpha=0.1, warmup_target=0.1, warmup_steps=1000)


def expected_base_rate(step):
    """CosineDecay with linear warmup, by hand in float64."""
    step = np.minimum(np.asarray(step, dtype=np.float64), STEPS)
    warm = 0.01 + (0.1 - 0.01) * step / 1000
    fraction = (step - 1000) / (STEPS - 1000)
    decayed = 0.1 * ((1 - 0.1) * 0.5 * (1 + np.cos(np.pi * fraction)) + 0.1)
    return np.where(step < 1000, warm, decayed)


def observe_rates(opt, variables, steps):
    """[steps, len(variables)]: the rate each update used, via SGD from zero with gradient 1.

    Runs as a compiled loop (tf.function / jax.lax.scan; eager on torch).
    """
    grads = [keras.ops.ones(v.shape, v.dtype) for v in variables]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step():
            for v in variables:
                v.assign(tf.zeros_like(v))
            opt.apply(grads, variables)
            return tf.stack([-tf.reshape(v.value, [-1])[0] for v in variables])

        return np.stack([step().numpy() for _ in range(steps)])
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        zeros = [jnp.zeros(v.shape, v.dtype) for v in variables]

        def body(opt_values, _):
            new_values, opt_values = opt.stateless_apply(opt_values, grads, zeros)
            return opt_values, jnp.stack([-t.reshape(-1)[0] for t in new_values])

        run = jax.jit(lambda values: jax.lax.scan(body, values, None, length=steps))
        final, rates = run([v.value for v in opt.variables])
        for v, value in zip(opt.variables, final):
            v.assign(value)
        return np.asarray(rates)
    import torch

    rates = []
    with torch.no_grad():
        for _ in range(steps):
            for v in variables:
                v.assign(torch.zeros_like(v.value))
            opt.apply(grads, variables)
            rates.append(torch.stack([-v.value.reshape(-1)[0] for v in variables]))
    return torch.stack(rates).cpu().numpy()


def long_run(steps):
    model = tiny_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(schedule()), lr_mult=RUN_MULTS)
    opt.build(model)
    variables = model.trainable_variables
    rates = observe_rates(opt, variables, steps)
    mults = np.array([RUN_MULTS.get(v.path.split("/")[0], 1.0) for v in variables])
    expected = expected_base_rate(np.arange(steps))[:, None] * mults[None, :]
    return opt, rates, expected


def assert_no_drift(opt, rates, expected, steps):
    assert int(opt.iterations) == steps
    relative = np.abs(rates - expected) / expected
    # float32 rounding of the schedule and of base * mult, a few ulps; a step
    # off by one would be ~1e-4 during warmup and mid-decay.
    assert relative.max() < 2e-6, (relative.max(), np.unravel_index(relative.argmax(), relative.shape))
    tail = relative[-max(steps // 10, 1):]
    head = relative[: max(steps // 10, 1)]
    assert tail.max() < 2e-6 and head.max() < 2e-6


@pytest.mark.parametrize("backend", [
    pytest.param("compiled", marks=pytest.mark.skipif(BACKEND == "torch", reason="eager on torch: see the slow test")),
    pytest.param("torch_eager", marks=[pytest.mark.slow, pytest.mark.skipif(BACKEND != "torch", reason="torch only")]),
])
def test_long_run_learning_rate_does_not_drift(backend):
    opt, rates, expected = long_run(STEPS)
    assert_no_drift(opt, rates, expected, STEPS)


def test_short_run_learning_rate_matches_the_schedule():
    """The fast slice: warmup and the start of the decay."""
    opt, rates, expected = long_run(1_500)
    assert_no_drift(opt, rates, expected, 1_500)


@pytest.mark.parametrize("start", [2**24 - 2, 2**31 - 3], ids=["float32_exact_limit", "int32_limit"])
def test_large_step_counters_give_the_rate_of_the_optimizer_alone(start):
    """Near 2**24 a float32 step rounds; near 2**31 an int32 counter wraps. The
    wrapper adds no counter of its own: each rate equals that of the same SGD
    at learning_rate = schedule * lr_mult, at the same counter, bit for bit."""
    exponential = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2**26, decay_rate=0.5)
    model = tiny_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(exponential), lr_mult=RUN_MULTS)
    opt.build(model)
    variables = model.trainable_variables
    mults = [RUN_MULTS.get(v.path.split("/")[0], 1.0) for v in variables]
    references = [group_optimizer(keras.optimizers.SGD, dict(learning_rate=exponential), m, 1.0) for m in mults]
    twins = [keras.Variable(np.zeros(v.shape, "float32")) for v in variables]
    for r, t in zip(references, twins):
        r.build([t])
        r.iterations.assign(start)
    opt.iterations.assign(start)
    counter_dtype = opt.iterations.dtype

    ours = observe_rates(opt, variables, 5)
    theirs = np.stack([observe_rates(r, [t], 5)[:, 0] for r, t in zip(references, twins)], axis=1)
    np.testing.assert_array_equal(ours, theirs)
    assert np.all(ours > 0)
    assert int(opt.iterations) == int(references[0].iterations)
    if "64" in str(counter_dtype):
        assert int(opt.iterations) == start + 5
