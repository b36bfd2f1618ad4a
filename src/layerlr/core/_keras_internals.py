"""Every private Keras internal layerlr relies on, each with a check.

Keras does not promise any of these. Each `Internal` below says where layerlr
uses it, why, and which of our tests catches a change in behaviour; its
``check`` verifies it still exists with the shape we rely on. ``check()`` runs
them all and raises `KerasInternalsChanged` naming every internal that moved,
so a Keras upgrade shows up as a red check that names the internal, not as
silently wrong training. Run it with ``python -m layerlr.core._keras_internals``
(``scripts/test_nightly.sh`` does, against the newest ``keras-nightly``).

The call sites stay where they are (``_hooks``, ``_state``, ``_backend``,
``_optimizer``, ``_depth``, ...); ``tests/test_keras_internals.py`` fails when
one of them touches a private name that is not listed here.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from keras.src.saving.keras_saveable import KerasSaveable

__all__ = ["INTERNALS", "CHECKED_WITH", "Internal", "KerasInternalsChanged", "KerasSaveable", "check"]

CHECKED_WITH = ("3.15.1", "3.16.0.dev2026")
"""Keras versions on which every check below passed (releases, then nightlies)."""

ALL = ("tensorflow", "jax", "torch")


class KerasInternalsChanged(RuntimeError):
    """A private Keras internal layerlr relies on is gone or changed shape."""


@dataclass(frozen=True)
class Internal:
    name: str  # the Keras object, as Keras spells it
    names: tuple[str, ...]  # the private names layerlr's code touches for it
    used_by: str
    caught_by: str  # our test that fails when its behaviour changes
    check: Callable[[], None]
    backends: tuple[str, ...] = ALL


def _params(function) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


def _expect(condition, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _variables(n=2, shape=(3,)):
    return [keras.Variable(keras.ops.ones(shape), name=f"probe_{i}") for i in range(n)]


def _source(obj) -> str:
    return inspect.getsource(obj)


def _base():
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    return BaseOptimizer


# --- the checks ---------------------------------------------------------------------


def _check_variable_index():
    a, b = _variables()
    opt = keras.optimizers.SGD()
    opt.build([a, b])
    _expect(opt._get_variable_index(b) == 1, "_get_variable_index(v) is not v's position in build()")
    _expect(opt._trainable_variables_indices[opt._var_key(b)] == 1,
            "_trainable_variables_indices is not keyed by _var_key(v)")
    _expect(list(opt._trainable_variables) == [a, b], "_trainable_variables is not the built list")
    if keras.backend.backend() == "tensorflow":
        # Inside update_step TF passes the tf.Variable (per replica under tf.distribute).
        _expect(opt._get_variable_index(b.value) == 1, "_var_key(tf.Variable) != _var_key(keras.Variable)")
        _expect(hasattr(opt, "_distribution_strategy"), "TF optimizers lost `_distribution_strategy`")


def _check_own_variables():
    opt = keras.optimizers.SGD(0.25)
    _expect(opt.variables[0] is opt._iterations, "variables[0] is not `_iterations`")
    _expect(opt.variables[1] is opt._learning_rate, "variables[1] is not the `_learning_rate` variable")
    _expect(float(opt._get_current_learning_rate()) == 0.25, "_get_current_learning_rate() changed")
    extra = keras.Variable(0.0)
    opt._track_variable(extra)
    _expect(opt.variables[-1] is extra, "_track_variable(v) does not add v to `variables`")
    opt._untrack_variable(extra)
    _expect(all(v is not extra for v in opt.variables), "_untrack_variable(v) does not remove v")
    _expect(opt._variables == opt.variables, "`variables` is no longer `_variables`")
    init = _source(_base().__init__)
    _expect("self._track_variable(iterations)" in init,
            "BaseOptimizer.__init__ no longer tracks its iteration through _track_variable")


def _check_wrapper_state():
    # Our wrapper relies on the three internals above to keep no state of its own.
    from layerlr.core._optimizer import LayerwiseOptimizer

    inner = keras.optimizers.SGD(0.1, use_ema=True, gradient_accumulation_steps=2, weight_decay=0.1)
    opt = LayerwiseOptimizer(inner)
    opt.build(_variables())
    _expect(list(opt._variables) == [], "the wrapper tracked variables of its own")
    _expect([id(v) for v in opt.variables] == [id(v) for v in inner.variables],
            "the wrapper's variables are not its inner optimizer's")
    _expect(opt._iterations is inner._iterations, "the wrapper's `_iterations` is not the inner's")


def _check_update_step():
    _expect(_params(_base().update_step) == ["gradient", "variable", "learning_rate"],
            "update_step(gradient, variable, learning_rate) changed signature")
    _expect(_params(_base()._backend_update_step) == ["grads", "trainable_variables", "learning_rate"],
            "_backend_update_step(grads, trainable_variables, learning_rate) changed signature")
    _expect("self.update_step(" in _source(_base()._backend_update_step),
            "_backend_update_step no longer calls update_step per variable")
    for cls in (keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.RMSprop):
        _expect("self.assign" in _source(cls.update_step),
                f"{cls.__name__}.update_step no longer writes through self.assign*")


def _check_weight_decay():
    _expect(_params(_base()._apply_weight_decay) == ["variables"], "_apply_weight_decay(variables) changed")
    _expect("self._apply_weight_decay(" in _source(_base()._backend_apply_gradients),
            "_backend_apply_gradients no longer applies decay through _apply_weight_decay")
    a, b = _variables()
    opt = keras.optimizers.AdamW(weight_decay=0.1)
    opt.exclude_from_weight_decay(var_list=[a])
    opt.build([a, b])
    _expect(not opt._use_weight_decay(a) and opt._use_weight_decay(b), "_use_weight_decay(v) changed")


def _check_build_and_stateless_apply():
    build = _source(_base().build)
    _expect("self.use_ema" in build and "self.gradient_accumulation_steps" in build,
            "BaseOptimizer.build no longer reads use_ema / gradient_accumulation_steps "
            "(our _Wrapper.build guard assumes it does)")
    _expect(_params(_base().stateless_apply) == ["optimizer_variables", "grads", "trainable_variables"],
            "stateless_apply signature changed")
    stateless = _source(_base().stateless_apply)
    _expect("self._trainable_variables" in stateless and "self.variables" in stateless,
            "stateless_apply no longer maps _trainable_variables and variables")


def _check_tracking():
    from keras.src.backend.common import global_state
    from keras.src.utils import tracking

    with tracking.DotNotTrackScope():
        _expect(not tracking.is_tracking_enabled(), "DotNotTrackScope no longer turns tracking off")
        _expect(global_state.get_global_attribute("tracking_on") is False,
                "tracking is no longer the global attribute 'tracking_on'")
        global_state.set_global_attribute("tracking_on", True)
        _expect(tracking.is_tracking_enabled(), "setting 'tracking_on' no longer re-enables tracking")
        global_state.set_global_attribute("tracking_on", False)


def _check_loss_scale_optimizer():
    inner = keras.optimizers.SGD(loss_scale_factor=4.0)
    lso = keras.optimizers.LossScaleOptimizer(inner)
    _expect(lso.inner_optimizer is inner, "LossScaleOptimizer.inner_optimizer changed")
    _expect(inner.loss_scale_factor is None, "LossScaleOptimizer no longer clears the inner loss_scale_factor")
    lso.build(_variables())
    n = len(inner.variables)
    _expect([id(v) for v in lso.variables[-n:]] == [id(v) for v in inner.variables],
            "LossScaleOptimizer.variables no longer ends with the inner optimizer's")
    # (The class: inspect stops early inside that method's nested functions.)
    _expect("inner_optimizer.stateless_apply(" in _source(keras.optimizers.LossScaleOptimizer),
            "LossScaleOptimizer.stateless_apply no longer delegates to the inner optimizer")


def _check_nadam():
    opt = keras.optimizers.Nadam()
    opt.build(_variables(1))
    _expect(isinstance(getattr(opt, "_u_product", None), keras.Variable), "Nadam lost `_u_product`")
    _expect(any(v is opt._u_product for v in opt.variables), "Nadam's `_u_product` is not in variables")
    _expect(_params(keras.optimizers.Nadam._backend_update_step) == ["grads", "trainable_variables", "learning_rate"],
            "Nadam._backend_update_step changed signature")
    _expect("_u_product" in _source(keras.optimizers.Nadam._backend_update_step),
            "Nadam no longer advances `_u_product` in _backend_update_step")


def _check_muon():
    opt = keras.optimizers.Muon(adam_weight_decay=0.01)
    bias = keras.Variable(keras.ops.ones((3,)))
    _expect(opt._should_use_adamw(bias) is True, "Muon._should_use_adamw(1-D variable) changed")
    _expect(opt.adam_weight_decay == 0.01, "Muon lost `adam_weight_decay`")


def _check_deserialize():
    config = keras.optimizers.serialize(keras.optimizers.Lamb(0.02))
    restored = keras.saving.deserialize_keras_object(config)
    _expect(type(restored) is keras.optimizers.Lamb, "deserialize_keras_object no longer restores Lamb")
    by_name = keras.optimizers.deserialize(keras.optimizers.serialize(keras.optimizers.Adam()))
    _expect(type(by_name).__name__ == "Adam", "keras.optimizers.deserialize no longer resolves built-ins")


def _check_saving_walk():
    from keras.src.saving import saving_lib

    from layerlr.core._optimizer import LayerwiseOptimizer

    _expect(isinstance(keras.optimizers.SGD(), KerasSaveable), "optimizers are no longer KerasSaveable")
    opt = LayerwiseOptimizer(keras.optimizers.SGD())
    walked = [name for name, _ in saving_lib._walk_saveable(opt)]
    _expect("inner_optimizer" not in walked,
            "saving_lib._walk_saveable no longer walks dir(): the inner optimizer would be saved twice")
    _expect("variables" in _source(_base().save_own_variables),
            "save_own_variables no longer writes `variables` by index")


def _check_callbacks():
    swap = _source(keras.callbacks.SwapEMAWeights)
    for name in ("_model_variables_moving_average", "_trainable_variables", "inner_optimizer", "use_ema"):
        _expect(name in swap, f"SwapEMAWeights no longer reads `{name}` on the optimizer")
    board = _source(keras.callbacks.TensorBoard._collect_learning_rate)
    _expect("inner_optimizer" in board and "opt.name" in board,
            "TensorBoard no longer logs learning_rate_<optimizer name> per sub-optimizer")
    _expect(isinstance(inspect.getattr_static(keras.callbacks.TensorBoard, "_train_writer"), property),
            "TensorBoard._train_writer is gone")


def _check_layers():
    inner = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="probe_dense")], name="probe_block")
    model = keras.Sequential([keras.Input((2,)), inner, keras.layers.Dense(1, name="probe_head")])
    _expect(_params(keras.Layer._flatten_layers) == ["include_self", "recursive"],
            "Layer._flatten_layers(include_self, recursive) changed")
    names = {layer.name for layer in model._flatten_layers(include_self=False)}
    _expect({"probe_block", "probe_dense", "probe_head"} <= names, "_flatten_layers no longer recurses")
    dense = inner.layers[0]
    dense.trainable = False
    _expect(len(dense._trainable_variables) == 2, "Layer._trainable_variables no longer lists frozen params")

    calls = []
    original = dense.call
    object.__setattr__(dense, "call", lambda *a, **k: calls.append(1) or original(*a, **k))
    try:
        model(keras.ops.ones((1, 2)))
    finally:
        object.__delattr__(dense, "call")
    _expect(calls, "Layer.__call__ no longer calls an instance-level `call`")

    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1, name="probe_out")(keras.layers.Dense(2, name="probe_in")(inputs))
    functional = keras.Model(inputs, outputs)
    depths = functional._nodes_by_depth
    _expect(isinstance(depths, dict) and [n.operation.name for n in depths[0]] == ["probe_out"],
            "Functional._nodes_by_depth no longer maps depth 0 to the output layer")
    node = depths[0][0]
    for attr in ("operation", "is_input", "input_tensors", "outputs"):
        _expect(hasattr(node, attr), f"graph nodes lost `{attr}`")


def _check_call_stack():
    # find_model: the trainer builds the optimizer from a model method (`self`);
    # callbacks._callback_list_of: a CallbackList calls each callback method.
    from layerlr.core._optimizer import LayerwiseOptimizer
    from layerlr.core._keras import find_model

    found = {}

    class Probe(LayerwiseOptimizer):
        def build(self, var_list):
            found.setdefault("model", find_model(list(var_list)))
            super().build(var_list)

    class Seen(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            frame = inspect.currentframe()
            for _ in range(10):
                frame = frame.f_back
                if frame is None:
                    break
                if isinstance(frame.f_locals.get("self"), keras.callbacks.CallbackList):
                    found["callbacks"] = True
            del frame

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=Probe(keras.optimizers.SGD()), loss="mse")
    model.fit(keras.ops.ones((2, 2)), keras.ops.ones((2, 1)), epochs=1, verbose=0, callbacks=[Seen()])
    _expect(found.get("model") is model, "the optimizer is no longer built from a model method (find_model)")
    _expect(found.get("callbacks"), "callbacks are no longer called from CallbackList methods")


def _check_mixed_precision_compile():
    from layerlr.core._optimizer import LayerwiseOptimizer

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        opt = LayerwiseOptimizer(keras.optimizers.SGD())
        model.compile(optimizer=opt, loss="mse")
        _expect(isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
                and model.optimizer.inner_optimizer is opt,
                "compile() no longer wraps the optimizer in a LossScaleOptimizer under mixed_float16")
    finally:
        keras.mixed_precision.set_global_policy(previous)


# The per-tensor foreach ops of layerlr's fused torch steps (_torch_fused, _hooks).
_TORCH_FOREACH = ("_foreach_abs", "_foreach_add", "_foreach_add_", "_foreach_div", "_foreach_maximum_",
                  "_foreach_mul", "_foreach_mul_", "_foreach_sqrt", "_foreach_sqrt_")


def _check_torch_fused():
    import torch
    from keras.src.backend.torch.optimizers.torch_parallel_optimizer import TorchParallelOptimizer

    for name in _TORCH_FOREACH:
        _expect(callable(getattr(torch, name, None)), f"torch.{name} is gone")
    opt = keras.optimizers.Adam()
    _expect(isinstance(opt, TorchParallelOptimizer), "torch no longer swaps Adam for its fused version")
    _expect(_params(type(opt)._parallel_update_step) == ["grads", "variables", "learning_rate"],
            "_parallel_update_step(grads, variables, learning_rate) changed")
    _expect("_parallel_update_step(" in _source(TorchParallelOptimizer._backend_update_step),
            "TorchParallelOptimizer._backend_update_step no longer calls _parallel_update_step")
    per_variable = super(TorchParallelOptimizer, opt)._backend_update_step
    _expect(per_variable.__func__ is _base()._backend_update_step,
            "below TorchParallelOptimizer, _backend_update_step is no longer the per-variable loop")
    _expect(not isinstance(keras.optimizers.Lamb(), TorchParallelOptimizer), "Lamb became fused on torch")


def _check_multi_optimizer():
    a, b = _variables()
    first, second = keras.optimizers.SGD(), keras.optimizers.Adam()
    seen = []

    class Router:
        def values(self):
            return [first, second]

        def __call__(self, variable):
            seen.append(variable)
            return first if variable is a else second

    router = Router()
    multi = keras.optimizers.MultiOptimizer(router)
    _expect(multi._optimizer_map is router, "MultiOptimizer no longer keeps its map as `_optimizer_map`")
    _expect(multi.optimizers == [first, second], "MultiOptimizer no longer takes sub-optimizers from values()")
    multi.build([a, b])
    _expect(seen == [a, b], "MultiOptimizer.build no longer routes each variable through the map once")


def _check_tf_checkpoint():
    import tensorflow as tf

    from layerlr.core._optimizer import LayerwiseOptimizer

    opt = LayerwiseOptimizer(keras.optimizers.SGD())
    opt.build(_variables())
    with tempfile.TemporaryDirectory() as tmp:
        # Removing items from a tracked list would make this raise.
        tf.train.Checkpoint(optimizer=opt).save(os.path.join(tmp, "probe"))


def _check_jax_tracer():
    import jax

    _expect(isinstance(jax.core.Tracer, type), "jax.core.Tracer is gone")



def _check_moving_average():
    base = _base()
    _expect(_params(base._update_model_variables_moving_average) == ["trainable_variables"],
            "_update_model_variables_moving_average(trainable_variables) changed signature")
    source = _source(base._update_model_variables_moving_average)
    _expect("self.iterations" in source and "_model_variables_moving_average" in source,
            "the EMA update no longer reads self.iterations for its first step")
    _expect("self._update_model_variables_moving_average(" in _source(base._backend_apply_gradients),
            "_backend_apply_gradients no longer updates the EMA through the instance method")


def _check_first_moments():
    var = keras.Variable(np.zeros((2,), "float32"))
    for cls, name in ((keras.optimizers.Adam, "_momentums"), (keras.optimizers.Lion, "_momentums"),
                      (keras.optimizers.Nadam, "_momentums"), (keras.optimizers.Lamb, "_momentums"),
                      (keras.optimizers.Adamax, "_m")):
        opt = cls()
        opt.build([var])
        _expect(len(getattr(opt, name, ())) == 1, f"{cls.__name__} keeps its first moments no longer in `{name}`")


def _check_jax_trainer_state():
    if keras.backend.backend() != "jax":
        return
    # The backend trainer's fit, whatever its class is called (JAXTrainer in 3.15).
    source = _source(keras.Model.fit)
    _expect("_jax_state" in source and "_jax_state_synced" in source,
            "the JAX trainer no longer keeps the training state in _jax_state / _jax_state_synced")


def _check_callback_model():
    _expect(isinstance(inspect.getattr_static(keras.callbacks.Callback, "model"), property),
            "Callback.model is no longer a property (over `_model`)")
    _expect("_model" in _source(keras.callbacks.Callback.set_model), "Callback.set_model no longer sets `_model`")

INTERNALS: tuple[Internal, ...] = (
    Internal(
        "BaseOptimizer._get_variable_index / _var_key / _trainable_variables_indices / _trainable_variables",
        ("_get_variable_index", "_var_key", "_trainable_variables_indices", "_trainable_variables",
         "_distribution_strategy"),
        "_hooks (the multiplier of the variable being updated, also per-replica tf.Variables), "
        "_optimizer (_knows, update_step, _strategy_scope), _state.grow, _summary",
        "tests/test_equivalence.py, tests/test_distribution.py",
        _check_variable_index,
    ),
    Internal(
        "BaseOptimizer._iterations / _learning_rate / _get_current_learning_rate / _track_variable / "
        "_untrack_variable / _variables",
        ("_iterations", "_learning_rate", "_get_current_learning_rate", "_track_variable",
         "_untrack_variable", "_variables"),
        "_optimizer (_Wrapper._track_variable, _drop_own_state, apply_gradients), _state.grow, "
        "_summary and plot (the base schedule)",
        "tests/test_drop_in.py::test_variables_are_exactly_the_inner_optimizers, tests/test_unfreezing.py",
        _check_own_variables,
    ),
    Internal(
        "the wrapper keeps no optimizer state of its own",
        (),
        "_optimizer._Wrapper, LayerwiseOptimizer.variables",
        "tests/test_drop_in.py::test_weight_files_are_interchangeable_with_the_plain_optimizers",
        _check_wrapper_state,
    ),
    Internal(
        "BaseOptimizer.update_step / _backend_update_step / assign*",
        ("update_step", "_backend_update_step"),
        "_hooks.install (the hook point; scheduled zeros gate self.assign*)",
        "tests/test_equivalence.py, tests/test_schedules.py",
        _check_update_step,
    ),
    Internal(
        "BaseOptimizer._apply_weight_decay / _use_weight_decay",
        ("_apply_weight_decay", "_use_weight_decay"),
        "_hooks (decay moves into update_step; Keras' own is switched off)",
        "tests/test_equivalence.py (weight decay cases), tests/test_training.py::test_exclude_from_weight_decay_is_still_honoured",
        _check_weight_decay,
    ),
    Internal(
        "BaseOptimizer.build reads use_ema / gradient_accumulation_steps; stateless_apply maps variables",
        (),
        "_optimizer._Wrapper.build (no EMA/accumulators on the wrapper), JAX stateless_apply",
        "tests/test_drop_in.py::test_base_optimizer_attributes_read_as_on_the_inner_optimizer, tests/test_jax_backend.py",
        _check_build_and_stateless_apply,
    ),
    Internal(
        "keras.src.utils.tracking.DotNotTrackScope / global_state 'tracking_on'",
        (),
        "_backend.tracking_on (LossScaleOptimizer.build turns tracking off), _backend.tracking_off",
        "tests/test_jax_backend.py::test_nadam_state_is_all_in_optimizer_variables, "
        "tests/test_training.py::test_mixed_float16_wraps_us_in_loss_scaling_and_trains_correctly",
        _check_tracking,
    ),
    Internal(
        "LossScaleOptimizer internals (inner_optimizer, variables, loss_scale_factor, stateless_apply)",
        (),
        "_optimizer (loss_scale_factor setter), _unfreezing, _summary (unwrapping one level)",
        "tests/test_training.py::test_mixed_float16_wraps_us_in_loss_scaling_and_trains_correctly, tests/test_numerics.py",
        _check_loss_scale_optimizer,
    ),
    Internal(
        "BaseOptimizer._update_model_variables_moving_average",
        ("_update_model_variables_moving_average",),
        "_hooks (a late-starting variable's average starts at its own first step)",
        "tests/test_late_start.py::test_ema_average_of_a_late_variable_starts_at_its_own_first_step",
        _check_moving_average,
    ),
    Internal(
        "first-moment slots: Adam/Nadam/Lamb/Lion `_momentums`, Adamax `_m`",
        ("_momentums", "_m"),
        "_updates (UpdateLogger reads the gradient back from the first moment)",
        "tests/test_updates.py",
        _check_first_moments,
    ),
    Internal(
        "JAXTrainer._jax_state / _jax_state_synced",
        ("_jax_state", "_jax_state_synced"),
        "_updates (UpdateLogger reads the training state on JAX without a sync, and waits for it to be computed: _updates.settle)",
        "tests/test_updates.py",
        _check_jax_trainer_state,
        ("jax",),
    ),
    Internal(
        "Callback._model (the model without the JAX state sync of Callback.model)",
        ("_model",),
        "callbacks.UpdateLogger",
        "tests/test_updates.py",
        _check_callback_model,
    ),
    Internal(
        "Nadam._u_product / Nadam._backend_update_step",
        ("_u_product",),
        "_hooks (once-per-step state under torch grouping), _state.grow",
        "tests/test_torch_backend.py, tests/test_equivalence.py::test_matches_one_optimizer_per_group",
        _check_nadam,
    ),
    Internal(
        "Muon._should_use_adamw / adam_weight_decay",
        ("_should_use_adamw",),
        "_hooks._base_weight_decay",
        "tests/test_equivalence.py::test_matches_one_optimizer_per_group",
        _check_muon,
    ),
    Internal(
        "keras.optimizers.deserialize returns a name for classes outside its list",
        (),
        "_optimizer._deserialize_inner, _multi.SelectorMultiOptimizer.from_config",
        "tests/test_drop_in.py::test_every_optimizer_class_round_trips_through_its_config, tests/test_cross_backend.py",
        _check_deserialize,
    ),
    Internal(
        "saving_lib._walk_saveable walks dir(); KerasSaveable; save_own_variables by index",
        ("_walk_saveable",),
        "_optimizer.LayerwiseOptimizer.__dir__ / save_own_variables / _holds_saveables",
        "tests/test_drop_in.py::test_weight_files_are_interchangeable_with_the_plain_optimizers, tests/test_saving.py",
        _check_saving_walk,
    ),
    Internal(
        "SwapEMAWeights and TensorBoard read _model_variables_moving_average, _trainable_variables, "
        "inner_optimizer, name; TensorBoard._train_writer",
        ("_model_variables_moving_average", "_train_writer"),
        "_optimizer (_model_variables_moving_average, name), callbacks.LearningRateLogger",
        "tests/test_drop_in.py::test_swap_ema_weights_with_a_wrapped_sub_optimizer_matches_plain_keras, "
        "tests/test_drop_in.py::test_tensorboard_logs_every_learning_rate_as_for_plain_optimizers, tests/test_summary.py",
        _check_callbacks,
    ),
    Internal(
        "Layer._flatten_layers / Layer._trainable_variables / Functional._nodes_by_depth / instance-level call",
        ("_flatten_layers", "_trainable_variables", "_nodes_by_depth"),
        "_backend.layers_of_model, _depth (layer-wise decay), _presets, _summary, _unfreezing",
        "tests/test_depth.py, tests/test_presets.py, tests/test_rules.py",
        _check_layers,
    ),
    Internal(
        "call stack: optimizers are built from a model method; CallbackList calls callbacks",
        (),
        "_backend.find_model (layer-type selectors), callbacks._callback_list_of",
        "tests/test_rules.py, tests/test_summary.py::test_logger_writes_tensorboard_scalars_in_either_order",
        _check_call_stack,
    ),
    Internal(
        "MultiOptimizer._optimizer_map (called once per variable in build; values() lists sub-optimizers)",
        ("_optimizer_map",),
        "_multi.SelectorMultiOptimizer (routing by layerlr selectors)",
        "tests/test_multi.py",
        _check_multi_optimizer,
    ),
    Internal(
        "compile() wraps in LossScaleOptimizer under mixed_float16",
        (),
        "_optimizer (refuses LSO inside, expects it outside)",
        "tests/test_training.py::test_mixed_float16_wraps_us_in_loss_scaling_and_trains_correctly",
        _check_mixed_precision_compile,
    ),
    Internal(
        "torch: TorchParallelOptimizer._parallel_update_step (fused built-ins), torch._foreach_* ops",
        ("_parallel_update_step", *_TORCH_FOREACH),
        "_hooks._grouped_step",
        "tests/test_torch_backend.py",
        _check_torch_fused,
        backends=("torch",),
    ),
    Internal(
        "TF: tracked lists must stay append-only to be checkpointed",
        (),
        "_optimizer._Wrapper._track_variable (skips rather than untracks)",
        "tests/test_saving.py::test_tf_train_checkpoint_round_trip",
        _check_tf_checkpoint,
        backends=("tensorflow",),
    ),
    Internal(
        "JAX: jax.core.Tracer",
        (),
        "_backend.cannot_create_state",
        "tests/test_unfreezing.py",
        _check_jax_tracer,
        backends=("jax",),
    ),
)


def check(verbose: bool = False) -> list[str]:
    """Runs every check for the current backend; raises naming all that failed."""
    backend = keras.backend.backend()
    failed, passed = [], []
    for internal in INTERNALS:
        if backend not in internal.backends:
            continue
        try:
            internal.check()
        except Exception as error:  # noqa: BLE001 - report every internal, not the first
            failed.append(f"{internal.name}: {type(error).__name__}: {error} "
                          f"(used by {internal.used_by}; caught by {internal.caught_by})")
            outcome = "FAIL"
        else:
            passed.append(internal.name)
            outcome = "ok  "
        if verbose:
            print(f"{outcome} {internal.name}")
    if failed:
        raise KerasInternalsChanged(
            f"keras {keras.__version__} ({backend}): {len(failed)} of the private Keras internals "
            "layerlr relies on changed:\n- " + "\n- ".join(failed)
        )
    return passed


if __name__ == "__main__":
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}")
    print(f"{len(check(verbose=True))} internals checked")
