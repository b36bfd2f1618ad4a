"""The public resolution API: what `resolve` says each variable gets is what training applies."""

import keras
import numpy as np
import pytest

import layerlr


def make_model():
    backbone = keras.Sequential([keras.layers.Dense(4, name="conv")], name="backbone")
    model = keras.Sequential([keras.Input((3,)), backbone, keras.layers.Dense(2, name="head")], name="net")
    return model, backbone


def observed_rates(model, optimizer):
    """Each variable's learning rate as one plain-SGD step applies it: -delta / gradient."""
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 2)).astype("float32")
    model.compile(optimizer=optimizer, loss="mse")
    before = [np.array(v) for v in model.trainable_variables]
    # The gradient of the same batch, computed apart with the same loss.
    grads = _gradients(model, x, y)
    model.train_on_batch(x, y)
    rates = {}
    for v, b, g in zip(model.trainable_variables, before, grads):
        g = np.asarray(g)
        mask = np.abs(g) > 1e-6
        rates[v.path] = float(np.median(-(np.array(v) - b)[mask] / g[mask]))
    return rates


def _gradients(model, x, y):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    before = [np.array(v) for v in clone.trainable_variables]
    clone.train_on_batch(x, y)  # SGD(1.0): the update is minus the gradient
    return [b - np.array(v) for v, b in zip(clone.trainable_variables, before)]


def test_resolved_rates_are_the_rates_training_applies():
    model, backbone = make_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={backbone: 0.01, "*bias": 0.5})
    resolved = {a.path: a.learning_rate for a in opt.resolve(model)}
    assert not opt.built  # nothing built: building creates the optimizer state
    with pytest.raises(ValueError, match="not built yet"):
        opt.multipliers
    observed = observed_rates(model, opt)
    assert resolved.keys() == observed.keys()
    for path, rate in observed.items():
        assert rate == pytest.approx(resolved[path], rel=1e-3), path
    assert resolved["net/backbone/conv/bias"] == pytest.approx(0.001)  # first rule wins
    assert resolved["net/head/bias"] == pytest.approx(0.05)


def test_assignment_names_the_deciding_rule_by_index_and_marks_frozen_and_new_variables():
    model, backbone = make_model()
    backbone.trainable = False
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult=[(lambda v: "conv" in v.path, 0.1),
                                                                          (lambda v: "head" in v.path, 2.0)])
    assignments = {a.path: a for a in opt.resolve(model)}
    frozen = assignments["net/backbone/conv/kernel"]
    assert not frozen.trained and frozen.learning_rate is None and frozen.lr_mult == 0.1
    assert frozen.multipliers.lr_rule_index == 0
    assert assignments["net/head/kernel"].multipliers.lr_rule_index == 1  # the two rules print alike
    opt.build(model)
    backbone.trainable = True
    after = {a.path: a for a in opt.resolve(model)}
    assert after["net/backbone/conv/kernel"].trained and after["net/backbone/conv/kernel"].new
    assert not after["net/head/kernel"].new


def test_rules_alone_give_rates_relative_to_one():
    model, _ = make_model()
    got = {a.path: (a.learning_rate, a.weight_decay)
           for a in layerlr.resolve(model, lr_mult={"conv": 0.1}, decay_mult={"*bias": 0.0})}
    assert got["net/backbone/conv/kernel"] == (pytest.approx(0.1), pytest.approx(1.0))
    assert got["net/head/bias"] == (pytest.approx(1.0), 0.0)


def test_resolve_reads_the_compiled_optimizer_through_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, _ = make_model()
        model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={"head": 3.0}),
                      loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        rates = {a.path: a.learning_rate for a in layerlr.resolve(model)}
        assert rates["net/head/kernel"] == pytest.approx(3e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_multi_optimizer_resolve_routes_as_its_build_does():
    model, backbone = make_model()
    adam, sgd = keras.optimizers.Adam(), keras.optimizers.SGD()
    opt = layerlr.multi_optimizer({backbone: sgd}, default=adam)
    before = [(v.path, o) for v, o in opt.resolve(model)]
    assert not opt.built
    opt.build(model)
    assert before == list(opt.routes.items())


def test_bad_calls_say_what_to_pass():
    model, _ = make_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={"head": 2.0})
    with pytest.raises(ValueError, match="not built yet.*optimizer.resolve\\(model\\)"):
        opt.resolve()
    with pytest.raises(TypeError, match="Expected a Keras model or layer, got 'net'"):
        opt.resolve("net")
    with pytest.raises(ValueError, match="either an optimizer or rules"):
        layerlr.resolve(model, opt, lr_mult={"head": 2.0})
    with pytest.raises(ValueError, match="has no optimizer"):
        layerlr.resolve(model)
    with pytest.raises(ValueError, match="plain SGD, not a LayerwiseOptimizer"):
        layerlr.resolve(model, keras.optimizers.SGD(0.1))
