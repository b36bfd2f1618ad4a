"""Every access layerlr makes to private Keras and backend internals.

Keras does not promise any of these; a minor release may change them. The rest
of layerlr calls the functions here and never reads or writes a private Keras
name itself (`tests/test_keras_internals.py` enforces it), so this file is the
list of what a Keras upgrade can break. Each access carries a comment:

    # Keras: <the internal, as listed in `_keras_internals.INTERNALS`>
    #   (checked with 3.15.1 and 3.16 nightly). Caught by: <our test>.

`_keras_internals.check()` verifies each of them against the installed Keras
(``scripts/test_nightly.sh`` runs it against the newest ``keras-nightly``).
Overrides of private Keras methods (`LayerwiseOptimizer._track_variable`, its
``_model_variables_moving_average``) stay in their classes; they are listed
in the inventory too.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Mapping

import keras
from keras import ops


# --- tracking, tracing and compiled steps -------------------------------------------
# Keras: keras.src.utils.tracking.DotNotTrackScope / global_state 'tracking_on' (checked with
#   3.15.1 and 3.16 nightly). Caught by:
#   tests/test_jax_backend.py::test_nadam_state_is_all_in_optimizer_variables,
#   tests/test_training.py::test_mixed_float16_wraps_us_in_loss_scaling_and_trains_correctly.


@contextlib.contextmanager
def tracking_on():
    # LossScaleOptimizer.build turns attribute tracking off around our build;
    # inner optimizers that create state by plain attribute assignment (Nadam's
    # `_u_product`) would then lose it from `.variables` (never saved, and
    # dropped between JAX steps).
    from keras.src.backend.common import global_state

    previous = global_state.get_global_attribute("tracking_on", True)
    global_state.set_global_attribute("tracking_on", True)
    try:
        yield
    finally:
        global_state.set_global_attribute("tracking_on", previous)


@contextlib.contextmanager
def tracking_off():
    """Attribute assignments add nothing to Keras' variable tracking.

    For the wrapper's base-constructor state and its references to the inner
    optimizer's state, none of which may become the wrapper's own variables.
    """
    from keras.src.utils import tracking

    with tracking.DotNotTrackScope():
        yield


def not_autograph(method):
    """Keeps AutoGraph out of our Python-only logic inside a user's tf.function.

    AutoGraph converts methods of non-Keras classes it meets in a traced step;
    ours only branch on Python values, so conversion would only add warnings.
    """
    if keras.backend.backend() != "tensorflow":
        return method
    import tensorflow as tf

    return tf.autograph.experimental.do_not_convert(method)


# Keras: JAX: jax.core.Tracer; torch.compiler.is_compiling; TF init_scope (checked with 3.15.1
#   and 3.16 nightly). Caught by: tests/test_unfreezing.py, tests/test_torch_backend.py.


def cannot_create_state(grads) -> bool:
    """True inside jax.jit or torch.compile, where no variable can be created.

    (A tf.function's first trace can: see `outside_compiled_step`.)
    """
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.compiler.is_compiling()
    if backend == "jax":
        import jax

        return keras.backend.in_stateless_scope() or any(
            isinstance(g, jax.core.Tracer) for g in grads
        )
    return False


@contextlib.contextmanager
def outside_compiled_step():
    """Creates optimizer state eagerly even while TF traces a train step.

    Without a tf.distribute strategy Keras builds the optimizer inside the first
    trace of the train function; state created there must be initialized once,
    not by ops that would run on every step.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():
            yield
    else:
        yield


# --- the model being trained ---------------------------------------------------------
# Keras: Layer._flatten_layers; the call stack: optimizers are built from a model method
#   (checked with 3.15.1 and 3.16 nightly). Caught by: tests/test_rules.py,
#   tests/test_summary.py.


def layers_of_model(model) -> dict[int, list]:
    """Maps id(variable) -> every layer (the model included) whose weights hold it."""
    owners: dict[int, list] = {}
    for layer in [model, *model._flatten_layers(include_self=False)]:
        for weight in layer.weights:
            owners.setdefault(id(weight), []).append(layer)
    return owners


def find_model(variables) -> keras.Layer | None:
    """The model being trained: the caller's `self` that owns all the variables.

    Only layer-type selectors need it; `model.fit`, `train_on_batch`, `compile`
    and `load_model` all build the optimizer from inside a model method.
    """
    wanted = {id(v) for v in variables}
    return caller_self(
        lambda owner: isinstance(owner, keras.Layer) and wanted <= {id(w) for w in owner.weights},
        depth=30,
    )


def caller_self(accept, depth: int):
    """The first ``self`` among the callers (up to ``depth`` frames up) that ``accept`` takes."""
    # Keras: the call stack: optimizers are built from a model method; CallbackList
    #   calls callbacks (checked with 3.15.1 and 3.16 nightly). Caught by:
    #   tests/test_rules.py, tests/test_summary.py::test_logger_writes_tensorboard_scalars_in_either_order.
    frame = inspect.currentframe().f_back
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if owner is not None and accept(owner):
                return owner
    finally:
        del frame
    return None


# --- once-per-step state and fused steps ------------------------------------------
# Keras: Nadam._u_product / Nadam._backend_update_step (checked with 3.15.1 and 3.16 nightly).
#   Caught by: tests/test_torch_backend.py,
#   tests/test_equivalence.py::test_matches_one_optimizer_per_group.


def _nadam_momentum_product_step(inner, product, local_iterations):
    # keras.optimizers.Nadam._backend_update_step (checked: Keras 3.15.1), at
    # the variable's own step.
    dtype = product.dtype
    return product * inner.beta_1 * (1.0 - 0.5 * ops.power(0.96, ops.cast(local_iterations + 1, dtype)))


# Optimizer state that Keras advances once per step rather than per variable,
# by attribute name, with its one-step update. A variable that starts training
# late needs its own copy, advanced from its own first step.
ONCE_PER_STEP_STATE = {"_u_product": _nadam_momentum_product_step}


# Keras: torch: TorchParallelOptimizer._parallel_update_step (fused built-ins) (checked with
#   3.15.1 and 3.16 nightly). Caught by: tests/test_torch_backend.py.


@functools.cache
def torch_foreach():
    """torch's fused multi-tensor ops by short name: ``mul_`` is ``torch._foreach_mul_``."""
    import torch

    return _TorchForeach(torch)


class _TorchForeach:
    # torch: the torch._foreach_* ops with ScalarList overloads (torch 2.13.0), as Keras'
    # fused torch optimizers call them. Caught by: tests/test_torch_backend.py.
    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        # Looked up at each use, as a direct `torch._foreach_mul_` call would be.
        if name not in _FOREACH_OPS:
            raise AttributeError(f"not one of the foreach ops layerlr uses: {name!r}")
        return getattr(self._torch, f"_foreach_{name}")


_FOREACH_OPS = ("abs", "add", "add_", "div", "maximum_", "mul", "mul_", "sqrt", "sqrt_")


def torch_fused_optimizer_classes() -> dict:
    """The nine fused optimizers Keras swaps in on torch, by Keras' class name."""
    # Keras: torch: TorchParallelOptimizer._parallel_update_step (fused built-ins), in
    #   keras.src.backend.torch.optimizers (checked with 3.15.1 and 3.16 nightly). Caught by:
    #   tests/test_torch_backend.py.
    from keras.src.backend.torch.optimizers import (
        torch_adadelta, torch_adagrad, torch_adam, torch_adamax, torch_adamw,
        torch_lion, torch_nadam, torch_rmsprop, torch_sgd,
    )

    classes = (torch_adadelta.Adadelta, torch_adagrad.Adagrad, torch_adam.Adam, torch_adamw.AdamW,
               torch_adamax.Adamax, torch_lion.Lion, torch_nadam.Nadam, torch_rmsprop.RMSprop,
               torch_sgd.SGD)
    return {cls.__name__: cls for cls in classes}


def is_the_class_fused_step(inner, fused_step) -> bool:
    """Whether ``fused_step`` is ``inner``'s class's own `_parallel_update_step` (not replaced)."""
    return getattr(fused_step, "__func__", None) is type(inner)._parallel_update_step


def nadam_product(state):
    """Nadam's momentum product: of the optimizer, or of a start step's copy (a dict)."""
    return state["_u_product"] if isinstance(state, dict) else state._u_product


def torch_compiling() -> bool:
    if keras.backend.backend() != "torch":
        return False
    import torch

    return torch.compiler.is_compiling()


def per_variable_update_step(inner, grads, variables, learning_rate):
    """The base (non-fused) step of a torch fused optimizer: update_step per variable."""
    from keras.src.backend.torch.optimizers.torch_parallel_optimizer import TorchParallelOptimizer

    return super(TorchParallelOptimizer, inner)._backend_update_step(grads, variables, learning_rate)


# --- steps ----------------------------------------------------------------------------
# Keras: BaseOptimizer._iterations (checked with 3.15.1 and 3.16 nightly). Caught by:
#   tests/test_unfreezing.py, tests/test_late_start.py.


def current_step(optimizer) -> int:
    """``optimizer.iterations`` now, as a Python int, even while TF traces a step."""
    return int(eager_value(optimizer._iterations)) // (optimizer.gradient_accumulation_steps or 1)


def eager_value(value):
    """A variable's current value as numpy, even while TF traces a step (never inside jit)."""
    with outside_compiled_step():
        # ops.convert_to_numpy of a TF-backed Variable warns under numpy 2.
        return value.numpy() if isinstance(value, keras.Variable) else ops.convert_to_numpy(value)


def counts_steps(inner) -> bool:
    """Whether the optimizer's update reads its step counter (Adam's bias correction...).

    Read from the source of the update methods its class defines: true for
    Adam, AdamW, Adamax, Nadam, Lamb, Adafactor, Muon, ScheduleFreeAdamW and
    user subclasses that read ``self.iterations``.
    """
    for cls in type(inner).__mro__:
        if cls.__module__.startswith("keras.src.optimizers.base_optimizer") or cls is object:
            continue
        for name in ("update_step", "_backend_update_step", "_parallel_update_step"):
            method = cls.__dict__.get(name)
            if method is None:
                continue
            try:
                source = inspect.getsource(method)
            except (OSError, TypeError):
                return True  # cannot tell: assume it does
            if "iterations" in source:
                return True
    return False


# Keras: LossScaleOptimizer internals (inner_optimizer, _trainable_variables) (checked with
#   3.15.1 and 3.16 nightly). Caught by:
#   tests/test_training.py::test_mixed_float16_wraps_us_in_loss_scaling_and_trains_correctly,
#   tests/test_numerics.py.


def follow_outer_loss_scale(model, optimizer) -> None:
    """Keeps a LossScaleOptimizer around ``optimizer`` on the same variable list.

    It unscales gradients zipped with its own `_trainable_variables`, fixed
    when it was built: after the inner list changed (unfreezing), surplus
    gradients would be dropped.
    """
    outer = getattr(model, "optimizer", None) if model is not None else None
    if not isinstance(outer, keras.optimizers.LossScaleOptimizer) or outer.inner_optimizer is not optimizer:
        return
    if outer.built:
        follow_variables(outer, optimizer._trainable_variables)


# --- optimizer variables and their order ------------------------------------------
# Keras: BaseOptimizer._get_variable_index / _var_key / _trainable_variables_indices /
#   _trainable_variables (checked with 3.15.1 and 3.16 nightly). Caught by:
#   tests/test_equivalence.py, tests/test_distribution.py.


def trainable_variables(optimizer) -> list:
    """The variables ``optimizer`` was built for, in the order it keeps their state."""
    return optimizer._trainable_variables


def variable_index(optimizer, variable) -> int:
    """``variable``'s position in `trainable_variables` (per-replica variables included)."""
    return optimizer._get_variable_index(variable)


def var_key(optimizer, variable):
    return optimizer._var_key(variable)


def knows(optimizer, variable) -> bool:
    """Whether ``optimizer`` holds state for ``variable`` (False before it is built)."""
    indices = getattr(optimizer, "_trainable_variables_indices", None) or {}
    return optimizer._var_key(variable) in indices


def forget_variable_order(optimizer) -> None:
    """Lets the next ``build()`` record a new variable order (``build`` only adds keys)."""
    optimizer._trainable_variables_indices = {}


def follow_variables(optimizer, variables) -> None:
    """Points ``optimizer``'s own variable list at ``variables``, without tracking them as its state."""
    variables = list(variables)
    # Through __dict__: attribute assignment would track the variables as the
    # optimizer's own state.
    optimizer.__dict__["_trainable_variables"] = variables
    optimizer.__dict__["_trainable_variables_indices"] = {
        optimizer._var_key(v): i for i, v in enumerate(variables)
    }


def strategy_scope(optimizer):
    """The optimizer's tf.distribute scope: state grown outside it (in a callback) must still be mirrored."""
    # Keras: BaseOptimizer._distribution_strategy (TF) (checked with 3.15.1 and
    #   3.16 nightly). Caught by: tests/test_distribution.py.
    strategy = getattr(optimizer, "_distribution_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


# --- the optimizer's own variables ----------------------------------------------------
# Keras: BaseOptimizer._iterations / _learning_rate / _track_variable / _untrack_variable /
#   _variables (checked with 3.15.1 and 3.16 nightly). Caught by:
#   tests/test_drop_in.py::test_variables_are_exactly_the_inner_optimizers,
#   tests/test_unfreezing.py.


def step_counter(optimizer) -> keras.Variable:
    """The raw step variable (``iterations`` times the gradient accumulation steps)."""
    return optimizer._iterations


def own_variables(optimizer) -> list:
    """Every variable the optimizer tracks as its state (what ``variables`` lists)."""
    return optimizer._variables


def counter_and_rate(optimizer) -> tuple:
    """The step counter and the learning-rate variable: state kept across a rebuild."""
    return optimizer._iterations, getattr(optimizer, "_learning_rate", None)


def track(optimizer, variable) -> None:
    optimizer._track_variable(variable)


def untrack(optimizer, variable) -> None:
    optimizer._untrack_variable(variable)


def share_state_of(wrapper, inner) -> None:
    """Makes ``wrapper`` keep no state of its own: its step counter is ``inner``'s.

    The base constructor made an ``iteration`` and a ``learning_rate``
    variable for the wrapper; kept as attributes they would be stale copies.
    """
    wrapper._iterations = inner._iterations
    del wrapper._learning_rate


def learning_rate_schedule(optimizer):
    """The optimizer's learning-rate schedule, or None for a constant rate."""
    schedule = getattr(optimizer, "_learning_rate", None)
    return schedule if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule) else None


def current_learning_rate(optimizer):
    """What base and backend helpers (torch's weight decay) read as the rate."""
    return optimizer._get_current_learning_rate()


def holds_saveables(obj) -> bool:
    """True when ``obj`` has Keras-saveable children (layers, optimizers, ...)."""
    # Keras: saving_lib._walk_saveable walks dir(); KerasSaveable (checked with
    #   3.15.1 and 3.16 nightly). Caught by: tests/test_saving.py,
    #   tests/test_drop_in.py::test_weight_files_are_interchangeable_with_the_plain_optimizers.
    from keras.src.saving.keras_saveable import KerasSaveable

    for value in vars(obj).values():
        if isinstance(value, Mapping):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            if any(isinstance(v, KerasSaveable) for v in value):
                return True
        elif isinstance(value, KerasSaveable):
            return True
    return False


# Lists on an optimizer that hold variables but are not per-variable state.
NOT_PER_VARIABLE_STATE = ("_variables", "_trainable_variables")


# --- the hook's entry points ---------------------------------------------------------
# Keras: BaseOptimizer.update_step / _backend_update_step / _apply_weight_decay /
#   _update_model_variables_moving_average; torch: TorchParallelOptimizer._parallel_update_step
#   (checked with 3.15.1 and 3.16 nightly). Caught by: tests/test_equivalence.py,
#   tests/test_schedules.py, tests/test_torch_backend.py, tests/test_late_start.py.


def original_steps(inner) -> dict:
    """``inner``'s own step methods, as they were before the first `replace_steps`."""
    return inner.__dict__.setdefault(
        "_layerlr_originals",
        {"update_step": inner.update_step,
         "parallel_update_step": getattr(inner, "_parallel_update_step", None),
         "backend_update_step": inner._backend_update_step},
    )


def replace_steps(inner, *, update_step, backend_update_step, parallel_update_step=None,
                  moving_average_update=None) -> None:
    """Installs the hook's steps on the instance ``inner`` (replacing earlier ones).

    Weight decay moves into ``update_step``: Keras' own pass over all
    variables is switched off. ``moving_average_update`` None keeps Keras' EMA
    update; a ``parallel_update_step`` replaces torch's fused step.
    """
    inner.update_step = update_step
    inner._backend_update_step = backend_update_step
    inner._apply_weight_decay = lambda variables: None
    if parallel_update_step is not None:
        inner._parallel_update_step = parallel_update_step
    if moving_average_update is not None:
        inner._update_model_variables_moving_average = moving_average_update
    else:
        inner.__dict__.pop("_update_model_variables_moving_average", None)


@contextlib.contextmanager
def swapped(inner, attributes: dict):
    """Replaces attributes of ``inner`` for the duration, untracked."""
    # Through __dict__: plain attribute assignment would make Keras track the
    # temporary values as optimizer state.
    saved = {name: inner.__dict__[name] for name in attributes}
    inner.__dict__.update(attributes)
    try:
        yield
    finally:
        inner.__dict__.update(saved)


def steps_counted_from(inner, start: int):
    """While active, ``inner.iterations`` counts from ``start`` (the variable's own step).

    Keras reads the step as ``self.iterations`` (``_iterations``, divided by
    the accumulation steps) inside ``update_step``; shifting the raw counter by
    ``start * accumulation_steps`` shifts that quotient by exactly ``start``.
    """
    # Keras: BaseOptimizer._iterations (checked with 3.15.1 and 3.16 nightly). Caught by:
    #   tests/test_late_start.py.
    if not start:
        return contextlib.nullcontext()
    return swapped(inner, {"_iterations": inner._iterations - start * (inner.gradient_accumulation_steps or 1)})


# --- compiled steps: constants XLA must not fold ------------------------------------


def opaque_constants(values, reference):
    """The Python floats ``values`` as run-time scalars that XLA cannot fold, or None.

    XLA:CPU compiles each distinct small (scalar) fusion on its own and shares
    the code of identical ones. A constant multiplier folds into the scalar
    arithmetic of its variable's update (Adam's step size), so 54 distinct
    multipliers compile 54 distinct scalar kernels; the same multipliers read
    from buffers compile one. Returned by a conditional whose predicate XLA
    cannot decide (``reference == reference``), the values are such buffers,
    holding the same numbers: in ``reference``'s dtype, as a Python float is
    converted when multiplied by it. Were the predicate false (``reference``
    NaN), the values would be 0, and a product with ``reference`` is NaN
    either way. Only while jax.jit traces a step for XLA:CPU; None elsewhere:
    eagerly there is nothing to compile, TensorFlow + XLA compiled no faster,
    and XLA:GPU runs a conditional by reading its predicate back to the host,
    a wait on every step that folded constants do not have.
    """
    reference = getattr(reference, "value", reference)
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        if not isinstance(reference, jax.core.Tracer) or reference.ndim != 0:
            return None
        if jax.default_backend() != "cpu":
            return None
        constants = tuple(jnp.asarray(v, reference.dtype) for v in values)
        zeros = tuple(jnp.zeros((), reference.dtype) for _ in values)
        undecidable = reference == reference  # noqa: PLR0124 (false only for NaN, unknown to XLA)
        return dict(zip(values, jax.lax.cond(undecidable, lambda: constants, lambda: zeros)))
    return None


def hold_until_updated(opaque: dict, variable) -> None:
    """Reads the run-time constants of ``opaque_constants`` once more, in ``variable``'s update.

    Read only by the step sizes, each of those four-byte buffers dies as soon
    as its step size is computed, and XLA:CPU puts the next step size there;
    its thunk executor then orders the step-size kernels one after another (a
    false dependency through that memory), about +20% on a two-thread
    optimizer step at 54 multipliers (``benchmarks/jax_constants.py``,
    ``cond_kept``). Read again at the end, they stay alive and nothing is put
    there. ``variable * (1 + 0 * min)`` is ``variable`` exactly: the
    multipliers are finite numbers >= 0, so the factor is exactly 1 (were
    they all inf in the learning rate's dtype, every rate is inf already).
    """
    import jax.numpy as jnp

    factor = 1 + 0 * functools.reduce(jnp.minimum, opaque.values())
    variable.assign(variable * jnp.asarray(factor, variable.dtype))


# --- weight decay -----------------------------------------------------------------------
# Keras: BaseOptimizer._apply_weight_decay / _use_weight_decay; Muon._should_use_adamw (checked
#   with 3.15.1 and 3.16 nightly). Caught by: tests/test_equivalence.py,
#   tests/test_training.py::test_exclude_from_weight_decay_is_still_honoured.


def base_weight_decay(inner, variable):
    """The weight decay Keras would apply to ``variable``, or None."""
    should_use_adamw = getattr(inner, "_should_use_adamw", None)  # Muon
    if should_use_adamw is not None and should_use_adamw(variable):
        base = inner.adam_weight_decay
    else:
        base = inner.weight_decay
    # Checked first: asking Keras creates its exclusion cache (and, under
    # torch.compile, one more recompile) even when there is no decay at all.
    if base is None or not inner._use_weight_decay(variable):
        return None
    return base


def uses_weight_decay(inner, variable) -> bool:
    return inner._use_weight_decay(variable)


# --- EMA ------------------------------------------------------------------------------
# Keras: BaseOptimizer._model_variables_moving_average / _update_model_variables_moving_average
#   (checked with 3.15.1 and 3.16 nightly). Caught by:
#   tests/test_late_start.py::test_ema_average_of_a_late_variable_starts_at_its_own_first_step,
#   tests/test_drop_in.py::test_swap_ema_weights_with_a_wrapped_sub_optimizer_matches_plain_keras.


def moving_averages(optimizer) -> list:
    """The EMA averages, indexed like `trainable_variables` (empty without EMA)."""
    return getattr(optimizer, "_model_variables_moving_average", None) or []


def moving_average_of(optimizer, variable):
    """``variable``'s EMA average in ``optimizer``, or None."""
    index = optimizer._trainable_variables_indices.get(optimizer._var_key(variable))
    return None if index is None else optimizer._model_variables_moving_average[index]


# --- layers ---------------------------------------------------------------------------
# Keras: Layer._flatten_layers / Layer._trainable_variables / Functional._nodes_by_depth
#   (checked with 3.15.1 and 3.16 nightly). Caught by: tests/test_depth.py,
#   tests/test_presets.py, tests/test_rules.py.


def sublayers(layer, include_self: bool = True, recursive: bool = True) -> list:
    return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def created_trainable(layer) -> list:
    """The variables ``layer`` itself created trainable (still listed while it is frozen)."""
    return list(getattr(layer, "_trainable_variables", ()))


def created_trainable_ids(model) -> set[int]:
    """Ids of every variable created trainable in ``model`` (frozen layers' included)."""
    return {id(v) for layer in sublayers(model) for v in created_trainable(layer)}


def is_functional(model) -> bool:
    """Whether ``model`` has a functional graph (Functional and Sequential with an input)."""
    return hasattr(model, "_nodes_by_depth")


def nodes_by_depth(model) -> dict:
    return model._nodes_by_depth


def frozen_weights(model) -> list:
    """Weights that do not train now: frozen layers' and non-trainable ones (moving statistics)."""
    return model.non_trainable_weights


# --- MultiOptimizer -------------------------------------------------------------------
# Keras: MultiOptimizer._optimizer_map, called once per variable in build; values() lists the
#   sub-optimizers (checked with 3.15.1 and 3.16 nightly). Caught by: tests/test_multi.py.


def routing_of(multi):
    """What a Keras ``MultiOptimizer`` was constructed with (our router, for `multi_optimizer`)."""
    return multi._optimizer_map


# --- what reporting reads -------------------------------------------------------------


def first_moment_slots(optimizer) -> tuple[list | None, float] | None:
    """(the first-moment slot of each variable, the moment's decay), or None without one.

    Adam, AdamW, Nadam, Lamb, Adamax and Lion update ``m <- beta * m + (1 - beta) * g``;
    the slots are None before the optimizer is built.
    """
    # Keras: first-moment slots: Adam/Nadam/Lamb/Lion `_momentums`, Adamax `_m` (checked
    #   with 3.15.1 and 3.16 nightly). Caught by: tests/test_updates.py.
    opts = keras.optimizers
    if isinstance(optimizer, opts.Lion):
        name, beta = "_momentums", optimizer.beta_2
    elif isinstance(optimizer, opts.Adamax):
        name, beta = "_m", optimizer.beta_1
    elif isinstance(optimizer, (opts.Adam, opts.Nadam, opts.Lamb)):
        name, beta = "_momentums", optimizer.beta_1
    else:
        return None
    return getattr(optimizer, name, None) or None, float(beta)


def jax_training_state(model) -> dict | None:
    """The training state ``fit`` keeps outside the variables during a JAX epoch, or None."""
    # Keras: JAXTrainer._jax_state / _jax_state_synced (checked with 3.15.1 and 3.16 nightly).
    #   Caught by: tests/test_updates.py.
    if keras.backend.backend() != "jax":
        return None
    state = getattr(model, "_jax_state", None)
    return state if state and not getattr(model, "_jax_state_synced", True) else None


def callback_model(callback):
    """The model of a callback, without the JAX state sync that ``Callback.model`` does."""
    # Keras: Callback._model (checked with 3.15.1 and 3.16 nightly). Caught by:
    #   tests/test_updates.py.
    return callback._model if keras.backend.backend() == "jax" else callback.model


def tensorboard_writer(tensorboard):
    """The summary writer a TensorBoard callback writes its training scalars to."""
    # Keras: TensorBoard._train_writer (checked with 3.15.1 and 3.16 nightly). Caught by:
    #   tests/test_drop_in.py::test_tensorboard_logs_every_learning_rate_as_for_plain_optimizers,
    #   tests/test_summary.py.
    return tensorboard._train_writer
