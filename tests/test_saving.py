"""Saving and resuming keeps the multipliers and all optimizer state."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import keras

import layerlr
from conftest import BACKEND, only_on
from helpers import data, max_abs_diff

RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import layerlr  # registers LayerwiseOptimizer: no custom_objects needed
    policy, model_path, data_path, out_path = sys.argv[1:5]
    keras.mixed_precision.set_global_policy(policy)
    model = keras.models.load_model(model_path)
    opt = model.optimizer
    if isinstance(opt, keras.optimizers.LossScaleOptimizer):
        opt = opt.inner_optimizer
    state = {v.path: v.numpy() for v in model.optimizer.variables}
    arrays = np.load(data_path)
    model.fit(arrays["x"], arrays["y"], batch_size=16, epochs=1, shuffle=False, verbose=0)
    np.savez(out_path, *model.get_weights())
    print(json.dumps({
        "wrapper": type(opt).__name__,
        "inner": type(opt.inner_optimizer).__name__,
        "multipliers": {p: [m.lr_mult, m.decay_mult] for p, m in opt.multipliers.items()},
        "iterations": int(opt.iterations),
        "n_state": len(state),
    }))
    """
)


def backbone_model():
    backbone = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="pre1"),
         keras.layers.Dense(8, activation="tanh", name="pre2")],
        name="backbone",
    )
    model = keras.Sequential(
        [keras.Input((6,)), backbone, keras.layers.Dense(3, name="head")], name="outer"
    )
    return model, backbone


def resume_in_fresh_process(tmp_path, model, policy="float32"):
    x, y = data()
    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), policy, model_path, str(tmp_path / "data.npz"),
         str(tmp_path / "resumed.npz")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, KERAS_BACKEND=BACKEND),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    resumed = np.load(tmp_path / "resumed.npz")
    return report, [resumed[f"arr_{i}"] for i in range(len(resumed.files))]


@pytest.mark.parametrize(
    "policy, opt_class",
    [("float32", keras.optimizers.AdamW), ("mixed_float16", keras.optimizers.Nadam)],
    ids=["adamw", "nadam_mixed_float16"],
)
def test_save_load_in_fresh_process_then_resume_equals_uninterrupted(tmp_path, policy, opt_class):
    keras.mixed_precision.set_global_policy(policy)
    model, backbone = backbone_model()
    x, y = data()
    opt = layerlr.LayerwiseOptimizer(
        opt_class(learning_rate=0.01, weight_decay=0.1),
        lr_mult={backbone: 0.1, "head/kernel": 2.0},
        decay_mult={"*bias": 0.0},
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    report, resumed = resume_in_fresh_process(tmp_path, model, policy)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # uninterrupted

    assert report["wrapper"] == "LayerwiseOptimizer"
    assert report["inner"] == opt_class.__name__
    # Outer-model prefixes vanish on load; the multipliers stay with their variables.
    assert report["multipliers"] == {
        "pre1/kernel": [0.1, 1.0], "pre1/bias": [0.1, 0.0],
        "pre2/kernel": [0.1, 1.0], "pre2/bias": [0.1, 0.0],
        "head/kernel": [2.0, 1.0], "head/bias": [1.0, 0.0],
    }
    assert report["iterations"] == 8
    assert report["n_state"] == len(model.optimizer.variables)
    for a, b in zip(model.get_weights(), resumed):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_prefix_anchored_rule_keeps_saved_multipliers_and_warns(tmp_path):
    import re

    model, _ = backbone_model()
    x, y = data()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01), lr_mult={re.compile(r"^backbone/"): 0.1})
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.models.load_model(path)
    assert any("no longer resolve" in str(w.message) for w in caught)
    assert loaded.optimizer.multipliers["pre1/kernel"].lr_mult == 0.1
    assert loaded.optimizer.multipliers["head/kernel"].lr_mult == 1.0


def test_config_round_trip_keeps_rules_that_can_be_saved():
    import re

    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9),
        lr_mult=[("head", 2.0), (re.compile("pre[12]/kernel$", re.I), 0.5),
                 (keras.layers.LayerNormalization, 0.0), (lambda v: False, 3.0)],
        decay_mult={("*bias", "*beta"): 0.0},
    )
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(opt)))
    restored = keras.saving.deserialize_keras_object(config)
    rules = [(r.describe(), r.value) for r in restored._layerlr.lr_rules]
    assert rules == [("'head'", 2.0), ("re.compile('pre[12]/kernel$')", 0.5),
                     ("type LayerNormalization", 0.0), (rules[3][0], 3.0)]
    assert rules[3][0].startswith("predicate ")
    assert restored._layerlr.lr_rules[1].selector.pattern.flags & re.I
    assert [r.describe() for r in restored._layerlr.decay_rules] == ["('*bias', '*beta')"]
    assert restored.inner_optimizer.get_config() == opt.inner_optimizer.get_config()


def test_saved_multipliers_refuse_a_model_whose_layers_changed():
    model, backbone = backbone_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), lr_mult={backbone: 0.1})
    opt.build(model.trainable_variables)
    config = opt.get_config()

    renamed = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="other"),
                                keras.layers.Dense(8, name="pre2"), keras.layers.Dense(3, name="head")])
    restored = layerlr.LayerwiseOptimizer.from_config(config)
    with pytest.raises(ValueError, match=r"the saved variable #0 'backbone/pre1/kernel' has no counterpart in the model"):
        restored.build(renamed.trainable_variables)
    assert not restored.inner_optimizer.built

    smaller = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="head")])
    with pytest.raises(ValueError, match=r"the saved variable #0 'backbone/pre1/kernel' has no counterpart"):
        layerlr.LayerwiseOptimizer.from_config(config).build(smaller.trainable_variables)


def test_set_weights_and_get_weights_round_trip():
    model, backbone = backbone_model()
    x, y = data()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01), lr_mult={backbone: 0.1})
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, epochs=1, verbose=0)
    other = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01), lr_mult={backbone: 0.1})
    other.build(model.trainable_variables)
    other.set_weights([v.numpy() for v in opt.variables])
    for a, b in zip(opt.variables, other.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(other.iterations) == int(opt.iterations) > 0


@only_on("tensorflow")
def test_tf_train_checkpoint_round_trip(tmp_path):
    import tensorflow as tf

    x, y = data()

    def make():
        keras.utils.set_random_seed(1)
        model, backbone = backbone_model()
        opt = layerlr.LayerwiseOptimizer(keras.optimizers.Nadam(0.01), lr_mult={backbone: 0.1})
        model.compile(optimizer=opt, loss="mse")
        return model, opt

    model, opt = make()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    prefix = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ckpt"))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    restored, restored_opt = make()
    restored_opt.build(restored.trainable_variables)
    status = tf.train.Checkpoint(model=restored, optimizer=restored_opt).restore(prefix)
    status.assert_existing_objects_matched()
    assert int(restored_opt.iterations) == 4
    restored.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert max_abs_diff(model, restored) < 1e-6
