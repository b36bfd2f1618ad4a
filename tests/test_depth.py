"""layer_decay: depth found automatically, checked against multipliers worked out by hand.

Every expected multiplier below is written out from the model's structure
(decay 0.5, so each step halves and the floats are exact), never computed by
layerlr. The last test trains with the rules against one separately configured
optimizer per depth (`helpers.reference_optimizer`).
"""

import numpy as np
import pytest
import keras

import layerlr
from helpers import data, make_model, max_abs_diff, reference_optimizer, twin_models

L = keras.layers


def mults(rules):
    """{layer name or variable path: multiplier}; each selector appears once."""
    found = {}
    for selector, mult in rules:
        key = selector.name if isinstance(selector, keras.Layer) else selector.path
        assert key not in found, f"two rules for {key}"
        found[key] = mult
    return found


def resolved_lr(model, rules):
    """What the optimizer makes of the rules, per variable path."""
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult=rules)
    opt.build(model)
    return {path: m.lr_mult for path, m in opt.multipliers.items()}


# --- Sequential -------------------------------------------------------------------


def test_sequential_counts_each_layer_with_weights_in_order():
    model = keras.Sequential([
        keras.Input((4,)),
        L.Dense(8, name="d1"),
        L.Dropout(0.1),
        L.Dense(8, name="d2"),
        L.BatchNormalization(name="bn"),  # normalizes d2: same step
        L.Activation("relu"),
        L.Dense(8, name="d3"),
        L.Dense(2, name="head"),
    ], name="seq")
    rules = layerlr.layer_decay(model, 0.5)
    assert mults(rules) == {"head": 1.0, "d3": 0.5, "d2": 0.25, "bn": 0.25, "d1": 0.125}
    # Head first, and every trainable variable gets an explicit rule.
    assert rules[0][0].name == "head"
    lrs = resolved_lr(model, rules)
    assert lrs["seq/d1/kernel"] == 0.125 and lrs["seq/bn/gamma"] == 0.25
    assert len(lrs) == 10


def test_unbuilt_sequential_is_built_by_sample_input():
    model = keras.Sequential([L.Dense(4, name="a"), L.Dense(2, name="b")])
    assert mults(layerlr.layer_decay(model, 0.5, sample_input=np.ones((1, 3), "float32"))) == {
        "b": 1.0, "a": 0.5,
    }


def test_decay_one_gives_one_everywhere_and_default_decay_is_075():
    model = keras.Sequential([keras.Input((3,)), L.Dense(3, name="a"), L.Dense(3, name="b")])
    assert set(mults(layerlr.layer_decay(model, 1.0)).values()) == {1.0}
    assert mults(layerlr.layer_decay(model)) == {"b": 1.0, "a": 0.75}


# --- functional CNN with branches ------------------------------------------------


def branchy_cnn():
    x = keras.Input((12, 12, 3))
    h = L.Conv2D(6, 3, padding="same", name="stem")(x)
    h = L.BatchNormalization(name="stem_bn")(h)
    h = L.Activation("relu")(h)
    # Inception-style module: parallel branches of different lengths.
    a = L.Conv2D(4, 1, name="b1x1")(h)
    b = L.Conv2D(4, 1, name="b3_reduce")(h)
    b = L.Conv2D(4, 3, padding="same", name="b3")(b)
    c = L.MaxPooling2D(3, 1, padding="same")(h)
    c = L.Conv2D(4, 1, name="bpool")(c)
    h = L.Concatenate(name="cat")([a, b, c])
    # Residual block with a projection shortcut.
    r = L.Conv2D(8, 3, padding="same", name="res_a")(h)
    r = L.BatchNormalization(name="res_bn")(r)
    r = L.Activation("relu")(r)
    r = L.Conv2D(8, 3, padding="same", name="res_b")(r)
    s = L.Conv2D(8, 1, name="res_proj")(h)
    h = L.Add(name="res_add")([s, r])
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(x, L.Dense(3, name="head")(h), name="cnn")


def test_functional_cnn_branches_and_residual_blocks_share_a_depth():
    rules = layerlr.layer_decay(branchy_cnn(), 0.5)
    assert mults(rules) == {
        "head": 1.0,
        "res_a": 0.5, "res_bn": 0.5, "res_b": 0.5, "res_proj": 0.5,
        "b1x1": 0.25, "b3_reduce": 0.25, "b3": 0.25, "bpool": 0.25,
        "stem": 0.125, "stem_bn": 0.125,
    }


# --- functional transformer encoder ---------------------------------------------------


class PositionEmbedding(L.Layer):
    def build(self, input_shape):
        self.table = self.add_weight(shape=tuple(input_shape[1:]), name="table")

    def call(self, x):
        return x + self.table


def pre_ln_encoder(blocks=2, seq=6, width=8, name="encoder"):
    ids = keras.Input((seq,), dtype="int32", name="ids")
    # A padding mask computed from the inputs reaches every block: side data
    # that must not glue the blocks together.
    pad = keras.ops.not_equal(ids, 0)
    mask = keras.ops.logical_and(keras.ops.expand_dims(pad, 1), keras.ops.expand_dims(pad, 2))
    h = L.Embedding(20, width, name="tok")(ids)
    h = PositionEmbedding(name="pos")(h)
    for i in range(blocks):
        y = L.LayerNormalization(name=f"block{i}_ln1")(h)
        y = L.MultiHeadAttention(2, 4, name=f"block{i}_mha")(y, y, attention_mask=mask)
        h = L.Add()([h, y])
        y = L.LayerNormalization(name=f"block{i}_ln2")(h)
        y = L.Dense(16, activation="relu", name=f"block{i}_ff1")(y)
        y = L.Dense(width, name=f"block{i}_ff2")(y)
        h = L.Add()([h, y])
    h = L.LayerNormalization(name="final_ln")(h)
    h = L.GlobalAveragePooling1D()(h)
    return keras.Model(ids, L.Dense(3, name="head")(h), name=name)


def test_transformer_residual_blocks_share_one_depth_each():
    # Automatic: each residual block (attention, MLP) is one step, closed by
    # its Add; the final LayerNormalization normalizes the last MLP block.
    found = mults(layerlr.layer_decay(pre_ln_encoder(), 0.5))
    assert found == {
        "head": 1.0,
        "block1_ln2": 0.5, "block1_ff1": 0.5, "block1_ff2": 0.5, "final_ln": 0.5,
        "block1_ln1": 0.25, "block1_mha": 0.25,
        "block0_ln2": 0.125, "block0_ff1": 0.125, "block0_ff2": 0.125,
        "block0_ln1": 0.0625, "block0_mha": 0.0625,
        "pos": 0.03125,
        "tok": 0.015625,
    }


def test_block_pattern_makes_each_transformer_layer_one_step_after_its_stem():
    model = pre_ln_encoder(name="block9_encoder")  # the model's own name is not a block
    found = mults(layerlr.layer_decay(model, 0.5, block_pattern=r"block(\d+)_"))
    block1 = {f"block1_{n}": 0.5 for n in ("ln1", "mha", "ln2", "ff1", "ff2")}
    block0 = {f"block0_{n}": 0.25 for n in ("ln1", "mha", "ln2", "ff1", "ff2")}
    assert found == {"head": 1.0, "final_ln": 0.5, **block1, **block0, "tok": 0.125, "pos": 0.125}

    # The stem's depth can be set: here 5 steps from the output.
    found = mults(layerlr.layer_decay(model, 0.5, block_pattern=r"block(\d+)_", stem_depth=5))
    assert found["tok"] == found["pos"] == 0.03125
    assert found["block0_mha"] == 0.25 and found["head"] == 1.0


def test_post_ln_transformer_counts_two_steps_per_layer():
    x = keras.Input((5, 8))
    h = x
    for i in range(2):
        y = L.MultiHeadAttention(2, 4, name=f"l{i}_mha")(h, h)
        h = L.LayerNormalization(name=f"l{i}_ln1")(L.Add()([h, y]))
        y = L.Dense(8, name=f"l{i}_ff2")(L.Dense(16, name=f"l{i}_ff1")(h))
        h = L.LayerNormalization(name=f"l{i}_ln2")(L.Add()([h, y]))
    model = keras.Model(x, L.Dense(2, name="head")(h))
    assert mults(layerlr.layer_decay(model, 0.5)) == {
        "head": 1.0,
        "l1_ff1": 0.5, "l1_ff2": 0.5, "l1_ln2": 0.5,
        "l1_mha": 0.25, "l1_ln1": 0.25,
        "l0_ff1": 0.125, "l0_ff2": 0.125, "l0_ln2": 0.125,
        "l0_mha": 0.0625, "l0_ln1": 0.0625,
    }


# --- nested models ---------------------------------------------------------------


def test_nested_models_are_expanded_in_place():
    backbone = keras.Sequential(
        [L.Dense(6, name="bb_a"), L.BatchNormalization(name="bb_bn"), L.Dense(6, name="bb_b")],
        name="backbone",
    )
    xi = keras.Input((6,))
    y = L.Dense(6, name="blk_inner")(L.LayerNormalization(name="blk_ln")(xi))
    block = keras.Model(xi, L.Add()([xi, y]), name="resblock")  # a residual block as a model
    x = keras.Input((4,))
    h = block(backbone(x))
    model = keras.Model(x, L.Dense(2, name="head")(L.Dense(6, name="neck")(h)))
    found = mults(layerlr.layer_decay(model, 0.5))
    assert found == {
        "head": 1.0, "neck": 0.5, "blk_ln": 0.25, "blk_inner": 0.25,
        "bb_b": 0.125, "bb_a": 0.0625, "bb_bn": 0.0625,
    }
    lrs = resolved_lr(model, layerlr.layer_decay(model, 0.5))
    assert lrs["backbone/bb_a/kernel"] == 0.0625


# --- subclassed models ---------------------------------------------------------------


class ResidualBlock(L.Layer):
    """A custom layer with sublayers: one step, whatever it holds."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = L.LayerNormalization()
        self.dense = L.Dense(6)

    def call(self, x):
        return x + self.dense(self.norm(x))


class Scrambled(keras.Model):
    """Layers assigned in an order unrelated to the order they run in."""

    def __init__(self):
        super().__init__(name="scrambled")
        self.head = L.Dense(2, name="head")
        self.block = ResidualBlock(name="block")
        self.mid = L.Dense(6, name="mid")
        self.stem = L.Dense(6, name="stem")

    def build(self, input_shape):
        self.offset = self.add_weight(shape=(6,), name="offset", initializer="zeros")

    def call(self, x):
        return self.head(self.block(self.mid(self.stem(x) + self.offset)))


def test_subclassed_model_is_traced_in_execution_order():
    model = Scrambled()
    x = np.ones((2, 3), "float32")
    assert [layer.name for layer in model.layers] == ["head", "block", "mid", "stem"]
    rules = layerlr.layer_decay(model, 0.5, sample_input=x)  # also builds it
    # The model's own weight is used where its computation starts.
    assert mults(rules) == {
        "head": 1.0, "block": 0.5, "mid": 0.25, "stem": 0.125, "scrambled/offset": 0.125,
    }
    lrs = resolved_lr(model, rules)
    assert lrs["scrambled/block/dense/kernel"] == 0.5
    assert lrs["scrambled/offset"] == 0.125


def test_subclassed_model_without_sample_input_is_an_error_not_attribute_order():
    model = Scrambled()
    model(np.ones((2, 3), "float32"))
    with pytest.raises(ValueError, match="attribute order.*sample_input"):
        layerlr.layer_decay(model, 0.5)
    with pytest.raises(ValueError, match="not built.*sample_input"):
        layerlr.layer_decay(Scrambled(), 0.5)


def test_subclassed_model_inside_a_functional_model():
    inner = Scrambled()
    x = keras.Input((3,))
    h = L.Dense(3, name="pre")(x)
    model = keras.Model(x, L.Dense(1, name="top")(inner(h)))
    found = mults(layerlr.layer_decay(model, 0.5, sample_input=np.ones((2, 3), "float32")))
    assert found == {
        "top": 1.0, "head": 0.5, "block": 0.25, "mid": 0.125, "stem": 0.0625,
        "scrambled/offset": 0.0625, "pre": 0.03125,
    }


class Encoder(L.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [ResidualBlock(name=f"blk_{i}") for i in range(3)]

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Net(keras.Model):
    def __init__(self):
        super().__init__(name="net")
        self.head = L.Dense(2, name="head")
        self.encoder = Encoder(name="encoder")
        self.embed = L.Dense(6, name="embed")

    def call(self, x):
        return self.head(self.encoder(self.embed(x)))


def test_block_pattern_opens_a_custom_layer_that_holds_the_blocks():
    model = Net()
    x = np.ones((2, 4), "float32")
    # A custom layer is one step...
    assert mults(layerlr.layer_decay(model, 0.5, sample_input=x)) == {
        "head": 1.0, "encoder": 0.5, "embed": 0.25,
    }
    # ...unless the pattern names blocks inside it.
    found = mults(layerlr.layer_decay(model, 0.5, sample_input=x, block_pattern=r"blk_(\d+)"))
    assert found == {"head": 1.0, "blk_2": 0.5, "blk_1": 0.25, "blk_0": 0.125, "embed": 0.0625}
    found = mults(layerlr.layer_decay(
        model, 0.5, sample_input=x, block_pattern=r"blk_(\d+)", stem_depth=1
    ))
    assert found["embed"] == 0.5 and found["blk_0"] == 0.125


# --- more graph shapes ----------------------------------------------------------------


def test_towers_count_back_from_their_merge_and_heads_from_their_outputs():
    a_in, b_in = keras.Input((4,)), keras.Input((5,))
    a = L.Dense(4, name="a2")(L.Dense(4, name="a1")(a_in))
    b = L.Dense(4, name="b1")(b_in)
    h = L.Dense(4, name="trunk")(L.Concatenate()([a, b]))
    o1 = L.Dense(1, name="o1")(h)
    o2 = L.Dense(1, name="o2b")(L.Dense(3, name="o2a")(h))
    model = keras.Model([a_in, b_in], [o1, o2])
    assert mults(layerlr.layer_decay(model, 0.5)) == {
        "o1": 1.0, "o2b": 1.0, "o2a": 0.5,
        "trunk": 0.25,  # the longest way out: through o2a
        "a2": 0.125, "b1": 0.125, "a1": 0.0625,
    }


def test_encoder_output_feeding_every_decoder_layer_sits_below_the_decoder():
    src, tgt = keras.Input((4, 6)), keras.Input((4, 6))
    enc = L.Dense(6, name="enc")(src)
    d = L.Dense(6, name="tgt_embed")(tgt)
    for i in range(2):
        y = L.MultiHeadAttention(1, 6, name=f"dec{i}_cross")(d, enc)  # side input
        d = L.Add()([d, y])
        d = L.Add()([d, L.Dense(6, name=f"dec{i}_ff")(d)])
    model = keras.Model([src, tgt], L.Dense(1, name="head")(d))
    assert mults(layerlr.layer_decay(model, 0.5)) == {
        "head": 1.0, "dec1_ff": 0.5, "dec1_cross": 0.25, "dec0_ff": 0.125,
        "dec0_cross": 0.0625, "tgt_embed": 0.03125, "enc": 0.03125,
    }


def test_shared_layer_takes_its_call_nearest_the_output():
    shared = L.Dense(4, name="shared")
    x = keras.Input((4,))
    h = shared(L.Dense(4, name="mid")(shared(x)))
    model = keras.Model(x, L.Dense(1, name="head")(h))
    assert mults(layerlr.layer_decay(model, 0.5)) == {"head": 1.0, "shared": 0.5, "mid": 0.25}


def test_frozen_layers_keep_their_depth_and_the_rules_resolve():
    model = make_model()
    model.get_layer("d1").trainable = False
    rules = layerlr.layer_decay(model, 0.5)
    assert mults(rules) == {"head": 1.0, "d2": 0.5, "ln": 0.5, "d1": 0.25}
    lrs = resolved_lr(model, rules)  # no "selects nothing" error for the frozen layer
    assert "d1/kernel" not in lrs and lrs["d2/kernel"] == 0.5


def test_layers_never_called_are_reported():
    class WithSpare(keras.Model):
        def __init__(self):
            super().__init__()
            self.used = L.Dense(2, name="used")
            self.spare = L.Dense(2, name="spare")

        def build(self, input_shape):
            self.spare.build(input_shape)  # has weights, never called

        def call(self, x):
            return self.used(x)

    model = WithSpare()
    x = np.ones((1, 3), "float32")
    with pytest.warns(UserWarning, match="spare/kernel.*keep lr_mult 1.0"):
        rules = layerlr.layer_decay(model, 0.5, sample_input=x)
    assert mults(rules) == {"used": 1.0}


# --- bad input ----------------------------------------------------------------------


def test_bad_arguments_get_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
        layerlr.layer_decay(model, 1.5)
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
        layerlr.layer_decay(model, 0.0)
    with pytest.raises(TypeError, match="decay must be a number"):
        layerlr.layer_decay(model, True)
    with pytest.raises(TypeError, match="Expected a Keras model"):
        layerlr.layer_decay("model", 0.5)
    with pytest.raises(ValueError, match="matches none of the layer names.*'d1'"):
        layerlr.layer_decay(model, 0.5, block_pattern=r"block_\d+")
    with pytest.raises(ValueError, match="not a valid regex"):
        layerlr.layer_decay(model, 0.5, block_pattern="block(")
    with pytest.raises(ValueError, match="stem_depth needs block_pattern"):
        layerlr.layer_decay(model, 0.5, stem_depth=2)
    with pytest.raises(ValueError, match="stem_depth must be an int >= 0"):
        layerlr.layer_decay(model, 0.5, block_pattern="d2", stem_depth=-1)
    with pytest.raises(ValueError, match="no layer with weights comes before the first block"):
        layerlr.layer_decay(model, 0.5, block_pattern="d1", stem_depth=2)


def test_interleaved_blocks_are_rejected():
    model = keras.Sequential([
        keras.Input((3,)),
        L.Dense(3, name="blk_a_1"),
        L.Dense(3, name="blk_b_1"),
        L.Dense(3, name="blk_a_2"),
    ])
    with pytest.raises(ValueError, match="interleaved blocks.*'blk_b_1'"):
        layerlr.layer_decay(model, 0.5, block_pattern=r"blk_(a|b)")


# --- end to end --------------------------------------------------------------------


def test_training_with_layer_decay_matches_one_optimizer_per_depth():
    model, reference = twin_models()
    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    # make_model: d1 -> d2 -> ln -> head; the LayerNormalization normalizes d2.
    by_layer = {"head": 1.0, "d2": 0.5, "ln": 0.5, "d1": 0.25}

    def hand(path):
        return by_layer[path.split("/")[-2]], 1.0

    kwargs = dict(learning_rate=0.02)
    model.compile(
        optimizer=layerlr.LayerwiseOptimizer(
            keras.optimizers.Adam(**kwargs), lr_mult=layerlr.layer_decay(model, 0.5)
        ),
        loss="mse",
    )
    reference.compile(optimizer=reference_optimizer(keras.optimizers.Adam, kwargs, hand), loss="mse")
    plain.compile(optimizer=keras.optimizers.Adam(**kwargs), loss="mse")
    x, y = data()
    for m in (model, reference, plain):
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert max_abs_diff(model, reference) < 1e-6
    assert max_abs_diff(model, plain) > 1e-4
