"""Selector resolution: which variable gets which multiplier, and bad rules."""

import math
import re

import pytest
import keras

import layerlr


def nested_model():
    backbone = keras.Sequential(
        [keras.layers.Dense(4, name="d1"), keras.layers.Dense(4, name="d10"),
         keras.layers.LayerNormalization(name="norm")],
        name="backbone",
    )
    inputs = keras.Input((3,))
    h = backbone(inputs)
    h = keras.layers.Dense(4, name="new_conv")(h)
    outputs = keras.layers.Dense(2, name="head")(h)
    return keras.Model(inputs, outputs, name="outer"), backbone


def resolve(lr_mult=None, decay_mult=None, model=None):
    model = model or nested_model()[0]
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult=lr_mult, decay_mult=decay_mult)
    opt.build(model)
    return {path.split("/", 1)[1] if path.startswith("outer/") else path: m
            for path, m in opt.multipliers.items()}


def lr_of(result):
    return {p: m.lr_mult for p, m in result.items()}


ALL = ["backbone/d1/kernel", "backbone/d1/bias", "backbone/d10/kernel", "backbone/d10/bias",
       "backbone/norm/gamma", "backbone/norm/beta", "new_conv/kernel", "new_conv/bias",
       "head/kernel", "head/bias"]


def expect(selected, value, default=1.0):
    return {p: (value if p in selected else default) for p in ALL}


def test_layer_object_selects_its_sublayers():
    model, backbone = nested_model()
    got = lr_of(resolve({backbone: 0.01}, model=model))
    assert got == expect(ALL[:6], 0.01)


def test_bare_layer_name_matches_anywhere_but_not_as_a_prefix():
    assert lr_of(resolve({"d1": 0.5})) == expect(["backbone/d1/kernel", "backbone/d1/bias"], 0.5)
    assert lr_of(resolve({"backbone": 0.1})) == expect(ALL[:6], 0.1)


def test_globs():
    assert lr_of(resolve({"*bias": 0.0})) == expect([p for p in ALL if p.endswith("bias")], 0.0)
    assert lr_of(resolve({"d1*": 2.0})) == expect(ALL[:4], 2.0)
    assert lr_of(resolve({"backbone/*/kernel": 3.0})) == expect(
        ["backbone/d1/kernel", "backbone/d10/kernel"], 3.0)


def test_regex_is_searched_in_the_path():
    assert lr_of(resolve({re.compile(r"d1\d*/kernel$"): 2.0})) == expect(
        ["backbone/d1/kernel", "backbone/d10/kernel"], 2.0)


def test_layer_type_and_predicate_and_variable():
    model, backbone = nested_model()
    got = resolve(
        [(keras.layers.LayerNormalization, 0.0),
         (lambda v: len(v.shape) == 1, 0.5),
         (model.get_layer("head").kernel, 4.0)],
        model=model,
    )
    expected = expect([p for p in ALL if p.endswith("bias")], 0.5)
    expected.update({"backbone/norm/gamma": 0.0, "backbone/norm/beta": 0.0, "head/kernel": 4.0})
    assert lr_of(got) == expected
    assert got["backbone/norm/gamma"].lr_rule == "type LayerNormalization"


def test_first_match_wins_and_tuple_means_any():
    got = resolve([("new_conv", 7.0), (("new_conv", "head"), 3.0), ("*", 0.5)])
    expected = {p: 0.5 for p in ALL}
    expected.update({"new_conv/kernel": 7.0, "new_conv/bias": 7.0, "head/kernel": 3.0, "head/bias": 3.0})
    assert lr_of(got) == expected
    assert got["head/bias"].lr_rule == "('new_conv', 'head')"
    assert got["backbone/d1/kernel"].lr_rule == "'*'"


def test_unmatched_variables_get_one_and_no_rule():
    got = resolve({"head": 2.0}, {"*bias": 0.0})
    assert got["new_conv/kernel"].lr_mult == 1.0 and got["new_conv/kernel"].lr_rule is None
    assert got["new_conv/kernel"].decay_mult == 1.0 and got["new_conv/kernel"].decay_rule is None
    assert got["new_conv/bias"].decay_mult == 0.0


def test_frozen_layer_object_is_not_an_error_and_trainable_rest_resolves():
    model, backbone = nested_model()
    backbone.trainable = False
    got = resolve({backbone: 0.01, "head": 2.0}, model=model)
    assert sorted(got) == sorted(ALL[6:])
    assert lr_of(got)["head/kernel"] == 2.0


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, -math.inf])
def test_bad_values_raise_value_error(bad):
    with pytest.raises(ValueError, match=r"lr_mult for 'head' must be a finite number >= 0"):
        layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={"head": bad})


@pytest.mark.parametrize("bad", ["0.1", None, True, [0.1]])
def test_non_numeric_values_raise_type_error(bad):
    with pytest.raises(TypeError, match="must be a finite number >= 0"):
        layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), decay_mult=[("head", bad)])


@pytest.mark.parametrize(
    "selector, message",
    [(3, "Unknown selector 3 of type int"),
     (int, "The class int is not a selector"),
     ("", "An empty string is not a valid selector"),
     ((), "An empty tuple is not a valid selector")],
)
def test_unknown_selector_types(selector, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult=[(selector, 1.0)])


@pytest.mark.parametrize("spec", ["head", 0.5, [("head",)], [("head", 1.0, 2.0)]])
def test_malformed_rule_specs(spec):
    with pytest.raises(TypeError, match="lr_mult"):
        layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult=spec)


def test_rule_matching_nothing_names_it_and_suggests_paths():
    model = nested_model()[0]
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), lr_mult={"new_cnv": 0.1})
    with pytest.raises(ValueError) as info:
        opt.build(model)
    message = str(info.value)
    assert "lr_mult rule 'new_cnv' matches none of the 10 trainable variables" in message
    assert "Closest paths: 'new_conv'" in message
    # Nothing was half-applied: the optimizer and its inner are still unbuilt.
    assert not opt.built and not opt.inner_optimizer.built
    assert opt.inner_optimizer.variables == opt.inner_optimizer._variables[:2]


def test_unbuilt_layer_selector_says_to_build_the_model():
    layer = keras.layers.Dense(3)
    model = nested_model()[0]
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), lr_mult={layer: 0.1})
    with pytest.raises(ValueError, match="the layer has no weights yet"):
        opt.build(model)


def test_layer_type_selector_in_a_custom_loop_needs_the_model():
    model = nested_model()[0]
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), lr_mult={keras.layers.Dense: 0.1})
    with pytest.raises(ValueError, match=r"optimizer.build\(model\)"):
        opt.build(model.trainable_variables)
    opt.build(model)
    assert opt.multipliers["head/kernel"].lr_mult == 0.1


def test_variables_are_listed_in_model_order():
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam())
    model = nested_model()[0]
    opt.build(model)
    assert list(opt.multipliers) == [v.path for v in model.trainable_variables]


def test_multipliers_before_build_is_a_clear_error():
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="not built yet"):
        opt.multipliers


def test_rule_shadowed_by_an_earlier_one_warns_but_builds():
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult=[("d1", 0.1), ("d1/kernel", 3.0)])
    with pytest.warns(UserWarning, match=r"'d1/kernel' never applies: .* taken by the earlier rule 'd1'"):
        opt.build(nested_model()[0])
    assert opt.multipliers["backbone/d1/kernel"].lr_mult == 0.1
