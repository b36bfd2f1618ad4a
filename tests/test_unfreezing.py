"""Gradual unfreezing keeps optimizer state and equals a hand-built reference."""

import numpy as np
import pytest
import keras

import layerlr
from helpers import data, gradients, max_abs_diff


def staged_model():
    stem = keras.layers.Dense(8, activation="tanh", name="stem")
    block = keras.layers.Dense(8, activation="tanh", name="block")
    norm = keras.layers.BatchNormalization(name="bn")
    head = keras.layers.Dense(3, name="head")
    model = keras.Sequential([keras.Input((6,)), stem, block, norm, head], name="staged")
    return model, [head, [block, norm], stem]


def test_unfreezing_keeps_moments_and_matches_a_reference_built_by_hand():
    x, y = data(n=32)
    model, groups = staged_model()
    ref_model, _ = staged_model()
    ref_model.set_weights(model.get_weights())
    lr_mult = {"stem": 0.1, "block": 0.5}
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01), lr_mult=lr_mult)
    model.compile(optimizer=opt, loss="mse")

    seen = []  # variable counts the inner optimizer is applied to
    original_apply = opt.inner_optimizer.apply
    opt.inner_optimizer.apply = lambda g, v=None: (seen.append(len(v)), original_apply(g, v))[1]

    begin, end = {}, {}

    def state():
        return {v.path: v.numpy().copy() for v in opt.inner_optimizer.variables}

    class Probe(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):  # runs after the unfreezing
            begin[epoch] = state()

        def on_epoch_end(self, epoch, logs=None):
            end[epoch] = state()

    model.fit(x, y, batch_size=8, epochs=5, shuffle=False, verbose=0,
              callbacks=[layerlr.GradualUnfreezing(groups, every=2), Probe()])

    # Frozen layers are left out of the gradient computation entirely.
    assert seen[0] == 2 and max(seen) == 6  # head; then head+block; then +stem (bn stays frozen)
    assert model.get_layer("bn").trainable is False
    # Epoch 2 unfroze `block`: the head's moments carried over unchanged.
    head_slots = [p for p in end[1] if "head" in p and ("momentum" in p or "velocity" in p)]
    assert head_slots and set(head_slots) <= set(begin[2])
    for p in head_slots:
        np.testing.assert_array_equal(begin[2][p], end[1][p])
    assert int(opt.iterations) == 20

    # Reference: one plain Adam per layer, each created when its layer starts
    # training (its own step counter from there, like torch's add_param_group).
    rates = {"head": 0.01, "block": 0.005, "stem": 0.001}
    trains_from = {"head": 0, "block": 2, "stem": 4}
    ref_model.get_layer("bn").trainable = False
    variables = ref_model.trainable_variables
    layer_of = [v.path.split("/")[-2] for v in variables]
    ref_opts = {}
    for epoch in range(5):
        for start in range(0, 32, 8):
            grads = gradients(ref_model, x[start:start + 8], y[start:start + 8])
            for layer, first_epoch in trains_from.items():
                if epoch < first_epoch:
                    continue
                opt_of_layer = ref_opts.setdefault(layer, keras.optimizers.Adam(rates[layer]))
                pairs = [(g, v) for g, v, name in zip(grads, variables, layer_of) if name == layer]
                opt_of_layer.apply([g for g, _ in pairs], [v for _, v in pairs])
    assert max_abs_diff(model, ref_model) < 1e-6


def test_batchnorm_can_be_unfrozen_on_request():
    x, y = data(n=16)
    model, groups = staged_model()
    model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
    model.fit(x, y, epochs=2, verbose=0,
              callbacks=[layerlr.GradualUnfreezing(groups, unfreeze_batchnorm=True)])
    assert model.get_layer("bn").trainable is True
    assert "bn/gamma" in {"/".join(p.split("/")[-2:]) for p in model.optimizer.multipliers}


def test_frozen_batchnorm_stays_in_inference_mode():
    x, y = data(n=16)
    model, groups = staged_model()
    model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.01)), loss="mse")
    bn = model.get_layer("bn")
    stats = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    model.fit(x, y, epochs=3, verbose=0, callbacks=[layerlr.GradualUnfreezing(groups)])
    np.testing.assert_array_equal(bn.moving_mean.numpy(), stats[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), stats[1])


def frozen_start():
    model, (head, block_and_bn, stem) = staged_model()
    for layer in (stem, *block_and_bn):
        layer.trainable = False
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Nadam(0.01), lr_mult={stem: 0.1})
    model.compile(optimizer=opt, loss="mse")
    x, y = data(n=16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return model, opt, stem, (x, y)


def test_building_again_after_unfreezing_keeps_every_state_value():
    model, opt, stem, _ = frozen_start()
    inner = opt.inner_optimizer
    # Nadam's u_product is an unnamed Keras variable: compared on its own below.
    slots = lambda: {v.name: v.numpy().copy() for v in inner.variables if v is not inner._u_product}  # noqa: E731
    before = slots()
    u_product = float(inner._u_product.numpy())
    stem.trainable = True
    opt.build(model.trainable_variables)
    after = slots()
    new = set(after) - set(before)
    # The stem starts at step 2 with fresh slots and its own momentum product.
    assert sorted(new) == [
        "staged_stem_bias_momentum", "staged_stem_bias_velocity",
        "staged_stem_kernel_momentum", "staged_stem_kernel_velocity", "u_product_from_step_2"]
    assert all(not after[name].any() for name in new - {"u_product_from_step_2"})  # zero slots
    assert after["u_product_from_step_2"] == 1.0
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert float(inner._u_product.numpy()) == u_product != 1.0
    assert opt.multipliers["staged/stem/kernel"].lr_mult == 0.1


def test_unfreeze_and_recompile_then_fit_trains_the_new_layer():
    model, opt, stem, (x, y) = frozen_start()
    kernel = stem.kernel.numpy().copy()
    stem.trainable = True
    model.compile(optimizer=opt, loss="mse")  # the usual Keras way
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(opt.iterations) == 4
    assert not np.array_equal(kernel, stem.kernel.numpy())
    # iteration, lr, 2 slots x 4 vars, u_product, and the stem's own u_product from step 2
    assert len(opt.inner_optimizer.variables) == 2 + 2 * 4 + 1 + 1


def test_requires_a_layerwise_optimizer():
    model, groups = staged_model()
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    x, y = data(n=8)
    with pytest.raises(ValueError, match="needs the model compiled with a layerlr.LayerwiseOptimizer"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[layerlr.GradualUnfreezing(groups)])


@pytest.mark.parametrize("kwargs, error", [
    (dict(groups=[], every=1), TypeError),
    (dict(groups=["head"], every=1), TypeError),
    (dict(groups=[keras.layers.Dense(2)], every=0), ValueError),
])
def test_validates_arguments(kwargs, error):
    with pytest.raises(error):
        layerlr.GradualUnfreezing(**kwargs)


def test_save_load_then_unfreeze_uses_the_saved_layer_rules(tmp_path):
    """The usual recipe: freeze, train, save, load, unfreeze, train on."""
    model, opt, stem, (x, y) = frozen_start()
    path = tmp_path / "frozen.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    loaded_opt = loaded.optimizer
    loaded.get_layer("stem").trainable = True
    loaded.compile(optimizer=loaded_opt, loss="mse")
    kernel = loaded.get_layer("stem").kernel.numpy().copy()
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(kernel, loaded.get_layer("stem").kernel.numpy())
    stem_entries = [m for p, m in loaded_opt.multipliers.items() if "stem" in p]
    assert [m.lr_mult for m in stem_entries] == [0.1, 0.1]
    assert stem_entries[0].lr_rule == "layer 'stem'"
