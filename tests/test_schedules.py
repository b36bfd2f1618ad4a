"""Multiplier schedules: per-group, evaluated in-graph, no retracing."""

import json

import numpy as np
import pytest
import keras

import layerlr
from conftest import BACKEND
from helpers import data, make_model, max_abs_diff, twin_models


class ProductSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Reference group rate: base(step) * multiplier(step)."""

    def __init__(self, base, multiplier):
        self.base, self.multiplier = base, multiplier

    def __call__(self, step):
        base = self.base(step) if callable(self.base) else self.base
        return base * self.multiplier(step)


class CountingSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Counts Python calls: in a compiled step they happen only while tracing."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    @property
    def start_step(self):
        return self.inner.start_step

    def __call__(self, step):
        self.calls += 1
        return self.inner(step)


def test_scheduled_lr_mult_matches_a_reference_per_group():
    base = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=3, decay_rate=0.5)
    ramp = keras.optimizers.schedules.PolynomialDecay(0.1, decay_steps=6, end_learning_rate=1.0)
    model, ref_model = twin_models()
    x, y = data()
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.AdamW(base, weight_decay=0.1), lr_mult={"d1": ramp, "head": 2.0})
    model.compile(optimizer=opt, loss="mse")

    def route(variable):
        layer = variable.path.split("/")[-2]
        if layer not in groups:
            lr = {"d1": ProductSchedule(base, ramp),
                  "head": ProductSchedule(base, lambda step: 2.0)}.get(layer, base)
            groups[layer] = keras.optimizers.AdamW(lr, weight_decay=0.1)
        return groups[layer]

    groups = {}
    ref_model.compile(optimizer=keras.optimizers.MultiOptimizer(route), loss="mse")
    for m in (model, ref_model):
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert max_abs_diff(model, ref_model) < 1e-6


def test_frozen_phase_leaves_variables_and_slots_untouched_then_trains():
    model = make_model()
    x, y = data(n=32)
    warm = layerlr.schedules.FreezeThenWarmup(freeze_steps=4, warmup_steps=2, value=0.5)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01, weight_decay=0.1), lr_mult={"d1": warm})
    model.compile(optimizer=opt, loss="mse")

    def d1_state():
        layer = model.get_layer("d1")
        slots = [v for v in opt.inner_optimizer.variables if v.name.startswith("d1_")]
        return [w.numpy().copy() for w in layer.weights + slots]

    opt.build(model.trainable_variables)
    start = d1_state()
    head_start = model.get_layer("head").kernel.numpy().copy()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # steps 0-3: frozen
    assert int(opt.iterations) == 4
    assert all(np.array_equal(a, b) for a, b in zip(start, d1_state()))
    assert not np.array_equal(head_start, model.get_layer("head").kernel.numpy())
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # steps 4-7: warm-up
    assert not any(np.array_equal(a, b) for a, b in zip(start, d1_state()))
    assert all(np.isfinite(w).all() for w in d1_state())


@pytest.mark.skipif(BACKEND == "torch", reason="torch runs eagerly: there is no trace to count")
def test_changing_phase_does_not_retrace():
    model = make_model()
    x, y = data(n=32)
    schedule = CountingSchedule(layerlr.schedules.FreezeThenWarmup(freeze_steps=4, warmup_steps=4))
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01), lr_mult={"d1": schedule})
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    traced = schedule.calls
    assert traced > 0
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)  # frozen -> ramp -> constant
    assert schedule.calls == traced
    assert int(opt.iterations) == 16


def test_scheduled_multipliers_survive_a_config_round_trip():
    warm = layerlr.schedules.FreezeThenWarmup(freeze_steps=10, warmup_steps=5, value=0.3)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), lr_mult={"d1": warm}, decay_mult={"head": warm})
    opt.build(make_model().trainable_variables)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(opt)))
    restored = keras.saving.deserialize_keras_object(config)
    value = restored._layerlr.lr_rules[0].value
    assert isinstance(value, layerlr.schedules.FreezeThenWarmup)
    assert value.get_config() == warm.get_config()
    saved = restored._layerlr.saved[0]
    assert isinstance(saved.lr_mult, layerlr.schedules.FreezeThenWarmup)


@pytest.mark.parametrize("kwargs, message", [
    (dict(freeze_steps=-1), "freeze_steps must be an int >= 0"),
    (dict(freeze_steps=2, warmup_steps=1.5), "warmup_steps must be an int >= 0"),
    (dict(freeze_steps=2, value=float("nan")), "value must be a finite number >= 0"),
])
def test_freeze_then_warmup_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        layerlr.schedules.FreezeThenWarmup(**kwargs)
