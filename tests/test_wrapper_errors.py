"""Misuse of the wrapper gets a clear error and changes nothing."""

import re

import numpy as np
import pytest
import keras

import layerlr
from helpers import data, make_model


def test_accepts_an_optimizer_name():
    opt = layerlr.LayerwiseOptimizer("adam", lr_mult={"head": 2.0})
    assert isinstance(opt.inner_optimizer, keras.optimizers.Adam)


@pytest.mark.parametrize("bad", [object(), 0.01, keras.layers.Dense(2)])
def test_rejects_what_is_not_a_keras_optimizer(bad):
    with pytest.raises(TypeError, match=r"wraps a Keras 3 optimizer \(an instance of keras.optimizers.Optimizer\), got"):
        layerlr.LayerwiseOptimizer(bad)


def test_rejects_double_wrapping():
    inner = keras.optimizers.Adam()
    once = layerlr.LayerwiseOptimizer(inner)
    with pytest.raises(ValueError, match="already a LayerwiseOptimizer"):
        layerlr.LayerwiseOptimizer(once)
    with pytest.raises(ValueError, match="already wrapped by another LayerwiseOptimizer"):
        layerlr.LayerwiseOptimizer(inner)


def test_rejects_loss_scale_optimizer_inside_and_says_how_to_nest():
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
    with pytest.raises(ValueError, match=re.escape("LossScaleOptimizer(LayerwiseOptimizer(Adam(...), ...))")):
        layerlr.LayerwiseOptimizer(lso)


def test_rejects_multi_optimizer_inside():
    multi = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(keras.optimizers.Adam()))
    with pytest.raises(ValueError, match="MultiOptimizer cannot go inside"):
        layerlr.LayerwiseOptimizer(multi)


@pytest.mark.parametrize("key", ["clipnorm", "weight_decay", "learning_rate", "use_ema"])
def test_rejects_base_optimizer_arguments_on_the_wrapper(key):
    with pytest.raises(ValueError, match=f"does not take `{key}`: set it on the wrapped optimizer"):
        layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), **{key: 1.0})


def test_rejects_unknown_arguments():
    with pytest.raises(TypeError, match=r"unexpected arguments: \['lr_multiplier'\]"):
        layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), lr_multiplier={"a": 1.0})


def test_rejects_an_already_used_optimizer():
    model = make_model()
    inner = keras.optimizers.Adam()
    inner.build(model.trainable_variables)
    with pytest.raises(ValueError, match="already been built"):
        layerlr.LayerwiseOptimizer(inner)


def test_a_rejected_rule_leaves_the_inner_optimizer_reusable():
    inner = keras.optimizers.Adam()
    with pytest.raises(ValueError):
        layerlr.LayerwiseOptimizer(inner, lr_mult={"head": -1.0})
    opt = layerlr.LayerwiseOptimizer(inner, lr_mult={"head": 1.0})
    assert opt.inner_optimizer is inner


def test_failed_build_leaves_model_and_optimizer_untouched_and_can_be_fixed():
    model = make_model()
    x, y = data()
    weights = [w.copy() for w in model.get_weights()]
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), lr_mult={"no_such_layer": 0.1})
    model.compile(optimizer=opt, loss="mse")
    with pytest.raises(ValueError, match="'no_such_layer' matches none of the 8 trainable variables"):
        model.fit(x, y, epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    assert not opt.built and not opt.inner_optimizer.built
    assert len(opt.inner_optimizer.variables) == 2  # iteration and learning rate only


def test_apply_without_variables_before_build_is_a_clear_error():
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="must already be built"):
        opt.apply([np.zeros(2)])


def test_apply_with_unknown_variables_is_refused():
    model = make_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1))
    opt.build(model.trainable_variables)
    stranger = keras.Variable(np.ones(3, "float32"), name="stranger")
    with pytest.raises(ValueError, match=r"Unknown variable\(s\) for this optimizer: \['stranger'\]"):
        opt.apply([np.ones(3, "float32")], [stranger])
    np.testing.assert_array_equal(stranger.numpy(), np.ones(3))
    assert len(opt.inner_optimizer._trainable_variables) == len(model.trainable_variables)
