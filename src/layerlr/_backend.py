"""Keras and backend internals we depend on, in one place.

Everything here touches private Keras behaviour or backend specifics (tracking
switches, AutoGraph, tracing state, the call stack); keeping it together keeps
the rest of layerlr backend-neutral and shows what to re-check on a Keras upgrade.
"""

from __future__ import annotations

import contextlib
import inspect

import keras
from keras import ops


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
    frame = inspect.currentframe()
    try:
        for _ in range(30):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.Layer) and wanted <= {id(w) for w in owner.weights}:
                return owner
    finally:
        del frame
    return None


def _nadam_momentum_product_step(inner, product, local_iterations):
    # keras.optimizers.Nadam._backend_update_step (checked: Keras 3.15.1), at
    # the variable's own step.
    dtype = product.dtype
    return product * inner.beta_1 * (1.0 - 0.5 * ops.power(0.96, ops.cast(local_iterations + 1, dtype)))


# Optimizer state that Keras advances once per step rather than per variable,
# by attribute name, with its one-step update. A variable that starts training
# late needs its own copy, advanced from its own first step.
ONCE_PER_STEP_STATE = {"_u_product": _nadam_momentum_product_step}


def torch_compiling() -> bool:
    if keras.backend.backend() != "torch":
        return False
    import torch

    return torch.compiler.is_compiling()


def per_variable_update_step(inner, grads, variables, learning_rate):
    """The base (non-fused) step of a torch fused optimizer: update_step per variable."""
    from keras.src.backend.torch.optimizers.torch_parallel_optimizer import TorchParallelOptimizer

    return super(TorchParallelOptimizer, inner)._backend_update_step(grads, variables, learning_rate)


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


def follow_outer_loss_scale(model, optimizer) -> None:
    """Keeps a LossScaleOptimizer around ``optimizer`` on the same variable list.

    It unscales gradients zipped with its own `_trainable_variables`, fixed
    when it was built: after the inner list changed (unfreezing), surplus
    gradients would be dropped.
    """
    outer = getattr(model, "optimizer", None) if model is not None else None
    if not isinstance(outer, keras.optimizers.LossScaleOptimizer) or outer.inner_optimizer is not optimizer:
        return
    if not outer.built:
        return
    variables = list(optimizer._trainable_variables)
    # Through __dict__: attribute assignment would track the model's
    # variables as the outer optimizer's own state.
    outer.__dict__["_trainable_variables"] = variables
    outer.__dict__["_trainable_variables_indices"] = {outer._var_key(v): i for i, v in enumerate(variables)}


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
    either way. Only while jax.jit traces a step; None elsewhere (eagerly
    there is nothing to compile, and TensorFlow + XLA compiled no faster).
    """
    reference = getattr(reference, "value", reference)
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        if not isinstance(reference, jax.core.Tracer) or reference.ndim != 0:
            return None
        constants = tuple(jnp.asarray(v, reference.dtype) for v in values)
        zeros = tuple(jnp.zeros((), reference.dtype) for _ in values)
        undecidable = reference == reference  # noqa: PLR0124 (false only for NaN, unknown to XLA)
        return dict(zip(values, jax.lax.cond(undecidable, lambda: constants, lambda: zeros)))
    return None
