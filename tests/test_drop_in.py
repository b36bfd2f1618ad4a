"""Swapping ``Adam(...)`` for ``LayerwiseOptimizer(Adam(...))`` changes nothing else.

Every exported optimizer class reloads; attributes read as on the wrapped
optimizer; names stay unique; ``variables``, ``set_weights`` and weight files
are interchangeable with the plain optimizer's, both ways. Numerical claims are
checked against plain Keras optimizers, never against our own output.
"""

import inspect
import os
import warnings

import numpy as np
import pytest
import keras

import layerlr
from conftest import BACKEND, only_on
from helpers import data, max_abs_diff


@keras.saving.register_keras_serializable(package="layerlr_tests")
class MomentumSGD(keras.optimizers.SGD):
    """A registered user subclass with a hyperparameter of its own."""

    def __init__(self, boost=1.0, **kwargs):
        super().__init__(**kwargs)
        self.boost = boost

    def get_config(self):
        return {**super().get_config(), "boost": self.boost}


def exported_optimizer_classes():
    """Every concrete optimizer class `keras.optimizers` exports."""
    wrappers = (keras.optimizers.LossScaleOptimizer, keras.optimizers.MultiOptimizer)
    return sorted(
        (
            cls
            for _, cls in inspect.getmembers(keras.optimizers, inspect.isclass)
            if issubclass(cls, keras.optimizers.Optimizer)
            and cls is not keras.optimizers.Optimizer
            and not issubclass(cls, wrappers)
        ),
        key=lambda c: c.__name__,
    )


CLASSES = exported_optimizer_classes() + [MomentumSGD]


def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="tanh", name="d1"),
         keras.layers.Dense(3, name="head")],
        name="net",
    )


def fit(model, epochs=1):
    x, y = data(n=32)
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)


def test_the_class_list_is_complete():
    # Guards the parametrization below: a new Keras optimizer must show up.
    names = {c.__name__ for c in CLASSES}
    assert {"Adam", "AdamW", "SGD", "Lamb", "Muon", "Nadam", "Lion", "Ftrl",
            "ScheduleFreeAdamW", "MomentumSGD"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_optimizer_class_round_trips_through_its_config(cls):
    inner = cls(learning_rate=0.02)
    opt = layerlr.LayerwiseOptimizer(inner, lr_mult={"head": 0.5})
    config = keras.saving.serialize_keras_object(opt)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is layerlr.LayerwiseOptimizer
    assert type(restored.inner_optimizer).__name__ == type(inner).__name__
    assert restored.inner_optimizer.get_config() == inner.get_config()
    direct = layerlr.LayerwiseOptimizer.from_config(opt.get_config())
    assert direct.inner_optimizer.get_config() == inner.get_config()


def test_every_optimizer_class_reloads_with_the_model(tmp_path):
    x, y = data(n=8)
    for cls in CLASSES:
        model = small_model()
        model.compile(optimizer=layerlr.LayerwiseOptimizer(cls(learning_rate=0.02), lr_mult={"head": 0.5}),
                      loss="mse")
        model.train_on_batch(x, y)  # state worth restoring
        path = str(tmp_path / f"{cls.__name__}.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        opt = loaded.optimizer
        assert type(opt) is layerlr.LayerwiseOptimizer, cls
        assert type(opt.inner_optimizer).__name__ == cls.__name__
        assert opt.inner_optimizer.get_config() == model.optimizer.inner_optimizer.get_config()
        assert opt.multipliers["head/kernel"].lr_mult == 0.5
        assert len(opt.variables) == len(model.optimizer.variables)
        for a, b in zip(model.optimizer.variables, opt.variables):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=cls.__name__)


def test_an_inner_optimizer_that_cannot_be_restored_is_a_clear_error():
    config = layerlr.LayerwiseOptimizer(keras.optimizers.SGD()).get_config()
    config["optimizer"] = {"module": "nowhere", "class_name": "NoSuchOptimizer",
                           "config": {}, "registered_name": "NoSuchOptimizer"}
    with pytest.raises(TypeError, match="Could not locate class 'NoSuchOptimizer'"):  # Keras' own
        layerlr.LayerwiseOptimizer.from_config(config)
    config["optimizer"] = keras.saving.serialize_keras_object(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="wraps an optimizer that cannot be restored: 'Dense'"):
        layerlr.LayerwiseOptimizer.from_config(config)


# --- attributes read through --------------------------------------------------

READ_THROUGH = [
    dict(weight_decay=0.01),
    dict(clipnorm=0.5),
    dict(clipvalue=0.25),
    dict(global_clipnorm=2.0),
    dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3),
    dict(gradient_accumulation_steps=2),
]


@pytest.mark.parametrize("settings", READ_THROUGH, ids=lambda s: next(iter(s)))
def test_base_optimizer_attributes_read_as_on_the_inner_optimizer(settings):
    plain = keras.optimizers.SGD(0.1, momentum=0.9, **settings)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1, momentum=0.9, **settings))
    for name in ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
                 "ema_momentum", "ema_overwrite_frequency", "gradient_accumulation_steps",
                 "loss_scale_factor", "momentum", "nesterov"):
        assert getattr(opt, name) == getattr(plain, name), name
    # The wrapper creates no EMA or accumulator state of its own on build.
    model = small_model()
    opt.build(model.trainable_variables)
    plain.build(model.trainable_variables)
    assert [v.path.split("/")[-1] for v in opt.variables] == [
        v.path.split("/")[-1] for v in plain.variables]


def test_setting_an_attribute_on_the_wrapper_sets_it_on_the_inner_optimizer():
    inner = keras.optimizers.Adam(0.1, beta_1=0.8)
    opt = layerlr.LayerwiseOptimizer(inner)
    opt.clipnorm = 1.5
    opt.use_ema = False
    opt.beta_1 = 0.7
    opt.learning_rate = 0.05
    assert (inner.clipnorm, inner.beta_1) == (1.5, 0.7)
    assert float(inner.learning_rate) == pytest.approx(0.05)
    assert opt.beta_1 == 0.7 and "beta_1" not in vars(opt)
    with pytest.raises(AttributeError, match="no_such_thing"):
        opt.no_such_thing


# --- names ---------------------------------------------------------------------


def test_the_name_follows_the_inner_optimizer_unless_given():
    inner = keras.optimizers.SGD(name="backbone_sgd")
    assert layerlr.LayerwiseOptimizer(inner).name == "backbone_sgd"
    assert layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), name="mine").name == "mine"
    auto_a, auto_b = keras.optimizers.SGD(), keras.optimizers.SGD()
    assert layerlr.LayerwiseOptimizer(auto_a).name == auto_a.name != auto_b.name


def two_group_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def multi(wrap, **ema):
    def sgd(lr):
        inner = keras.optimizers.SGD(lr, **ema)
        return layerlr.LayerwiseOptimizer(inner) if wrap else inner

    return keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(sgd(0.1), {"head/.*": sgd(0.01)}))


@only_on("tensorflow")  # TensorBoard's summary writer needs TensorFlow
def test_tensorboard_logs_every_learning_rate_as_for_plain_optimizers(tmp_path):
    pytest.importorskip("tensorboard")
    import tensorflow as tf

    def tags(wrap):
        log_dir = str(tmp_path / ("wrapped" if wrap else "plain"))
        model = two_group_model()
        model.compile(optimizer=multi(wrap), loss="mse")
        x, y = data(n=16)
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[keras.callbacks.TensorBoard(log_dir, write_graph=False)])
        found = {}
        train = os.path.join(log_dir, "train")
        for name in os.listdir(train):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(train, name)):
                for value in event.summary.value:
                    if "learning_rate" in value.tag:
                        found[value.tag] = float(tf.make_ndarray(value.tensor))
        return found

    # Optimizer auto-names count up per process; compare the rates and shapes.
    plain, wrapped = tags(False), tags(True)
    assert len(plain) == 2
    assert len(wrapped) == 2
    assert sorted(wrapped.values()) == pytest.approx(sorted(plain.values()))
    assert all(tag.startswith("epoch_learning_rate_sgd") for tag in wrapped)


# --- EMA ------------------------------------------------------------------------


def test_swap_ema_weights_with_a_wrapped_sub_optimizer_matches_plain_keras():
    def run(wrap):
        model = two_group_model()
        model.compile(optimizer=multi(wrap, use_ema=True, ema_momentum=0.5), loss="mse")
        x, y = data(n=16)
        history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, validation_data=(x, y),
                            callbacks=[keras.callbacks.SwapEMAWeights(swap_on_epoch=True)])
        return model, history.history["val_loss"]

    wrapped, wrapped_val = run(True)
    plain, plain_val = run(False)
    assert max_abs_diff(wrapped, plain) < 1e-6
    np.testing.assert_allclose(wrapped_val, plain_val, rtol=1e-6)


# --- optimizer variables and weight files ---------------------------------------


def test_variables_are_exactly_the_inner_optimizers():
    inner = keras.optimizers.Adam(0.01)
    opt = layerlr.LayerwiseOptimizer(inner, lr_mult={"head": 0.1})
    # Before build: the iteration and learning rate, as for a plain optimizer.
    assert [id(v) for v in opt.variables] == [id(v) for v in inner.variables]
    assert len(opt.variables) == 2
    model = small_model()
    model.compile(optimizer=opt, loss="mse")
    fit(model)
    plain = keras.optimizers.Adam(0.01)
    plain.build(model.trainable_variables)
    assert [id(v) for v in opt.variables] == [id(v) for v in inner.variables]
    assert len(opt.variables) == len(plain.variables)
    assert opt.variables[0] is inner._iterations
    assert int(opt.variables[0].numpy()) == 4 == int(opt.iterations)
    assert opt._iterations is inner._iterations


def test_set_weights_takes_a_plain_optimizers_weights_and_back():
    model = small_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    fit(model)
    plain_weights = [np.array(v) for v in model.optimizer.variables]

    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01), lr_mult={"head": 0.1})
    opt.build(model.trainable_variables)
    opt.set_weights(plain_weights)
    for a, b in zip(plain_weights, opt.variables):
        np.testing.assert_array_equal(a, np.asarray(b))

    back = keras.optimizers.Adam(0.01)
    back.build(model.trainable_variables)
    back.set_weights([np.array(v) for v in opt.variables])
    assert int(back.iterations) == 4


def _resumes_identically(tmp_path, save_with, load_into, suffix, load):
    """Train `save_with` 1 epoch, save, load into `load_into`, 1 more epoch each."""
    x, y = data(n=32)
    source, target = small_model(), small_model()
    source.compile(optimizer=save_with(), loss="mse")
    target.compile(optimizer=load_into(), loss="mse")
    fit(source)
    path = str(tmp_path / f"state{suffix}")
    if suffix == ".keras":
        source.save(path)
    else:
        source.save_weights(path)
    target.optimizer.build(target.trainable_variables)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(target, path)
    # Keras only warns ("Skipping variable loading") when the state does not fit.
    assert not [w for w in caught if "optimizer" in str(w.message).lower()]
    for a, b in zip(source.optimizer.variables, target.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fit(source)
    fit(target)
    assert max_abs_diff(source, target) == 0.0
    return source, target


PLAIN = lambda: keras.optimizers.Adam(0.01, weight_decay=0.01)  # noqa: E731
WRAPPED = lambda: layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01, weight_decay=0.01))  # noqa: E731


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
@pytest.mark.parametrize("direction", ["plain_to_wrapped", "wrapped_to_plain"])
def test_weight_files_are_interchangeable_with_the_plain_optimizers(tmp_path, suffix, direction):
    save_with, load_into = (PLAIN, WRAPPED) if direction == "plain_to_wrapped" else (WRAPPED, PLAIN)
    _resumes_identically(tmp_path, save_with, load_into, suffix, lambda m, p: m.load_weights(p))


def test_a_plain_models_keras_file_resumes_under_rules_as_separate_optimizers_would(tmp_path):
    # Plain state + rules: continues like Keras' MultiOptimizer loaded with the
    # same plain state split per group (an independent reference).
    x, y = data(n=32)
    source = small_model()
    source.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    fit(source)
    path = str(tmp_path / "plain.weights.h5")
    source.save_weights(path)
    momenta = [np.array(v) for v in source.optimizer.variables[2:]]

    target = small_model()
    target.compile(optimizer=layerlr.LayerwiseOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9), lr_mult={"head": 0.5}), loss="mse")
    target.optimizer.build(target.trainable_variables)
    target.load_weights(path)

    reference = small_model()
    head, body = keras.optimizers.SGD(0.05, momentum=0.9), keras.optimizers.SGD(0.1, momentum=0.9)
    reference.compile(optimizer=keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(body, {".*head/.*": head})), loss="mse")
    reference.set_weights(source.get_weights())
    reference.optimizer.build(reference.trainable_variables)
    body.set_weights([np.array(4), np.float32(0.1), *momenta[:2]])
    head.set_weights([np.array(4), np.float32(0.05), *momenta[2:]])
    fit(target)
    fit(reference)
    assert max_abs_diff(target, reference) < 1e-6


@only_on("tensorflow")
def test_tf_checkpoint_of_a_wrapped_optimizer_has_no_stale_state(tmp_path):
    import tensorflow as tf

    model = small_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01))
    model.compile(optimizer=opt, loss="mse")
    fit(model)
    prefix = tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / "ckpt"))
    keys = [name for name, _ in tf.train.list_variables(prefix)]
    # Only the inner optimizer's state, no second (always-zero) step counter.
    assert not any("learning_rate" in k and "inner_optimizer" not in k for k in keys), keys
    counters = {tuple(tf.train.load_variable(prefix, k).shape) for k in keys if "iteration" in k}
    assert counters == {()}
    assert all(tf.train.load_variable(prefix, k) == 4 for k in keys if "iteration" in k)


# --- the public behaviour behind allow-listed Keras tests -----------------------
# (tests/keras_suite/allowlist.py: Keras tests that read private attributes,
# isinstance or class names of the optimizer they are given)


def test_identifiers_give_the_optimizer_keras_gives():
    for identifier in ("sgd", "adamw", {"class_name": "adam", "config": {"weight_decay": 0.05}}):
        opt = layerlr.LayerwiseOptimizer(identifier)
        plain = keras.optimizers.get(identifier)
        assert type(opt.inner_optimizer) is type(plain)
        config, expected = opt.inner_optimizer.get_config(), plain.get_config()
        config.pop("name"), expected.pop("name")
        assert config == expected


def test_multi_optimizer_of_wrapped_optimizers_round_trips():
    opt_map = keras.optimizers.OptimizerMap(
        default_optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.RMSprop(1e-4)))
    opt_map["^dense_1/.*"] = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={"*": 0.5})
    opt_map["^dense_2/.*"] = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(1e-2))
    multi = keras.optimizers.MultiOptimizer(opt_map)
    variables = []
    for scope in ("dense_1", "dense_2", "other"):
        with keras.name_scope(scope):
            variables.append(keras.Variable([[1.0]], name="kernel"))
    multi.build(variables)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(multi))
    restored.build(variables)
    assert [type(o).__name__ for o in restored.optimizers] == ["LayerwiseOptimizer"] * 3
    assert [type(o.inner_optimizer).__name__ for o in restored.optimizers] == ["Adam", "SGD", "RMSprop"]
    assert restored.optimizers[0].multipliers["dense_1/kernel"].lr_mult == 0.5
    for a, b in zip(multi.optimizers, restored.optimizers):
        assert a.inner_optimizer.get_config() == b.inner_optimizer.get_config()


def test_gradient_accumulation_matches_plain_keras_step_by_step():
    # Keras' own test reads `_accumulated_gradients`; those are in `variables`.
    def make(wrap):
        v = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
        overwritten = keras.Variable([[1.0, 2.0], [3.0, 4.0]])
        overwritten.overwrite_with_gradient = True
        opt = keras.optimizers.SGD(learning_rate=1.0, momentum=0.5, gradient_accumulation_steps=3)
        return (layerlr.LayerwiseOptimizer(opt) if wrap else opt), [v, overwritten]

    (opt, variables), (plain, plain_variables) = make(True), make(False)
    rng = np.random.default_rng(0)
    for step in range(4):
        grads = [rng.normal(size=(2, 2)).astype("float32") for _ in variables]
        opt.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        plain.apply([keras.ops.convert_to_tensor(g) for g in grads], plain_variables)
        assert int(opt.iterations) == int(plain.iterations) == (step + 1) // 3
        for a, b in zip(variables + opt.variables, plain_variables + plain.variables):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"step {step}")
    assert len(opt.variables) == len(plain.variables) > 2  # momenta and accumulators included


def test_building_on_no_variables_gives_the_plain_optimizers_state():
    opt, plain = layerlr.LayerwiseOptimizer(keras.optimizers.Nadam()), keras.optimizers.Nadam()
    opt.build([])
    plain.build([])
    described = lambda o: [(str(v.dtype), float(np.asarray(v))) for v in o.variables]  # noqa: E731
    assert described(opt) == described(plain)
    assert len(opt.variables) == 3  # iteration, learning rate and the u_product (floatx, 1.0)
    assert described(opt)[2] == (keras.config.floatx(), 1.0)


SPARSE_CASES = {  # a sparse model update, dense updates, decay, sparse slots
    "sgd": (keras.optimizers.SGD, {}),
    "adam": (keras.optimizers.Adam, {}),
    "adamw": (keras.optimizers.AdamW, {}),
    "adagrad": (keras.optimizers.Adagrad, {}),
}


def _sparse_gradient(shape):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.IndexedSlices(0.5 * keras.ops.ones((3,) + shape[1:]), (0, 2, 4), shape)
    import jax.experimental.sparse as jax_sparse

    return jax_sparse.BCOO((0.5 * keras.ops.ones((3,) + shape[1:]), ((0,), (2,), (4,))), shape=shape)


def _sparse_writes(optimizer, writer):
    """Which state the optimizer writes sparsely (Keras' sparse test, on `writer`)."""
    from unittest import mock

    variable = keras.Variable(initializer="ones", shape=(5, 10))
    optimizer.build([variable])
    grad = _sparse_gradient((5, 10))
    sparse_class = type(grad) if BACKEND == "tensorflow" else __import__(
        "jax.experimental.sparse", fromlist=["JAXSparse"]).JAXSparse
    variable_class = type(variable.value) if BACKEND == "tensorflow" else type(variable)
    found = {"model": False, "optimizer": False, "direct": False}

    def optimizer_assign(target, value):
        target = getattr(target, "_value", target)
        if isinstance(value, sparse_class):
            if target is variable._value:
                found["model"] = True
            elif any(target is v._value for v in optimizer.variables):
                found["optimizer"] = True

    def variable_assign(target, value):
        if len(target.shape):
            found["direct"] = True

    patches = [mock.patch.object(writer, name, autospec=True, side_effect=optimizer_assign)
               for name in ("assign", "assign_add", "assign_sub")]
    patches += [mock.patch.object(variable_class, name, autospec=True, side_effect=variable_assign)
                for name in ("assign", "assign_add", "assign_sub")]
    patches.append(mock.patch.object(writer, "_apply_weight_decay", autospec=True))
    for p in patches:
        p.start()
    try:
        optimizer.apply([grad], [variable])
    finally:
        for p in reversed(patches):
            p.stop()
    return found


@only_on("tensorflow", "jax")  # Keras has no sparse gradients on torch
@pytest.mark.parametrize("name", sorted(SPARSE_CASES))
def test_sparse_gradients_give_the_same_updates_as_plain_keras(name):
    cls, kwargs = SPARSE_CASES[name]
    decays = cls is keras.optimizers.AdamW
    wrapped = layerlr.LayerwiseOptimizer(cls(**kwargs), lr_mult={"*": 0.5},
                                         decay_mult={"*": 0.5} if decays else None)
    plain = cls(**kwargs)
    # Through the wrapper, the optimizer that writes is the inner one.
    writes = _sparse_writes(wrapped, wrapped.inner_optimizer)
    assert writes == _sparse_writes(plain, plain)
    assert not writes["direct"]

    # And the values: a sparse gradient gives what the dense one gives.
    results = []
    for grad in (_sparse_gradient((5, 3)), None):
        opt = layerlr.LayerwiseOptimizer(cls(**kwargs), lr_mult={"*": 0.5})
        variable = keras.Variable(initializer="ones", shape=(5, 3))
        dense = keras.ops.convert_to_tensor(_sparse_gradient((5, 3)), sparse=False)
        for _ in range(2):
            opt.apply([grad if grad is not None else dense], [variable])
        results.append(np.asarray(variable))
    reference = keras.Variable(initializer="ones", shape=(5, 3))
    ref_opt = cls(**{**kwargs, "learning_rate": float(cls(**kwargs).learning_rate) * 0.5})
    for _ in range(2):
        ref_opt.apply([keras.ops.convert_to_tensor(_sparse_gradient((5, 3)), sparse=False)], [reference])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(results[0], np.asarray(reference), rtol=1e-6, atol=1e-7)
