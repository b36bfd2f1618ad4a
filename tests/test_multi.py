"""`multi_optimizer`: Keras' MultiOptimizer routed by layerlr selectors.

References: Keras' own MultiOptimizer with an OptimizerMap of regexes written
by hand, or a MultiOptimizer with one plain optimizer per (group, multiplier);
resume tests compare with uninterrupted training.
"""

import os
import re

import numpy as np
import pytest
import keras

import layerlr
from helpers import data, make_model, max_abs_diff, twin_models


def fit(model, optimizer, epochs=2, **kwargs):
    x, y = data()
    model.compile(optimizer=optimizer, loss="mse", **kwargs)
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model


def sequential_model():
    """Variable paths start with 'seq/' here and lose it across load_model."""
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="tanh", name="d1"),
        keras.layers.LayerNormalization(name="ln"),
        keras.layers.Dense(8, activation="tanh", name="d2"),
        keras.layers.Dense(3, name="head"),
    ], name="seq")


def test_routes_first_match_wins_over_every_selector_kind():
    model = make_model()
    sgd, adam, rms, ada, lion = (keras.optimizers.SGD(), keras.optimizers.Adam(),
                                 keras.optimizers.RMSprop(), keras.optimizers.Adagrad(),
                                 keras.optimizers.Lion())
    opt = layerlr.multi_optimizer(
        [
            (model.get_layer("d1"), sgd),
            ("*bias", adam),                          # d1/bias already went to sgd
            (keras.layers.LayerNormalization, rms),
            ([v for v in model.trainable_variables if v.path == "head/kernel"][0], ada),
            ((re.compile("^d2/"), lambda v: False), lion),
        ]
    )
    opt.build(model)
    assert {p: o for p, o in opt.routes.items()} == {
        "d1/kernel": sgd, "d1/bias": sgd, "d2/kernel": lion, "d2/bias": adam,
        "ln/gamma": rms, "ln/beta": rms, "head/kernel": ada, "head/bias": adam,
    }
    assert isinstance(opt, keras.optimizers.MultiOptimizer)
    assert opt.optimizers == [sgd, adam, rms, ada, lion]


def test_trains_exactly_as_keras_multi_optimizer_with_regexes():
    def groups():
        return keras.optimizers.SGD(0.05, momentum=0.9), keras.optimizers.Adam(0.01), keras.optimizers.RMSprop(0.01)

    model, reference = twin_models()
    plain = make_model()
    plain.set_weights(model.get_weights())
    sgd, adam, rms = groups()
    fit(model, layerlr.multi_optimizer({"d1": sgd, ("d2", keras.layers.LayerNormalization): adam}, default=rms))
    sgd, adam, rms = groups()
    fit(reference, keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(rms, {"d1/.*": sgd, "(d2|ln)/.*": adam})))
    assert max_abs_diff(model, reference) < 1e-6
    # Teeth: one optimizer for everything ends elsewhere.
    assert max_abs_diff(model, fit(plain, keras.optimizers.Adam(0.01))) > 1e-4


def layerwise_group():
    return layerlr.LayerwiseOptimizer(
        keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.02),
        lr_mult={"d1": 0.1, keras.layers.LayerNormalization: 0.5},
        decay_mult={"*bias": 0.0},
    )


def layerwise_reference():
    """Head: Adam; the rest: one SGD per (lr_mult, decay_mult), written by hand."""
    head = keras.optimizers.Adam(0.01)
    per_key = {}

    def route(variable):
        layer, name = variable.path.split("/")[-2:]
        if layer == "head":
            return head
        key = ({"d1": 0.1, "ln": 0.5}.get(layer, 1.0), 0.0 if name == "bias" else 1.0)
        if key not in per_key:
            per_key[key] = keras.optimizers.SGD(
                float(np.float32(0.05) * np.float32(key[0])), momentum=0.9,
                weight_decay=0.02 * key[1])
        return per_key[key]

    return keras.optimizers.MultiOptimizer(route)


def test_layerwise_optimizer_as_a_group_matches_one_optimizer_per_multiplier():
    model, reference = twin_models()
    fit(model, layerlr.multi_optimizer({"head": keras.optimizers.Adam(0.01)}, default=layerwise_group()))
    fit(reference, layerwise_reference())
    assert max_abs_diff(model, reference) < 1e-6
    inner = model.optimizer.optimizers[1]
    assert inner.multipliers["d1/kernel"].lr_mult == 0.1
    assert "head/kernel" not in inner.multipliers


def test_layerwise_optimizer_inside_keras_own_multi_optimizer():
    model, reference = twin_models()
    fit(model, keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(layerwise_group(), {"head/.*": keras.optimizers.Adam(0.01)})))
    fit(reference, layerwise_reference())
    assert max_abs_diff(model, reference) < 1e-6


def save_load(model, tmp_path, name="m.keras"):
    path = os.path.join(tmp_path, name)
    model.save(path)
    return keras.models.load_model(path)  # safe_mode: no lambdas may be deserialized


def resume_matches_uninterrupted(make_optimizer, tmp_path):
    """1 epoch, save, load, 1 epoch == 2 epochs; returns (loaded, uninterrupted)."""
    model, uninterrupted = twin_models(sequential_model)
    fit(model, make_optimizer(model), epochs=1)
    loaded = save_load(model, tmp_path)
    before = [np.array(v) for v in model.optimizer.variables]
    after = [np.array(v) for v in loaded.optimizer.variables]
    assert len(before) == len(after)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    x, y = data()
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    fit(uninterrupted, make_optimizer(uninterrupted), epochs=2)
    assert max_abs_diff(loaded, uninterrupted) < 1e-6
    return loaded, uninterrupted


def test_save_load_resume_with_live_selectors_and_a_layerwise_group(tmp_path):
    def make(model):
        nadam = layerlr.LayerwiseOptimizer(  # Nadam: its extra state must be saved too
            keras.optimizers.Nadam(0.01), lr_mult={model.get_layer("d1"): 0.1, "*bias": 2.0})
        return layerlr.multi_optimizer(
            [(lambda v: v.path.endswith("head/kernel"), keras.optimizers.Adam(0.01)),
             (model.get_layer("ln"), keras.optimizers.SGD(0.1))],
            default=nadam)

    loaded, uninterrupted = resume_matches_uninterrupted(make, tmp_path)
    opt = loaded.optimizer
    assert type(opt).__name__ == "SelectorMultiOptimizer"
    assert [type(o).__name__ for o in opt.optimizers] == ["Adam", "SGD", "LayerwiseOptimizer"]
    # Paths lost the 'seq/' prefix on reload; the routes follow the variables.
    assert {p: type(o).__name__ for p, o in opt.routes.items()} == {
        "d1/kernel": "LayerwiseOptimizer", "d1/bias": "LayerwiseOptimizer",
        "ln/gamma": "SGD", "ln/beta": "SGD",
        "d2/kernel": "LayerwiseOptimizer", "d2/bias": "LayerwiseOptimizer",
        "head/kernel": "Adam", "head/bias": "LayerwiseOptimizer",
    }
    assert opt.optimizers[2].multipliers["d1/bias"].lr_mult == 0.1
    assert opt.optimizers[2].multipliers["head/bias"].lr_mult == 2.0


def test_save_load_resume_inside_keras_own_multi_optimizer(tmp_path):
    def make(model):
        return keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
            layerwise_group(), {".*head/.*": keras.optimizers.Adam(0.01)}))

    loaded, _ = resume_matches_uninterrupted(make, tmp_path)
    assert loaded.optimizer.optimizers[1].multipliers["d1/kernel"].lr_mult == 0.1


def test_reload_warns_when_a_path_prefix_group_stops_matching(tmp_path):
    model = sequential_model()
    adam = keras.optimizers.Adam(0.01)
    fit(model, layerlr.multi_optimizer({"seq/d1": adam}, default=keras.optimizers.SGD()), epochs=1)
    assert model.optimizer.routes["seq/d1/kernel"] is adam
    with pytest.warns(UserWarning, match="keeping the saved routes"):
        loaded = save_load(model, tmp_path)
    routes = {p: type(o).__name__ for p, o in loaded.optimizer.routes.items()}
    assert routes["d1/kernel"] == routes["d1/bias"] == "Adam"
    assert routes["d2/kernel"] == "SGD"


def test_saved_routes_must_fit_the_model():
    model = make_model()
    opt = layerlr.multi_optimizer({"d1": keras.optimizers.Adam()}, default=keras.optimizers.SGD())
    opt.build(model)
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="only")])
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    with pytest.raises(ValueError, match="do not fit the model.*8 trainable variables were saved"):
        clone.build(other)


def test_function_selectors_without_saved_routes_cannot_be_reapplied():
    model = make_model()

    def first_dense(variable):
        return variable.path.startswith("d1/")

    opt = layerlr.multi_optimizer({first_dense: keras.optimizers.Adam()},
                                  default=keras.optimizers.SGD())
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))  # never built
    with pytest.raises(ValueError, match="predicate .*first_dense was a function, which cannot be saved"):
        clone.build(model)


def test_layer_selectors_without_saved_routes_restore_by_variable_paths():
    model = make_model()
    opt = layerlr.multi_optimizer({model.get_layer("d1"): keras.optimizers.Adam()},
                                  default=keras.optimizers.SGD())
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))  # never built
    clone.build(model)
    routes = {path: type(o).__name__ for path, o in clone.routes.items()}
    assert routes["d1/kernel"] == routes["d1/bias"] == "Adam"
    assert routes["d2/kernel"] == "SGD"


def test_under_mixed_float16_a_nadam_group_keeps_all_its_state():
    keras.mixed_precision.set_global_policy("mixed_float16")
    nadam = keras.optimizers.Nadam(0.01)
    model = make_model()
    fit(model, layerlr.multi_optimizer({"d1": nadam}, default=keras.optimizers.SGD(0.1)), epochs=1)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    # iterations, learning rate, 2 momenta, 2 velocities and the momentum product
    # (Keras' LossScaleOptimizer.build switches tracking off and loses the last).
    assert len(nadam.variables) == 7
    assert any(v is nadam._u_product for v in model.optimizer.variables)


def test_shared_optimizer_instance_and_no_default():
    model = make_model()
    adam, sgd = keras.optimizers.Adam(), keras.optimizers.SGD()
    opt = layerlr.multi_optimizer([("d1", adam), ("head", adam), ("*", sgd)])
    opt.build(model)
    assert opt.optimizers == [adam, sgd]
    assert [p for p, o in opt.routes.items() if o is adam] == [
        "d1/kernel", "d1/bias", "head/kernel", "head/bias"]

    sgd, adam = keras.optimizers.SGD(), keras.optimizers.Adam()
    as_default = layerlr.multi_optimizer([("d1", sgd), ("d2", adam)], default=sgd)
    as_default.build(make_model())
    assert as_default.optimizers == [sgd, adam]
    assert len(as_default.variables) == 2 + len(sgd.variables) + len(adam.variables)  # no duplicate


def test_strict_about_selectors_and_unrouted_variables():
    def build(groups, default=None):
        layerlr.multi_optimizer(groups, default=default).build(make_model())

    with pytest.raises(ValueError, match=r"group rule 'dl' matches none.*Closest paths: .*'d1'"):
        build({"dl": keras.optimizers.Adam()}, default=keras.optimizers.SGD())
    with pytest.raises(ValueError, match=r"No group selects 4 .*'d2/kernel'.*pass default="):
        build({"d1": keras.optimizers.Adam(), "head": keras.optimizers.SGD()})
    model = make_model()
    opt = layerlr.multi_optimizer({keras.layers.LayerNormalization: keras.optimizers.Adam()},
                                  default=keras.optimizers.SGD())
    with pytest.raises(ValueError, match=r"select by layer type.*optimizer.build\(model\)"):
        opt.build(model.trainable_variables)  # no model to find from here


def test_bad_groups_are_explained():
    adam = keras.optimizers.Adam()
    with pytest.raises(TypeError, match="An optimizer is not a selector"):
        layerlr.multi_optimizer({adam: "d1"})
    with pytest.raises(TypeError, match="must be a Keras optimizer instance"):
        layerlr.multi_optimizer({"d1": "adam"})
    with pytest.raises(ValueError, match="LossScaleOptimizer"):
        layerlr.multi_optimizer({"d1": keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())})
    with pytest.raises(ValueError, match="cannot be nested"):
        layerlr.multi_optimizer({"d1": layerlr.multi_optimizer({"x": keras.optimizers.SGD()})})
    with pytest.raises(ValueError, match="at least one"):
        layerlr.multi_optimizer({}, default=adam)
    with pytest.raises(TypeError, match=r"groups\[0\] must be a \(selector, optimizer\) pair"):
        layerlr.multi_optimizer(["d1"])
    built = keras.optimizers.SGD()
    built.build(make_model().trainable_variables)
    with pytest.raises(ValueError, match="already been built"):
        layerlr.multi_optimizer({"d1": adam}, default=built)
