"""The summary table, its records, and the learning-rate logging callback.

Expected values are written out by hand from the rules (or measured from the
update the optimizer really applies), never taken from the summary itself.
"""

import glob
import json
import os
import re

import numpy as np
import pytest
import keras

import layerlr
from layerlr.report._summary import layers_in_depth_order, print_summary
from layerlr.callbacks import LearningRateLogger

F32 = lambda x: float(np.float32(x))  # noqa: E731  (rates are float32 variables)


def backbone_model():
    """Functional net with a nested backbone: paths have no outer-model prefix."""
    backbone = keras.Sequential(
        [keras.layers.Dense(8, name="b1"), keras.layers.Dense(8, name="b2")], name="backbone"
    )
    inputs = keras.Input((6,), name="x")
    h = backbone(inputs)
    h = keras.layers.Dense(4, name="neck")(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, outputs, name="net"), backbone


# Rows in depth order: (path, shape, params) written out by hand.
ROWS = [
    ("backbone/b1/kernel", [6, 8], 48),
    ("backbone/b1/bias", [8], 8),
    ("backbone/b2/kernel", [8, 8], 64),
    ("backbone/b2/bias", [8], 8),
    ("neck/kernel", [8, 4], 32),
    ("neck/bias", [4], 4),
    ("head/kernel", [4, 3], 12),
    ("head/bias", [3], 3),
]


def adamw_with_rules(backbone, lr=1e-3):
    return layerlr.LayerwiseOptimizer(
        keras.optimizers.AdamW(lr, weight_decay=0.05),
        lr_mult=[(backbone, 0.01), ("head/bias", 0.0)],
        decay_mult={"*bias": 0.0},
    )


def test_records_before_fit_are_resolved_from_the_model_without_building():
    model, backbone = backbone_model()
    opt = adamw_with_rules(backbone)
    records = layerlr.summary_records(model, opt)

    assert [(r["path"], r["shape"], r["params"]) for r in records] == ROWS
    lr_mults = [0.01, 0.01, 0.01, 0.01, 1.0, 1.0, 1.0, 0.0]
    decay_mults = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert [r["lr_mult"] for r in records] == lr_mults
    assert [r["decay_mult"] for r in records] == decay_mults
    assert [r["learning_rate"] for r in records] == pytest.approx(
        [1e-3 * m for m in lr_mults], rel=1e-6
    )
    assert [r["weight_decay"] for r in records] == pytest.approx(
        [0.05 * m for m in decay_mults]
    )
    assert [r["lr_rule"] for r in records] == [
        "layer 'backbone'", "layer 'backbone'", "layer 'backbone'", "layer 'backbone'",
        None, None, None, "'head/bias'",
    ]
    assert [r["decay_rule"] for r in records] == [None, "'*bias'"] * 4
    assert [r["layer"] for r in records] == ["b1", "b1", "b2", "b2", "neck", "neck", "head", "head"]
    assert {r["layer_class"] for r in records} == {"Dense"}
    assert {r["status"] for r in records} == {"trained"}
    assert [r["group"] for r in records] == ["backbone"] * 4 + ["default"] * 3 + ["head/bias"]
    json.dumps(records)  # JSON-ready

    # Building creates optimizer state: the summary must not have done it.
    assert not opt.built
    assert not opt.inner_optimizer.built


def test_effective_rates_are_the_rates_the_update_really_uses():
    """SGD without momentum moves each variable by exactly lr * gradient."""
    model, backbone = backbone_model()
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.SGD(0.1), lr_mult=[(backbone, 0.25), ("head/kernel", 3.0)]
    )
    opt.build(model)
    claimed = {r["path"]: r["learning_rate"] for r in layerlr.summary_records(model, opt)}
    before = {v.path: np.array(v.numpy()) for v in model.trainable_variables}
    grads = [keras.ops.ones(v.shape) for v in model.trainable_variables]
    opt.apply(grads, model.trainable_variables)
    for v in model.trainable_variables:
        moved = float(np.mean(before[v.path] - np.array(v.numpy())))
        assert moved == pytest.approx(claimed[v.path], rel=1e-5), v.path
    assert claimed["head/kernel"] == pytest.approx(0.3)
    assert claimed["backbone/b1/bias"] == pytest.approx(0.025)


def test_schedule_is_evaluated_at_the_current_step_after_fit():
    model, backbone = backbone_model()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=4, decay_rate=0.5)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(schedule), lr_mult={backbone: 0.1})
    model.compile(optimizer=opt, loss="mse")
    x, y = np.ones((32, 6), "float32"), np.zeros((32, 3), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # 8 steps
    base = 0.1 * 0.5 ** (8 / 4)
    records = layerlr.summary_records(model)
    rates = {r["path"]: r["learning_rate"] for r in records}
    assert rates["backbone/b1/kernel"] == pytest.approx(base * 0.1, rel=1e-5)
    assert rates["head/kernel"] == pytest.approx(base, rel=1e-5)
    assert records[0]["weight_decay"] is None  # SGD has no weight decay

    lines = []
    layerlr.summary(model, print_fn=lines.append, width=140)
    assert lines[0] == "LayerwiseOptimizer(SGD) at step 8"
    assert lines[1] == "base learning rate 0.025 (ExponentialDecay), no weight decay"
    # Without weight decay the decay columns are left out.
    assert "decay_mult" not in lines[2] and "WD now" not in lines[2]


def test_table_rows_footer_and_width():
    model, backbone = backbone_model()
    opt = adamw_with_rules(backbone)
    lines = []
    layerlr.summary(model, opt, width=160, print_fn=lines.append)
    text = "\n".join(lines)
    header = lines[2].split()
    assert header == [
        "Layer", "Variable", "Shape", "Params", "lr_mult", "decay_mult", "LR", "now", "WD",
        "now", "Rule",
    ]
    body = lines[4:12]
    for (path, _, params), line in zip(ROWS, body, strict=True):
        assert path in line and f" {params} " in line
    assert body[0].startswith("b1 (Dense)")
    assert body[1].startswith(" ")  # the layer is named once
    assert "lr: layer 'backbone'; decay: '*bias'" in body[1]
    assert body[4].rstrip().endswith("default")  # neck/kernel: no rule matched
    # Footer: parameters per (lr_mult, decay_mult), summed by hand.
    assert "  0.01, 1: 112 params in 2 variables, learning rate 1e-05" in lines
    assert "  0.01, 0: 16 params in 2 variables, learning rate 1e-05" in lines
    assert "  1, 1: 44 params in 2 variables, learning rate 0.001" in lines
    assert "  1, 0: 4 params in 1 variable, learning rate 0.001" in lines
    assert "  0, 0: 3 params in 1 variable, learning rate 0 (NOT UPDATED: lr_mult 0)" in lines
    assert "Trainable: 179 params in 8 variables." in lines
    assert "WARNING" not in text

    for width in (60, 80, 100):
        narrow = []
        layerlr.summary(model, opt, width=width, print_fn=narrow.append)
        table = narrow[2:14]
        assert max(len(line) for line in table) <= width
        # Paths keep their end (layer and variable names) when cut.
        assert any(re.search(r"\.\.\.\S*b1/kernel ", line) for line in table)
        assert all(path in "\n".join(table) for path in ("neck/kernel", "head/bias"))


def test_frozen_layers_stand_out_and_show_their_future_multiplier():
    model, backbone = backbone_model()
    backbone.trainable = False
    opt = adamw_with_rules(backbone)
    records = layerlr.summary_records(model, opt)
    frozen = [r for r in records if r["status"] == "frozen"]
    assert [r["path"] for r in frozen] == [p for p, _, _ in ROWS[:4]]
    assert {r["lr_mult"] for r in frozen} == {0.01}
    assert {r["learning_rate"] for r in frozen} == {None}
    lines = []
    layerlr.summary(model, opt, width=160, print_fn=lines.append)
    text = "\n".join(lines)
    assert "frozen" in lines[4] and "FROZEN (lr: layer 'backbone')" in lines[4]
    assert "FROZEN (trainable=False): 128 params in 2 layers (b1, b2); not trained." in lines
    assert "Trainable: 51 params in 4 variables." in lines
    assert "The lr_mult rule layer 'backbone' = 0.01 decides no trained variable" in text
    assert "selects only frozen variables" in text


def test_a_shadowed_rule_is_reported():
    model, _ = backbone_model()
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.Adam(), lr_mult=[("head", 2.0), (model.get_layer("head"), 3.0)]
    )
    lines = []
    layerlr.summary(model, opt, width=200, print_fn=lines.append)
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1  # only the shadowed rule
    assert "The lr_mult rule layer 'head' = 3 decides no trained variable" in warnings[0]
    assert "matched an earlier rule" in warnings[0]


def test_layers_unfrozen_after_build_show_what_training_will_give_them():
    model, backbone = backbone_model()
    backbone.trainable = False
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.Adam(), lr_mult=[(backbone, 0.1), ("head", 2.0)]
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(np.ones((4, 6)), np.zeros((4, 3)), verbose=0)
    assert len(opt.multipliers) == 4  # neck and head only
    backbone.trainable = True  # unfrozen after the optimizer was built
    records = layerlr.summary_records(model, opt)
    assert [r["status"] for r in records] == ["trained"] * 8
    assert [r["lr_mult"] for r in records] == [0.1] * 4 + [1.0, 1.0, 2.0, 2.0]
    lines = []
    layerlr.summary(model, opt, width=160, print_fn=lines.append)
    assert "4 trainable variable(s) are new to the optimizer" in " ".join(lines)
    # What training then really gives them (Keras picks up a change of
    # `trainable` when the train step is rebuilt).
    model.make_train_function(force=True)
    model.fit(np.ones((4, 6)), np.zeros((4, 3)), verbose=0)
    assert {p: m.lr_mult for p, m in opt.multipliers.items()} == {
        r["path"]: r["lr_mult"] for r in records
    }


def test_multiplier_schedules_show_their_value_at_the_current_step():
    model, backbone = backbone_model()
    warm = layerlr.schedules.FreezeThenWarmup(freeze_steps=4, warmup_steps=4, value=0.1)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={backbone: warm})
    opt.build(model)
    records = layerlr.summary_records(model, opt)
    assert records[0]["lr_mult"] == 0.0 and records[0]["learning_rate"] == 0.0
    assert records[0]["lr_mult_schedule"] == (
        "FreezeThenWarmup(freeze_steps=4, warmup_steps=4, value=0.1)"
    )
    assert records[6]["lr_mult_schedule"] is None
    lines = []
    layerlr.summary(model, opt, width=160, print_fn=lines.append)
    assert "  0*: 128 params in 4 variables, learning rate 0 (NOT UPDATED: lr_mult 0 now)" in lines
    assert "* scheduled multiplier, its value at step 0:" in lines
    assert (
        "  layer 'backbone': FreezeThenWarmup(freeze_steps=4, warmup_steps=4, value=0.1)" in lines
    )

    zeros = [keras.ops.zeros(v.shape) for v in model.trainable_variables]
    for _ in range(6):
        opt.apply(zeros, model.trainable_variables)
    # Step 6: two steps into the ramp, (6 - 4 + 1) / 4 of 0.1.
    claimed = {r["path"]: r for r in layerlr.summary_records(model, opt)}
    assert claimed["backbone/b1/kernel"]["lr_mult"] == pytest.approx(0.075)
    assert claimed["backbone/b1/kernel"]["learning_rate"] == pytest.approx(0.0075)
    # The update the step really makes: SGD moves by lr * gradient.
    before = {v.path: np.array(v.numpy()) for v in model.trainable_variables}
    opt.apply([keras.ops.ones(v.shape) for v in model.trainable_variables], model.trainable_variables)
    for v in model.trainable_variables:
        moved = float(np.mean(before[v.path] - np.array(v.numpy())))
        assert moved == pytest.approx(claimed[v.path]["learning_rate"], rel=1e-5), v.path


def test_after_load_model(tmp_path):
    model, backbone = backbone_model()
    opt = adamw_with_rules(backbone)
    model.compile(optimizer=opt, loss="mse")
    model.fit(np.ones((8, 6)), np.zeros((8, 3)), batch_size=4, verbose=0)
    before = layerlr.summary_records(model)
    path = tmp_path / "net.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    after = layerlr.summary_records(loaded)
    # load_model drops the outer-model prefix of nested paths (a Keras trait).
    assert [r.pop("path") for r in after] == [p.removeprefix("backbone/") for p, _, _ in ROWS]
    assert after == [{k: v for k, v in r.items() if k != "path"} for r in before]
    assert [r["lr_mult"] for r in after] == [0.01] * 4 + [1.0] * 3 + [0.0]
    assert [r["learning_rate"] for r in after] == pytest.approx(
        [1e-5] * 4 + [1e-3] * 3 + [0.0], rel=1e-6
    )


def test_loss_scale_optimizer_is_looked_through():
    model, backbone = backbone_model()
    inner = adamw_with_rules(backbone)
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(inner), loss="mse")
    records = layerlr.summary_records(model)
    assert [r["lr_mult"] for r in records][:2] == [0.01, 0.01]


def test_method_form_without_a_model_uses_the_built_optimizer():
    model, backbone = backbone_model()
    opt = adamw_with_rules(backbone)
    with pytest.raises(ValueError, match="not built yet.*pass the model"):
        print_summary(opt)
    opt.build(model)
    lines = []
    print_summary(opt, print_fn=lines.append, width=160)
    rows = lines[4:12]
    for (path, _, _), line in zip(ROWS, rows, strict=True):
        assert path in line
    assert rows[0].startswith("b1 ")


def test_clear_errors():
    model, _ = backbone_model()
    with pytest.raises(ValueError, match="has no optimizer.*Compile it with a LayerwiseOptimizer"):
        layerlr.summary(model)
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    with pytest.raises(ValueError, match="plain Adam, not a LayerwiseOptimizer"):
        layerlr.summary(model)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam())
    with pytest.raises(TypeError, match="optimizer where the model goes"):
        layerlr.summary(opt, model)
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="has no weights yet"):
        layerlr.summary(unbuilt, opt)
    # A rule that selects nothing fails here as it would at build time.
    bad = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), lr_mult={"hed": 2.0})
    with pytest.raises(ValueError, match="matches none.*Closest paths: 'head'"):
        layerlr.summary(model, bad)


def test_depth_order_expands_nested_models():
    model, _ = backbone_model()
    assert [layer.name for layer in layers_in_depth_order(model)] == [
        "x", "b1", "b2", "neck", "head"
    ]


# --- LearningRateLogger ----------------------------------------------------------------


def logged_fit(callbacks, epochs=3):
    model, backbone = backbone_model()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=4, decay_rate=0.5)
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.SGD(schedule), lr_mult=[(backbone, 0.1), ("*bias", 0.5)]
    )
    model.compile(optimizer=opt, loss="mse")
    x, y = np.ones((8, 6), "float32"), np.zeros((8, 3), "float32")
    return model.fit(x, y, batch_size=4, epochs=epochs, verbose=0, callbacks=callbacks)


def expected_rates(epochs=3, steps_per_epoch=2):
    base = [0.1 * 0.5 ** ((e + 1) * steps_per_epoch / 4) for e in range(epochs)]
    return {
        "learning_rate/backbone": [b * 0.1 for b in base],
        "learning_rate/default": base,
        "learning_rate/bias": [b * 0.5 for b in base],
    }


def test_logger_writes_each_group_rate_into_history():
    history = logged_fit([LearningRateLogger()])
    logged = {k: v for k, v in history.history.items() if k.startswith("learning_rate/")}
    expected = expected_rates()
    assert set(logged) == set(expected)
    for key, values in expected.items():
        assert logged[key] == pytest.approx(values, rel=1e-5), key


def test_logger_needs_a_layerwise_optimizer():
    model, _ = backbone_model()
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="plain Adam"):
        model.fit(np.ones((4, 6)), np.zeros((4, 3)), verbose=0, callbacks=[LearningRateLogger()])
    with pytest.raises(TypeError, match="prefix must be a string"):
        LearningRateLogger(prefix=3)


def read_scalars(log_dir):
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorboard")
    scalars = {}
    for path in glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor)))
                )
    return scalars


@pytest.mark.parametrize("logger_first", [True, False])
def test_logger_writes_tensorboard_scalars_in_either_order(tmp_path, logger_first):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tensorboard")
    tensorboard = keras.callbacks.TensorBoard(log_dir=str(tmp_path), write_graph=False)
    logger = LearningRateLogger()
    logged_fit([logger, tensorboard] if logger_first else [tensorboard, logger])
    scalars = read_scalars(str(tmp_path))
    for key, values in expected_rates().items():
        points = sorted(scalars[f"epoch_{key}"])
        # One point per epoch: never written twice.
        assert [step for step, _ in points] == [0, 1, 2], key
        assert [v for _, v in points] == pytest.approx(values, rel=1e-5), key


def test_two_predicate_rules_are_two_groups_with_their_own_rates(tmp_path):
    """Two lambdas print alike ('predicate <lambda>'); they are still two rules.

    Each group must be logged with its own rate, under distinct keys that stay
    the same across fits and across save / load_model.
    """
    model, backbone = backbone_model()
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.SGD(0.1),
        lr_mult=[
            (lambda v: v.path.startswith("backbone/"), 0.01),
            (lambda v: v.path.startswith("neck/"), 0.5),
        ],
    )
    model.compile(optimizer=opt, loss="mse")
    x, y = np.ones((8, 6), "float32"), np.zeros((8, 3), "float32")
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[LearningRateLogger()])
    first, second = (
        "test_two_predicate_rules_are_two_groups_with_their_own_rates.lambda",
        "test_two_predicate_rules_are_two_groups_with_their_own_rates.lambda_2",
    )
    logged = {k: v for k, v in history.history.items() if k.startswith("learning_rate/")}
    assert logged == {
        f"learning_rate/{first}": pytest.approx([F32(0.1) * 0.01] * 2, rel=1e-6),
        f"learning_rate/{second}": pytest.approx([F32(0.1) * 0.5] * 2, rel=1e-6),
        "learning_rate/default": pytest.approx([F32(0.1)] * 2, rel=1e-6),
    }
    records = layerlr.summary_records(model)
    assert [r["group"] for r in records] == [first] * 4 + [second] * 2 + ["default"] * 2
    # The plot's bars and legend follow the same groups.
    pytest.importorskip("matplotlib")
    from layerlr import plot as layerlr_plot

    legend = [t.get_text() for t in layerlr_plot.learning_rates(model).axes[0].get_legend().get_texts()]
    assert legend == [f"{first} (x0.01)", f"{second} (x0.5)", "default (x1)"]
    # Same keys after load_model, where the lambdas come back as descriptions.
    path = tmp_path / "net.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [r["group"] for r in layerlr.summary_records(loaded)] == [r["group"] for r in records]
    again = loaded.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[LearningRateLogger()])
    assert {k: v for k, v in again.history.items() if k.startswith("learning_rate/")} == {
        k: pytest.approx(v[-1:], rel=1e-6) for k, v in logged.items()
    }


@pytest.mark.parametrize("reducer_first", [True, False])
def test_logger_agrees_with_keras_learning_rate_column_under_reduce_lr_on_plateau(reducer_first):
    model, backbone = backbone_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={backbone: 0.1})
    model.compile(optimizer=opt, loss="mse")
    # mode="max" on a falling loss: no improvement after epoch 1, so the rate
    # halves at the end of every later epoch.
    reducer = keras.callbacks.ReduceLROnPlateau(monitor="loss", mode="max", factor=0.5, patience=0)
    logger = LearningRateLogger()
    x, y = np.ones((8, 6), "float32"), np.zeros((8, 3), "float32")
    history = model.fit(x, y, batch_size=4, epochs=4, verbose=0,
                        callbacks=[reducer, logger] if reducer_first else [logger, reducer])
    keras_column = history.history["learning_rate"]
    # The rate really changed: the rate used in epoch e, as Keras logs it.
    assert keras_column == pytest.approx([0.1, 0.1, 0.05, 0.025], rel=1e-6)
    assert history.history["learning_rate/default"] == pytest.approx(keras_column, rel=1e-6)
    assert history.history["learning_rate/backbone"] == pytest.approx(
        [0.1 * r for r in keras_column], rel=1e-6
    )
