"""Keras and backend internals we depend on, in one place.

Everything here touches private Keras behaviour or backend specifics (tracking
switches, AutoGraph, tracing state, the call stack); keeping it together keeps
the rest of layerlr backend-neutral and shows what to re-check on a Keras upgrade.
"""

from __future__ import annotations

import contextlib
import inspect

import keras


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
