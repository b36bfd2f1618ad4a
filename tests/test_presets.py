"""spread and no_decay: hand-written expectations, resolved by the real optimizer.

Expected multipliers are written out by hand (paths and numbers), and the
training check compares against one separately configured optimizer per
group (`helpers.reference_optimizer`).
"""

import math

import pytest
import keras

import layerlr
from helpers import data, make_model, max_abs_diff, reference_optimizer, twin_models

L = keras.layers


def built(model, **rules):
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.AdamW(1e-3, weight_decay=0.1), **rules
    )
    opt.build(model)
    return opt.multipliers


# --- spread --------------------------------------------------------------------------


def test_spread_is_geometric_from_low_to_high():
    rules = layerlr.spread(["a", "b", "c", "d"], 0.01, 0.08)
    assert [s for s, _ in rules] == ["a", "b", "c", "d"]
    assert [m for _, m in rules] == pytest.approx([0.01, 0.02, 0.04, 0.08], rel=1e-12)
    # The ends are exact, whatever the rounding in between.
    rules = layerlr.spread(["a", "b", "c"], 1e-3, 0.1)
    assert rules[0][1] == 1e-3 and rules[-1][1] == 0.1
    assert rules[1][1] == pytest.approx(1e-2, rel=1e-12)


def test_spread_single_group_gets_high_like_fastai_slice():
    assert layerlr.spread(["head"], 1e-3, 0.5) == [("head", 0.5)]


def test_spread_may_decrease():
    assert [m for _, m in layerlr.spread(["a", "b", "c"], 1.0, 0.25)] == pytest.approx([1.0, 0.5, 0.25])


def test_spread_over_layers_and_lists_resolves_per_variable():
    model = make_model()
    d1, d2, ln, head = (model.get_layer(n) for n in ("d1", "d2", "ln", "head"))
    rules = layerlr.spread([d1, [d2, ln], head], 0.01, 1.0)
    assert rules[1][0] == (d2, ln)  # lists become tuple selectors
    lrs = {path: m.lr_mult for path, m in built(model, lr_mult=rules).items()}
    assert lrs == pytest.approx({
        "d1/kernel": 0.01, "d1/bias": 0.01,
        "d2/kernel": 0.1, "d2/bias": 0.1, "ln/gamma": 0.1, "ln/beta": 0.1,
        "head/kernel": 1.0, "head/bias": 1.0,
    })


@pytest.mark.parametrize(
    "groups, low, high, error, match",
    [
        ([], 0.1, 1.0, ValueError, "groups is empty"),
        ("abc", 0.1, 1.0, TypeError, "groups must be a list"),
        (["a", []], 0.1, 1.0, ValueError, r"groups\[1\] is an empty list"),
        (["a", 3.5], 0.1, 1.0, TypeError, r"groups\[1\]: Unknown selector 3.5"),
        (["a", "b"], 0.0, 1.0, ValueError, "low must be a finite number > 0"),
        (["a", "b"], 0.1, -1.0, ValueError, "high must be a finite number > 0"),
        (["a", "b"], 0.1, math.inf, ValueError, "high must be a finite number > 0"),
        (["a", "b"], True, 1.0, TypeError, "low must be a finite number > 0"),
    ],
)
def test_spread_bad_input(groups, low, high, error, match):
    with pytest.raises(error, match=match):
        layerlr.spread(groups, low, high)


# --- no_decay --------------------------------------------------------------------------


class Affine(L.Layer):
    """A custom layer whose bias is not named "bias"."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 3), name="w")
        self.bias = self.add_weight(shape=(3,), name="b", initializer="zeros")
        self.offset = self.add_weight(shape=(3,), name="offset", initializer="zeros")

    def call(self, x):
        return x @ self.kernel + self.bias + self.offset


def zoo():
    x = keras.Input((6, 4), name="x")
    ids = keras.Input((6,), dtype="int32", name="ids")
    h = L.Concatenate()([x, L.Embedding(10, 4, name="emb")(ids)])
    h = L.Conv1D(8, 3, padding="same", name="conv")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.MultiHeadAttention(2, 4, name="mha")(h, h)
    h = L.LayerNormalization(name="ln")(h)
    h = L.GroupNormalization(groups=2, name="gn")(h)
    h = L.RMSNormalization(name="rms")(h)
    h = L.UnitNormalization(name="unit")(h)  # no weights
    h = L.LayerNormalization(center=False, scale=False, name="bare_ln")(h)  # no weights
    h = L.LSTM(4, name="lstm")(h)
    frozen = keras.Sequential([L.Dense(4, name="fd"), L.BatchNormalization(name="fbn")], name="frozen")
    h = Affine(name="affine")(frozen(h))
    frozen.trainable = False
    return keras.Model([x, ids], L.Dense(2, use_bias=False, name="head")(h), name="zoo")


NO_DECAY = {
    "conv/bias", "bn/gamma", "bn/beta",
    "mha/query/bias", "mha/key/bias", "mha/value/bias", "mha/attention_output/bias",
    "ln/gamma", "ln/beta", "gn/gamma", "gn/beta", "rms/scale",
    "lstm/lstm_cell/bias", "affine/b",
}
DECAY = {
    "emb/embeddings", "conv/kernel",
    "mha/query/kernel", "mha/key/kernel", "mha/value/kernel", "mha/attention_output/kernel",
    "lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel",
    "affine/w", "affine/offset", "head/kernel",
}


def decay_mults(model, rules):
    return {path: m.decay_mult for path, m in built(model, decay_mult=rules).items()}


def test_no_decay_selects_biases_and_normalization_by_type():
    model = zoo()
    found = decay_mults(model, layerlr.no_decay(model))
    assert found == {**{p: 0.0 for p in NO_DECAY}, **{p: 1.0 for p in DECAY}}


def test_no_decay_with_embeddings():
    model = zoo()
    found = decay_mults(model, layerlr.no_decay(model, embeddings=True))
    assert found["emb/embeddings"] == 0.0
    assert found["conv/kernel"] == 1.0 and found["conv/bias"] == 0.0


def test_no_decay_finds_normalization_by_type_not_by_name():
    x = keras.Input((4,))
    h = L.Dense(4, use_bias=False, name="proj")(x)
    h = L.LayerNormalization(name="weird_name")(h)
    h = L.Dense(4, use_bias=False, name="layernorm_like_name")(h)
    model = keras.Model(x, h)
    found = decay_mults(model, layerlr.no_decay(model))
    assert found == {
        "proj/kernel": 1.0, "weird_name/gamma": 0.0, "weird_name/beta": 0.0,
        "layernorm_like_name/kernel": 1.0,
    }


def test_no_decay_covers_frozen_layers_without_selecting_nothing():
    model = zoo()
    rules = layerlr.no_decay(model)
    frozen = model.get_layer("frozen")
    fd, fbn = frozen.get_layer("fd"), frozen.get_layer("fbn")
    selectors = [s for s, _ in rules]
    # Rules for the frozen layers are there (they apply once unfrozen)...
    assert any(s is fbn for s in selectors) and any(s is fd.bias for s in selectors)
    # ...and none selects nothing: weightless normalization layers get none.
    names = {getattr(s, "name", None) for s in selectors}
    assert "unit" not in names and "bare_ln" not in names
    decay_mults(model, rules)  # builds without "selects nothing"


def test_no_decay_rules_work_in_a_custom_loop_built_on_a_variable_list():
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(3, name="dense0"), L.BatchNormalization(name="bn0")],
        name="small",
    )
    model.get_layer("bn0").trainable = False
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.AdamW(1e-3, weight_decay=0.1), decay_mult=layerlr.no_decay(model)
    )
    opt.build(model.trainable_variables)  # no model to find layers in
    assert {p: m.decay_mult for p, m in opt.multipliers.items()} == {
        "small/dense0/kernel": 1.0, "small/dense0/bias": 0.0,
    }
    # Teeth: selecting by type instead needs the model's layers there.
    by_type = layerlr.LayerwiseOptimizer(
        keras.optimizers.AdamW(1e-3, weight_decay=0.1),
        decay_mult=[(L.BatchNormalization, 0.0)],
    )
    with pytest.raises(ValueError, match="layer type"):
        by_type.build(model.trainable_variables)


def test_no_decay_composes_with_user_rules_first_match_wins():
    model = zoo()
    rules = [("conv", 0.5), ("head", 2.0), *layerlr.no_decay(model)]
    found = decay_mults(model, rules)
    assert found["conv/bias"] == 0.5 and found["conv/kernel"] == 0.5
    assert found["head/kernel"] == 2.0 and found["bn/gamma"] == 0.0


def test_no_decay_bad_input():
    with pytest.raises(TypeError, match="Expected a Keras model"):
        layerlr.no_decay(object())
    with pytest.raises(ValueError, match="no weights yet"):
        layerlr.no_decay(keras.Sequential([L.Dense(2)]))


def test_training_with_no_decay_matches_one_optimizer_per_group():
    model, reference = twin_models()
    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())

    def hand(path):  # make_model: biases and the LayerNormalization get no decay
        layer, name = path.split("/")[-2:]
        return 1.0, 0.0 if name == "bias" or layer == "ln" else 1.0

    kwargs = dict(learning_rate=0.02, weight_decay=0.5)
    model.compile(
        optimizer=layerlr.LayerwiseOptimizer(
            keras.optimizers.AdamW(**kwargs), decay_mult=layerlr.no_decay(model)
        ),
        loss="mse",
    )
    reference.compile(optimizer=reference_optimizer(keras.optimizers.AdamW, kwargs, hand), loss="mse")
    plain.compile(optimizer=keras.optimizers.AdamW(**kwargs), loss="mse")
    x, y = data()
    for m in (model, reference, plain):
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert max_abs_diff(model, reference) < 1e-6
    assert max_abs_diff(model, plain) > 1e-4


def test_layer_decay_spread_and_no_decay_together():
    model = make_model()
    d1 = model.get_layer("d1")
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.AdamW(1e-3, weight_decay=0.05),
        lr_mult=[(d1, 0.0), *layerlr.layer_decay(model, 0.5)],
        decay_mult=layerlr.no_decay(model),
    )
    opt.build(model)
    got = {p: (m.lr_mult, m.decay_mult) for p, m in opt.multipliers.items()}
    assert got == {
        "d1/kernel": (0.0, 1.0), "d1/bias": (0.0, 0.0),
        "d2/kernel": (0.5, 1.0), "d2/bias": (0.5, 0.0),
        "ln/gamma": (0.5, 0.0), "ln/beta": (0.5, 0.0),
        "head/kernel": (1.0, 1.0), "head/bias": (1.0, 0.0),
    }
