"""`from_caffe`: lr_mult / decay_mult rules read from Caffe net prototxt files."""

import fnmatch
import pathlib

import numpy as np
import pytest
import keras

import layerlr
from helpers import max_abs_diff, reference_optimizer

# A fine-tuning net in Caffe's usual style: a frozen first block, biases at
# twice the rate without decay, a BatchNorm + Scale pair, and a new classifier
# at 10x / 20x. Comments, both message delimiters and separators on purpose.
FINE_TUNE = """
name: "FineTuneNet"  # from a model zoo, edited
layer {
  name: "data" type: "Input" top: "data"
  input_param { shape: { dim: 1 dim: 3 dim: 8 dim: 8 } }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 0 decay_mult: 0 }
  param { lr_mult: 0 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } }
}
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer {
  name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  param < lr_mult: 1 decay_mult: 1 >
  param { lr_mult: 2; decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 }
}
layer {
  name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2"
  param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }
  batch_norm_param { use_global_stats: false }
}
layer {
  name: "scale2" type: "Scale" bottom: "conv2" top: "conv2"
  param { lr_mult: 1 decay_mult: 0 } param { lr_mult: 1 decay_mult: 0 }
  scale_param { bias_term: true }
}
layer { name: "fc7" type: "InnerProduct" bottom: "conv2" top: "fc7" inner_product_param { num_output: 8 } }
layer {
  name: 'fc8_new' type: "InnerProduct" bottom: "fc7" top: "fc8_new"
  param { lr_mult: 10, decay_mult: 1 }
  param { lr_mult: 2e1 decay_mult: 0 }
  inner_product_param { num_output: 3 }
}
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8_new" bottom: "label" top: "loss" }
"""

FINE_TUNE_LR = [
    ("conv1/kernel", 0.0), ("conv1/bias", 0.0), ("conv2/kernel", 1.0), ("conv2/bias", 2.0),
    ("bn2/gamma", 1.0), ("bn2/beta", 1.0), ("fc8_new/kernel", 10.0), ("fc8_new/bias", 20.0),
]
FINE_TUNE_DECAY = [
    ("conv1/kernel", 0.0), ("conv1/bias", 0.0), ("conv2/kernel", 1.0), ("conv2/bias", 0.0),
    ("bn2/gamma", 0.0), ("bn2/beta", 0.0), ("fc8_new/kernel", 1.0), ("fc8_new/bias", 0.0),
]
# The Caffe Scale layer holds the Keras BatchNormalization's gamma and beta.
SCALE_INTO_BN = {"scale2": "bn2"}


def test_fine_tuning_net_from_text_and_from_files(tmp_path):
    path = tmp_path / "train_val.prototxt"
    path.write_text(FINE_TUNE)
    for source in (FINE_TUNE, path, str(path)):
        rules = layerlr.from_caffe(source, layer_name_map=SCALE_INTO_BN)
        assert rules == {"lr_mult": FINE_TUNE_LR, "decay_mult": FINE_TUNE_DECAY}


def keras_net():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(4, 3, name="conv2")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.Flatten()(keras.layers.ReLU()(h))
    h = keras.layers.Dense(8, activation="relu", name="fc7")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc8_new")(h))


def caffe_by_hand(path):
    """The fine-tuning net's multipliers, read off the prototxt by hand."""
    layer, blob = path.split("/")[-2:]
    lr = {"conv1": (0, 0), "conv2": (1, 2), "bn2": (1, 1), "fc7": (1, 1), "fc8_new": (10, 20)}[layer]
    decay = {"conv1": (0, 0), "conv2": (1, 0), "bn2": (0, 0), "fc7": (1, 1), "fc8_new": (1, 0)}[layer]
    index = 0 if blob in ("kernel", "gamma") else 1
    return float(lr[index]), float(decay[index])


def test_rules_train_a_keras_model_as_caffe_would():
    kwargs = dict(learning_rate=0.01, momentum=0.9, weight_decay=1e-3)
    model = keras_net()
    reference, plain = keras_net(), keras_net()
    reference.set_weights(model.get_weights())
    plain.set_weights(model.get_weights())
    rules = layerlr.from_caffe(FINE_TUNE, layer_name_map=SCALE_INTO_BN)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(**kwargs), **rules)

    conv1_before = np.array(model.get_layer("conv1").kernel)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    for m, o in ((model, opt), (reference, reference_optimizer(keras.optimizers.SGD, kwargs, caffe_by_hand)),
                 (plain, keras.optimizers.SGD(**kwargs))):
        m.compile(optimizer=o, loss="mse")
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)

    assert {p: (e.lr_mult, e.decay_mult) for p, e in opt.multipliers.items()} == {
        v.path: caffe_by_hand(v.path) for v in model.trainable_variables
    }
    assert max_abs_diff(model, reference) < 1e-6
    assert max_abs_diff(model, plain) > 1e-4
    # lr_mult: 0 freezes conv1, as in Caffe.
    np.testing.assert_array_equal(np.array(model.get_layer("conv1").kernel), conv1_before)


def test_a_layer_the_model_lacks_is_an_error_at_build():
    rules = layerlr.from_caffe(FINE_TUNE)  # scale2 not mapped onto bn2
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.01), **rules)
    with pytest.raises(ValueError, match=r"'scale2/gamma' matches none"):
        opt.build(keras_net())


def test_old_v1_layers_format():
    text = """
    layers { name: "conv1" type: CONVOLUTION blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
             param: "shared_w" }
    layers { name: "fc6" type: INNER_PRODUCT blobs_lr: [0, 0] }
    layers { name: "relu" type: RELU }
    """
    assert layerlr.from_caffe(text) == {
        "lr_mult": [("conv1/kernel", 1.0), ("conv1/bias", 2.0), ("fc6/kernel", 0.0), ("fc6/bias", 0.0)],
        "decay_mult": [("conv1/kernel", 1.0), ("conv1/bias", 0.0)],
    }


def test_only_written_values_become_rules_and_blob_names_follow_the_type():
    text = r"""
    layer { name: "a" type: "Convolution" param { lr_mult: 3 } param { decay_mult: 0.5 } }
    layer { name: "p" type: "PReLU" param { lr_mult: 1e-1f } }
    layer { name: "emb" type: "Embed" param { lr_mult: 2 } }
    layer { name: "fc*\"x" type: "InnerProduct" param { lr_mult: 4 } }
    """
    rules = layerlr.from_caffe(text)
    assert rules["lr_mult"] == [
        ("a/kernel", 3.0), ("p/alpha", 0.1), ("emb/embeddings", 2.0), ('fc[*]"x/kernel', 4.0)]
    assert rules["decay_mult"] == [("a/bias", 0.5)]
    glob = rules["lr_mult"][-1][0]
    assert fnmatch.fnmatchcase('fc*"x/kernel', glob)
    assert not fnmatch.fnmatchcase('fcZ"x/kernel', glob)


def test_layer_name_map_renames_and_skips():
    text = """
    layer { name: "conv1/7x7_s2" type: "Convolution" param { lr_mult: 0 } }
    layer { name: "loss3/classifier" type: "InnerProduct" param { lr_mult: 10 } param { lr_mult: 20 } }
    """
    renamed = layerlr.from_caffe(text, layer_name_map=lambda name: name.replace("/", "_"))
    assert renamed["lr_mult"] == [
        ("conv1_7x7_s2/kernel", 0.0), ("loss3_classifier/kernel", 10.0), ("loss3_classifier/bias", 20.0)]
    skipped = layerlr.from_caffe(text, layer_name_map={"conv1/7x7_s2": None, "loss3/classifier": "head"})
    assert skipped["lr_mult"] == [("head/kernel", 10.0), ("head/bias", 20.0)]
    with pytest.raises(ValueError, match=r"not in the prototxt: 'loss3/clasifier' \(closest: \['loss3/classifier'\]\)"):
        layerlr.from_caffe(text, layer_name_map={"loss3/clasifier": "head"})
    with pytest.raises(TypeError, match="expected a Keras layer name"):
        layerlr.from_caffe(text, layer_name_map={"loss3/classifier": 3})


def test_same_name_layers_must_agree():
    twice = """
    layer { name: "fc" type: "InnerProduct" param { lr_mult: 2 } include { phase: TRAIN } }
    layer { name: "fc" type: "InnerProduct" param { lr_mult: %s } include { phase: TEST } }
    """
    assert layerlr.from_caffe(twice % "2")["lr_mult"] == [("fc/kernel", 2.0)]
    with pytest.raises(ValueError, match="both map to the Keras variable 'fc/kernel'"):
        layerlr.from_caffe(twice % "3")


@pytest.mark.parametrize("text, error", [
    ('layer { name: "a" param { lr_mul: 0 } }', r"unknown field 'lr_mul' in param \{ \}; did you mean 'lr_mult'"),
    ('layer { name: "a" lr_mult: 0 }', r"layer 'a': 'lr_mult' does not belong here.*param \{ lr_mult"),
    ('layer { name: "a" parm { lr_mult: 0 } }', r"unknown field 'parm'; did you mean 'param'"),
    ('layer { name: "a" param { lr_mult: -1 } }', r"layer 'a' param #0: lr_mult must be a finite number >= 0"),
    ('layer { name: "a" param { lr_mult: "ten" } }', r"lr_mult must be a number, got 'ten'"),
    ('layer { name: "a" param { lr_mult: 1 lr_mult: 2 } }', r"has 2 'lr_mult' fields"),
    ('layer { name: "a" param { lr_mult: 1 }\nlayer { name: "b" }', r"not valid protobuf text format.*Missing '\}'"),
    ('layer { name: "a" param { lr_mult 1 } }', r"Expected ':' or '\{' after the field name 'lr_mult'"),
    ('layer { param { lr_mult: 1 } }', r"layer #0 has param blocks but no name"),
    ('layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } }', r"BatchNorm with a nonzero lr_mult"),
    ('layer { name: "s" type: "Scale" param {} param {} param {} }', r"3 param blocks.*gamma, beta.*'s': None"),
    ('net: "train_val.prototxt"\nbase_lr: 0.01\nweight_decay: 0.0005', r"solver prototxt.*'train_val.prototxt'"),
    ('name: "x"\nlayr { name: "a" }', r"no layer \{ \} blocks.*did you mean 'layer'"),
    ('layer { name: "a" }\nlayers { name: "b" }', r"mixes layer \{ \} and the old layers"),
    ('layers { layer { name: "a" blobs_lr: 1 } }', r"V0 format"),
    ('layers { name: "a" blobs_lr: 1 param { lr_mult: 1 } }', r"param \{ \} blocks belong to the new"),
])
def test_bad_prototxt_is_explained(text, error):
    with pytest.raises(ValueError, match=error):
        layerlr.from_caffe(text)


def test_bad_sources_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="No prototxt file at .*missing.prototxt"):
        layerlr.from_caffe(str(tmp_path / "missing.prototxt"))
    with pytest.raises(FileNotFoundError):
        layerlr.from_caffe(pathlib.Path(tmp_path / "missing.prototxt"))
    with pytest.raises(TypeError, match="prototxt text .* or a path"):
        layerlr.from_caffe(b"layer {}")


# Caffe's siamese example: the second tower shares the first one's blobs by
# param name; a Keras port calls the same layers twice.
SIAMESE = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { name: "conv1_w" lr_mult: 1 } param { name: "conv1_b" lr_mult: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  param { name: "ip1_w" lr_mult: 0.1 decay_mult: 1 } param { name: "ip1_b" lr_mult: 0.2 decay_mult: 0 } }
layer { name: "conv1_p" type: "Convolution" bottom: "data_p" top: "conv1_p"
  param { name: "conv1_w" lr_mult: 1 } param { name: "conv1_b" lr_mult: 2 } }
layer { name: "ip1_p" type: "InnerProduct" bottom: "conv1_p" top: "ip1_p"
  param { name: "ip1_w" lr_mult: 0.1 decay_mult: 1 } param { name: "ip1_b" lr_mult: 0.2 decay_mult: 0 } }
"""


def siamese_keras():
    conv = keras.layers.Conv2D(2, 3, name="conv1")
    ip = keras.layers.Dense(3, name="ip1")
    tower = lambda x: ip(keras.layers.Flatten()(conv(x)))  # noqa: E731
    a, b = keras.Input((6, 6, 1)), keras.Input((6, 6, 1))
    return keras.Model([a, b], keras.layers.Subtract()([tower(a), tower(b)]))


def test_params_shared_by_name_belong_to_the_layer_that_owns_them():
    rules = layerlr.from_caffe(SIAMESE)
    assert rules == {
        "lr_mult": [("conv1/kernel", 1.0), ("conv1/bias", 2.0), ("ip1/kernel", 0.1), ("ip1/bias", 0.2)],
        "decay_mult": [("ip1/kernel", 1.0), ("ip1/bias", 0.0)],
    }
    model = siamese_keras()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1, weight_decay=1e-4), **rules)
    opt.build(model)  # no rule for the missing conv1_p / ip1_p
    assert {p: m.lr_mult for p, m in opt.multipliers.items()} == {
        "conv1/kernel": 1.0, "conv1/bias": 2.0, "ip1/kernel": 0.1, "ip1/bias": 0.2,
    }
    mismatch = SIAMESE.rsplit('param { name: "ip1_b" lr_mult: 0.2', 1)
    mismatch = mismatch[0] + 'param { name: "ip1_b" lr_mult: 0.5' + mismatch[1]
    with pytest.raises(ValueError, match="'ip1' and 'ip1_p' share the param 'ip1_b' with different lr_mult"):
        layerlr.from_caffe(mismatch)


def test_a_solver_with_an_inline_net_is_read():
    solver = f"base_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\nnet_param {{ {FINE_TUNE} }}\nmax_iter: 100"
    assert layerlr.from_caffe(solver, layer_name_map=SCALE_INTO_BN) == {
        "lr_mult": FINE_TUNE_LR, "decay_mult": FINE_TUNE_DECAY,
    }
    with pytest.raises(ValueError, match="2 inline nets"):
        layerlr.from_caffe(f"base_lr: 0.01 net_param {{ {FINE_TUNE} }} train_net_param {{ {FINE_TUNE} }}")
