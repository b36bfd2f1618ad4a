"""Shared test fixtures: small models, data, and the independent reference.

The reference for "variable v trains as if by the same optimizer at
lr * lr_mult and wd * decay_mult" is Keras' own MultiOptimizer with one
separately configured optimizer per group: N optimizers, N states, no layerlr
code involved.
"""

import numpy as np
import keras

import layerlr


def make_model(name="net"):
    inputs = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, activation="tanh", name="d1")(inputs)
    h = keras.layers.Dense(8, activation="tanh", name="d2")(h)
    h = keras.layers.LayerNormalization(name="ln")(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, outputs, name=name)


def twin_models(factory=make_model):
    """Two models with identical initial weights."""
    a = factory()
    b = factory()
    b.set_weights(a.get_weights())
    return a, b


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.normal(size=(n, 3)).astype("float32")
    return x, y


def weights_by_path(model):
    return {v.path: np.array(v.numpy()) for v in model.trainable_variables}


def max_abs_diff(model_a, model_b):
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(model_a.get_weights(), model_b.get_weights())
    )


class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, schedule, factor):
        self.schedule = schedule
        self.factor = factor

    def __call__(self, step):
        return self.schedule(step) * self.factor


def group_optimizer(opt_class, kwargs, lr_mult, decay_mult):
    """One optimizer configured at lr * lr_mult and wd * decay_mult."""
    kw = dict(kwargs)
    lr = kw.get("learning_rate", opt_class().learning_rate)
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        kw["learning_rate"] = ScaledSchedule(lr, lr_mult)
    elif callable(lr):
        kw["learning_rate"] = lambda: lr() * lr_mult
    else:
        kw["learning_rate"] = float(np.float32(float(lr)) * np.float32(lr_mult))
    for key in ("weight_decay", "adam_weight_decay"):
        if kw.get(key) is not None:
            kw[key] = kw[key] * decay_mult
    return opt_class(**kw)


def reference_optimizer(opt_class, kwargs, multipliers):
    """MultiOptimizer with one optimizer per (lr_mult, decay_mult) group.

    ``multipliers``: callable(variable path) -> (lr_mult, decay_mult).
    """
    groups = {}

    def route(variable):
        key = multipliers(variable.path)
        if key not in groups:
            groups[key] = group_optimizer(opt_class, kwargs, *key)
        return groups[key]

    return keras.optimizers.MultiOptimizer(route)


# The rules used by the equivalence tests, and the same rules written by hand
# for the reference (so the reference does not depend on layerlr's resolution).
LR_RULES = [("d1", 0.1), ("d2/kernel", 3.0), (keras.layers.LayerNormalization, 0.5)]
DECAY_RULES = [("*bias", 0.0), ("d1/kernel", 2.0)]


def hand_multipliers(path):
    parts = path.split("/")
    layer, name = parts[-2], parts[-1]
    lr = {"d1": 0.1, "ln": 0.5}.get(layer, 1.0)
    if layer == "d2" and name == "kernel":
        lr = 3.0
    decay = 0.0 if name == "bias" else (2.0 if (layer, name) == ("d1", "kernel") else 1.0)
    return lr, decay


def wrapped(opt_class, kwargs, lr_mult=LR_RULES, decay_mult=DECAY_RULES):
    return layerlr.LayerwiseOptimizer(opt_class(**kwargs), lr_mult=lr_mult, decay_mult=decay_mult)


def gradients(model, x, y):
    """Mean-squared-error gradients for every trainable variable, per backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.mean_squared_error(y, model(x)))
        return tape.gradient(loss, model.trainable_variables)
    if backend == "jax":
        import jax

        def loss_fn(values):
            out, _ = model.stateless_call(values, [v.value for v in model.non_trainable_variables], x)
            return keras.ops.mean(keras.losses.mean_squared_error(y, out))

        return jax.grad(loss_fn)([v.value for v in model.trainable_variables])

    model.zero_grad()
    loss = keras.ops.mean(keras.losses.mean_squared_error(y, model(x)))
    loss.backward()
    return [v.value.grad for v in model.trainable_variables]
