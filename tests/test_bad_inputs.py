"""The bad-input matrix (docs/errors.md): the rows not already tested elsewhere.

Rows covered by tests/test_rules.py and tests/test_wrapper_errors.py are listed
in the doc with those tests and are not repeated here. Each test checks the
error type, the parts of the message that say what was wrong and how to fix
it, and that nothing changed. Tests marked xfail(strict=True) pin the
behaviour we want where the core does not have it yet (see the doc).
"""

import re
import warnings

import numpy as np
import pytest
import keras

import layerlr
from conftest import BACKEND
from helpers import data, make_model


def two_layer_model(name="m"):
    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, name="d1")(inputs)
    outputs = keras.layers.Dense(2, name="head")(h)
    return keras.Model(inputs, outputs, name=name)


def shared_layer_model():
    """`shared` is called inside block_a and again inside block_b."""
    shared = keras.layers.Dense(4, name="shared")
    block_a = keras.Sequential([keras.Input((4,)), shared, keras.layers.Dense(4, name="a1")],
                               name="block_a")
    block_b = keras.Sequential([keras.Input((4,)), shared, keras.layers.Dense(4, name="b1")],
                               name="block_b")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, block_b(block_a(inputs)), name="outer")
    return model, block_a, block_b, shared


def lr_of(opt):
    return {path: m.lr_mult for path, m in opt.multipliers.items()}


def assert_untouched(opt):
    """A refused build created no state and can be retried."""
    assert not opt.built
    assert not opt.inner_optimizer.built


# --- wrapping --------------------------------------------------------------------


def test_unknown_optimizer_name_is_refused_by_keras():
    with pytest.raises(ValueError, match="Could not interpret optimizer identifier: adamm"):
        layerlr.LayerwiseOptimizer("adamm")


# --- rule specs and values ----------------------------------------------------------


def test_variable_as_dict_key_is_a_python_type_error_and_the_list_form_works():
    model = two_layer_model()
    kernel = model.get_layer("d1").kernel
    with pytest.raises(TypeError, match="unhashable type"):
        layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={kernel: 0.1})
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult=[(kernel, 0.1)])
    opt.build(model)
    assert lr_of(opt) == {"d1/kernel": 0.1, "d1/bias": 1.0, "head/kernel": 1.0, "head/bias": 1.0}


def test_a_set_of_rules_is_refused_because_it_has_no_order():
    inner = keras.optimizers.SGD()
    with pytest.raises(TypeError, match=r"lr_mult must be ordered.*got a set.*list of \(selector, multiplier\) pairs"):
        layerlr.LayerwiseOptimizer(inner, lr_mult={("d1", 0.1), ("*", 2.0)})
    assert layerlr.LayerwiseOptimizer(inner).inner_optimizer is inner


@pytest.mark.parametrize("bad", [np.float64(-1.0), np.float32("nan"), float("inf"), -1e-12],
                         ids=["negative", "nan", "inf", "tiny_negative"])
def test_bad_decay_values_name_the_rule(bad):
    inner = keras.optimizers.AdamW()
    with pytest.raises(ValueError, match=r"decay_mult for '\*bias' must be a finite number >= 0, got"):
        layerlr.LayerwiseOptimizer(inner, decay_mult=[("*bias", bad)])
    assert layerlr.LayerwiseOptimizer(inner).inner_optimizer is inner


@pytest.mark.parametrize("make", [lambda: np.array(0.5), lambda: keras.ops.convert_to_tensor(0.5)],
                         ids=["ndarray", "tensor"])
def test_arrays_and_tensors_are_not_multipliers(make):
    with pytest.raises(TypeError, match=r"lr_mult for 'd1' must be a finite number >= 0.*got .* of type"):
        layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={"d1": make()})


def test_numpy_scalars_are_multipliers():
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={"d1": np.float32(0.5)})
    opt.build(two_layer_model())
    assert opt.multipliers["d1/kernel"].lr_mult == 0.5
    assert type(opt.multipliers["d1/kernel"].lr_mult) is float


def test_an_optimizer_is_not_a_selector():
    with pytest.raises(TypeError, match="An optimizer is not a selector"):
        layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult=[(keras.optimizers.Adam(), 0.1)])


# --- resolution -------------------------------------------------------------------------


def test_rule_selecting_only_a_frozen_layer_by_path():
    model = two_layer_model()
    model.get_layer("d1").trainable = False
    # Built from a bare variable list, the frozen layer is invisible: an error...
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={"d1": 0.1})
    with pytest.raises(ValueError) as info:
        opt.build(model.trainable_variables)
    message = str(info.value)
    assert "The lr_mult rule 'd1' matches none of the 2 trainable variables" in message
    assert "optimizer.build(model)" in message and "layer object" in message
    assert_untouched(opt)
    # ... built from the model, as model.fit does, it is not.
    opt.build(model)
    assert lr_of(opt) == {"head/kernel": 1.0, "head/bias": 1.0}


def test_duplicate_path_rule_warns_and_the_first_wins():
    """(A more specific rule after a broader one: tests/test_rules.py.)"""
    model = two_layer_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult=[("d1", 0.1), ("head", 2.0), ("d1", 3.0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.build(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    assert "the lr_mult rule 'd1' never applies" in messages[0]
    assert "taken by the earlier rule 'd1' (first match wins)" in messages[0]
    assert lr_of(opt) == {"d1/kernel": 0.1, "d1/bias": 0.1, "head/kernel": 2.0, "head/bias": 2.0}


def test_duplicate_layer_rule_is_silent_and_first_wins():
    model = two_layer_model()
    d1 = model.get_layer("d1")
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult=[(d1, 0.1), (d1, 3.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.build(model)
    assert lr_of(opt)["d1/kernel"] == 0.1


@pytest.mark.parametrize("pattern", ["d1.*", "^head$", r"d\d/kernel"])
def test_regex_written_as_a_glob_string_says_to_use_re_compile(pattern):
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={pattern: 0.1})
    with pytest.raises(ValueError) as info:
        opt.build(two_layer_model())
    message = str(info.value)
    assert f"The lr_mult rule {pattern!r} matches none" in message
    assert "not regular expressions" in message and "re.compile(" in message
    assert_untouched(opt)


def test_unbuilt_model_says_to_build_it():
    model = keras.Sequential([keras.layers.Dense(3, name="d")])
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={"d": 0.1})
    with pytest.raises(ValueError) as info:
        opt.build(model)
    message = str(info.value)
    assert "The lr_mult rule 'd'" in message
    assert "no trainable variables" in message and "model.build(" in message
    assert_untouched(opt)


def test_unbuilt_model_is_fine_through_fit():
    """The usual path: fit builds the model, then the optimizer."""
    model = keras.Sequential([keras.layers.Dense(3, name="d")], name="seq")
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={"d": 0.1})
    model.compile(optimizer=opt, loss="mse")
    model.fit(np.ones((4, 4), "float32"), np.ones((4, 3), "float32"), verbose=0)
    assert lr_of(opt) == {"seq/d/kernel": 0.1, "seq/d/bias": 0.1}


def test_shared_layer_reached_through_its_second_use_by_path():
    """A shared layer's variables have one path: where the layer was first built."""
    model, block_a, block_b, shared = shared_layer_model()
    assert shared.kernel.path == "block_a/shared/kernel"
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={"block_b/shared": 0.1})
    with pytest.raises(ValueError) as info:
        opt.build(model)
    message = str(info.value)
    assert "The lr_mult rule 'block_b/shared' matches none of the 6 trainable variables" in message
    assert "Closest paths: 'block_a/shared'" in message
    assert_untouched(opt)


def test_shared_layer_selected_through_either_block_object_first_match_wins():
    model, block_a, block_b, shared = shared_layer_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult=[(block_b, 0.5), (block_a, 0.1)])
    opt.build(model)
    # block_b holds `shared` too, so its rule (first) decides `shared`; the
    # glob 'block_b' would not (the path says block_a).
    assert lr_of(opt) == {
        "block_a/shared/kernel": 0.5, "block_a/shared/bias": 0.5,
        "block_a/a1/kernel": 0.1, "block_a/a1/bias": 0.1,
        "block_b/b1/kernel": 0.5, "block_b/b1/bias": 0.5,
    }
    by_glob = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={"block_b": 0.5})
    by_glob.build(model)
    assert lr_of(by_glob)["block_a/shared/kernel"] == 1.0


def test_layer_of_another_model_is_refused():
    original = two_layer_model()
    clone = keras.models.clone_model(original)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(),
                                     lr_mult={original.get_layer("d1"): 0.1})
    with pytest.raises(ValueError) as info:
        opt.build(clone)
    message = str(info.value)
    assert "The lr_mult rule layer 'd1'" in message and "not part of the model" in message
    assert "model.get_layer('d1')" in message
    assert_untouched(opt)


def broken_predicate(variable):
    return variable.no_such_attribute


def test_predicate_that_raises_names_the_rule_and_the_variable():
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult=[(broken_predicate, 0.1)])
    with pytest.raises(ValueError) as info:
        opt.build(two_layer_model())
    message = str(info.value)
    assert "predicate broken_predicate" in message
    assert "raised AttributeError" in message and "'d1/kernel'" in message
    assert isinstance(info.value.__cause__, AttributeError)
    assert_untouched(opt)


def test_predicate_that_raises_leaves_nothing_built():
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult=[(broken_predicate, 0.1)])
    with pytest.raises(Exception):
        opt.build(two_layer_model())
    assert_untouched(opt)


def twin_block_model():
    """Two functional blocks with the same inner layer name: equal variable paths."""
    def block(name):
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(4, name="dense")(inputs), name=name)

    first, second = block("first"), block("second")
    inputs = keras.Input((4,))
    return keras.Model(inputs, second(first(inputs))), first, second


def test_same_path_twice_rules_by_path_cannot_tell_them_apart():
    model, first, second = twin_block_model()
    assert [v.path for v in model.trainable_variables] == ["dense/kernel", "dense/bias"] * 2
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={"second": 0.1})
    with pytest.raises(ValueError, match="The lr_mult rule 'second' matches none"):
        opt.build(model)
    # The layer object can: the resolved multipliers follow the variables.
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={second: 0.1})
    opt.build(model)
    assert [m.lr_mult for m in opt._layerlr.resolved] == [1.0, 1.0, 0.1, 0.1]


def test_same_path_twice_multipliers_lists_every_variable():
    model, first, second = twin_block_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={second: 0.1})
    opt.build(model)
    entries = list(opt.multipliers.values())
    assert len(entries) == len(model.trainable_variables)
    assert [m.lr_mult for m in entries] == [1.0, 1.0, 0.1, 0.1]


def test_decay_rules_without_weight_decay_warn_where_written_not_on_load(tmp_path):
    with pytest.warns(UserWarning, match=r"decay_mult rules have no effect.*no weight decay.*weight_decay=") as caught:
        opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), decay_mult={"*bias": 0.0})
    # Attributed to the line that wrote the rules.
    assert [w.filename for w in caught] == [__file__]
    model = make_model()
    model.compile(optimizer=opt, loss="mse")
    model.fit(*data(8), verbose=0)
    path = tmp_path / "net.keras"
    model.save(path)
    with warnings.catch_warnings(record=True) as on_load:
        warnings.simplefilter("always")
        loaded = keras.saving.load_model(path)
    assert not [w for w in on_load if "no effect" in str(w.message)]
    assert loaded.optimizer._layerlr.decay_rules  # the rules came back all the same


def test_repr_names_the_wrapped_optimizer_and_the_rules():
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.AdamW(1e-3),
        lr_mult=[("backbone", 0.01), ("head", layerlr.schedules.FreezeThenWarmup(10, 10, 0.1))],
        decay_mult={"*bias": 0.0},
    )
    assert repr(opt) == (
        "LayerwiseOptimizer(AdamW, lr_mult=['backbone': 0.01, 'head': FreezeThenWarmup], "
        "decay_mult=['*bias': 0])"
    )
    many = layerlr.LayerwiseOptimizer("sgd", lr_mult=[(f"d{i}", 1.0) for i in range(9)])
    assert repr(many).startswith("LayerwiseOptimizer(SGD, lr_mult=['d0': 1, ")
    assert "... 3 more], decay_mult=[])" in repr(many)


# --- applying ---------------------------------------------------------------------------


# On JAX, Keras maps optimizer state to variables by position (stateless_apply):
# a plain optimizer compiled into a second model of the same architecture trains
# it with the first model's state, and so does the wrapper (docs/errors.md).
not_on_jax = pytest.mark.skipif(BACKEND == "jax", reason="Keras on JAX maps optimizer state by position")


@not_on_jax
def test_one_optimizer_compiled_into_two_models_is_refused_and_changes_nothing():
    x, y = np.ones((4, 4), "float32"), np.ones((4, 2), "float32")
    first, second = two_layer_model("first"), two_layer_model("second")
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.1), lr_mult={"d1": 0.1})
    first.compile(optimizer=opt, loss="mse")
    first.fit(x, y, verbose=0)
    state = [v.numpy().copy() for v in opt.variables]
    weights = second.get_weights()
    second.compile(optimizer=opt, loss="mse")
    with pytest.raises(ValueError, match=r"Unknown variable.*'d1/kernel'"):
        second.fit(x, y, verbose=0)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(state, opt.variables))
    assert all(np.array_equal(a, b) for a, b in zip(weights, second.get_weights()))


@pytest.mark.skipif(BACKEND != "jax", reason="JAX only")
def test_one_optimizer_two_models_on_jax_behaves_like_a_plain_optimizer():
    x, y = np.ones((4, 4), "float32"), np.ones((4, 2), "float32")
    outcomes = []
    for make in (lambda: keras.optimizers.Adam(0.1), lambda: layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.1))):
        first, second = two_layer_model("first"), two_layer_model("second")
        opt = make()
        first.compile(optimizer=opt, loss="mse")
        first.fit(x, y, verbose=0)
        kept, before = first.get_weights(), second.get_weights()
        second.compile(optimizer=opt, loss="mse")
        second.fit(x, y, verbose=0)
        outcomes.append((int(opt.iterations),
                         all(np.array_equal(a, b) for a, b in zip(kept, first.get_weights())),
                         any(not np.array_equal(a, b) for a, b in zip(before, second.get_weights()))))
    assert outcomes[0] == outcomes[1] == (2, True, True)


@not_on_jax
def test_one_optimizer_two_models_message_says_to_create_another_optimizer():
    x, y = np.ones((4, 4), "float32"), np.ones((4, 2), "float32")
    first, second = two_layer_model("first"), two_layer_model("second")
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.1))
    first.compile(optimizer=opt, loss="mse")
    first.fit(x, y, verbose=0)
    second.compile(optimizer=opt, loss="mse")
    with pytest.raises(ValueError, match="another model.*its own"):
        second.fit(x, y, verbose=0)


def test_apply_with_fewer_gradients_than_variables_is_refused():
    model = two_layer_model()
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1))
    opt.build(model)
    weights = model.get_weights()
    with pytest.raises(ValueError, match="1 gradients for 4 variables"):
        opt.apply([np.ones((4, 4), "float32")], model.trainable_variables)
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))


# --- saving and loading -------------------------------------------------------------------

RENAMED = {"name": "dense_a"}


@keras.saving.register_keras_serializable(package="layerlr_tests")
class RenamableNet(keras.Model):
    """A subclassed model whose layer name comes from code: it can change between runs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body = keras.layers.Dense(4, name=RENAMED["name"])
        self.head = keras.layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.body(x))


def saved_then_renamed(tmp_path):
    x, y = np.ones((4, 4), "float32"), np.ones((4, 2), "float32")
    RENAMED["name"] = "dense_a"
    model = RenamableNet(name="net")
    model(x)
    model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01),
                                                       lr_mult={model.body: 0.1}), loss="mse")
    model.fit(x, y, verbose=0)
    path = tmp_path / "net.keras"
    model.save(path)
    RENAMED["name"] = "dense_b"
    return path


def test_loading_a_model_whose_layers_were_renamed_is_refused(tmp_path):
    path = saved_then_renamed(tmp_path)
    try:
        with pytest.raises(ValueError) as info:
            keras.models.load_model(path)
        message = str(info.value)
        assert "The multipliers saved with this optimizer do not fit the model" in message
        assert "'net/dense_a/kernel'" in message
        assert "renamed, added or removed" in message
        # The way out: load without the optimizer and compile with new rules.
        model = keras.models.load_model(path, compile=False)
        opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(0.01), lr_mult={model.body: 0.1})
        model.compile(optimizer=opt, loss="mse")
        model.fit(np.ones((4, 4), "float32"), np.ones((4, 2), "float32"), verbose=0)
        assert opt.multipliers["dense_b/kernel"].lr_mult == 0.1
    finally:
        RENAMED["name"] = "dense_a"


def test_loading_a_renamed_model_says_to_load_with_compile_false(tmp_path):
    path = saved_then_renamed(tmp_path)
    try:
        with pytest.raises(ValueError, match=re.escape("load_model(path, compile=False)")):
            keras.models.load_model(path)
    finally:
        RENAMED["name"] = "dense_a"


def test_saved_rule_with_an_unknown_layer_type_says_to_import_it():
    config = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(), lr_mult={keras.layers.Dense: 0.5}).get_config()
    config["lr_mult"][0]["selector"] = {"layer_type": "my_package>NotImported"}
    with pytest.raises(ValueError, match=r"Unknown layer type 'my_package>NotImported'.*import the module that registers it"):
        layerlr.LayerwiseOptimizer.from_config(config)


def test_a_failed_fit_can_be_fixed_by_compiling_again():
    """After a refused build, recompiling with good rules trains normally."""
    model = make_model()
    x, y = data()
    model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), lr_mult={"d3": 0.1}),
                  loss="mse")
    with pytest.raises(ValueError, match="'d3' matches none"):
        model.fit(x, y, verbose=0)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(), lr_mult={"d2": 0.1})
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, verbose=0)
    assert opt.multipliers["d2/kernel"].lr_mult == 0.1 and int(opt.iterations) == 2
