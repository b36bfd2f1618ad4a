"""The optimizer hook: how per-variable multipliers reach a Keras optimizer.

Keras hands every variable's update to ``update_step(gradient, variable,
learning_rate)`` with one global learning rate; that is the single per-variable
point all backends reach, so we wrap it on the inner optimizer instance and pass
``learning_rate * lr_mult``. Weight decay moves into the same hook (Keras applies
it to all variables before the updates, and each update reads only its own
variable and slots, so applying it just before the variable's own update is
equivalent). The torch backend swaps nine built-in optimizers for fused
``torch._foreach`` versions that bypass ``update_step``; for those we wrap
``_parallel_update_step`` and run it once per group of equal multipliers.

Gradients are never scaled: Adam-family optimizers are invariant to that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import keras
from keras import ops

from layerlr._rules import Multiplier

# Optimizer state advanced once per step inside the fused torch step rather
# than per variable (Nadam's running momentum product). Running the fused step
# once per group must not advance it more than once.
_ONCE_PER_STEP_STATE = ("_u_product",)


def _base_weight_decay(inner, variable):
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


def _at_step(value: Multiplier, inner):
    """A multiplier's value now: floats stay Python constants, schedules run in-graph."""
    return value if isinstance(value, float) else value(inner.iterations)


def _scaled(learning_rate, lr_mult):
    return learning_rate if isinstance(lr_mult, float) and lr_mult == 1.0 else learning_rate * lr_mult


@contextlib.contextmanager
def _writes_only_if(inner, active):
    """Makes every state write of the inner optimizer conditional on ``active``.

    A scheduled multiplier that is 0 at this step must leave the variable and
    its slots untouched, like a constant 0 does, but inside a compiled step it
    is a tensor: gate the writes rather than branch. All built-in optimizers
    write state through ``self.assign*`` (their documented contract).
    """
    assign, assign_add, assign_sub = inner.assign, inner.assign_add, inner.assign_sub

    def _kept(variable):
        return variable.value if isinstance(variable, keras.Variable) else variable

    inner.assign = lambda v, x: assign(v, ops.where(active, ops.convert_to_tensor(x), _kept(v)))
    inner.assign_add = lambda v, x: assign_add(v, ops.where(active, ops.convert_to_tensor(x), 0))
    inner.assign_sub = lambda v, x: assign_sub(v, ops.where(active, ops.convert_to_tensor(x), 0))
    try:
        yield
    finally:
        del inner.assign, inner.assign_add, inner.assign_sub


def install(inner, lr_mults: Sequence[Multiplier], decay_mults: Sequence[Multiplier]) -> None:
    """Makes ``inner`` apply the multipliers, indexed like its trainable variables.

    ``inner`` must be built. Constant multipliers are Python floats, so compiled
    steps (tf.function, jax.jit, torch.compile) see them as constants; scheduled
    ones are evaluated at ``inner.iterations`` inside the step, so changing phase
    never retraces. Installing again (after the variable list grew) replaces the
    previous hook.
    """
    lr_mults = tuple(lr_mults)
    decay_mults = tuple(decay_mults)
    keras_variables = tuple(inner._trainable_variables)
    originals = inner.__dict__.setdefault(
        "_layerlr_originals",
        {"update_step": inner.update_step,
         "_parallel_update_step": getattr(inner, "_parallel_update_step", None)},
    )

    def effective_decay(index: int):
        base = _base_weight_decay(inner, keras_variables[index])
        decay_mult = decay_mults[index]
        if base is None or (isinstance(decay_mult, float) and decay_mult == 0.0):
            return None
        return base * _at_step(decay_mult, inner)

    def decay(variable, weight_decay, learning_rate):
        wd = ops.cast(weight_decay, variable.dtype)
        lr = ops.cast(learning_rate, variable.dtype)
        inner.assign(variable, variable - variable * wd * lr)

    def update_step(gradient, variable, learning_rate):
        # `variable` may be a per-replica tf.Variable under tf.distribute: look
        # it up by the optimizer's own key, never by path or id.
        index = inner._get_variable_index(variable)
        lr_mult = lr_mults[index]
        if isinstance(lr_mult, float) and lr_mult == 0.0:
            # Leave the variable and its slots untouched (Ftrl divides by lr).
            return None
        lr_mult = _at_step(lr_mult, inner)
        gate = (
            contextlib.nullcontext()
            if isinstance(lr_mult, float)
            else _writes_only_if(inner, ops.greater(lr_mult, 0))
        )
        learning_rate = _scaled(learning_rate, lr_mult)
        with gate:
            weight_decay = effective_decay(index)
            if weight_decay is not None:
                decay(variable, weight_decay, learning_rate)
            return originals["update_step"](gradient, variable, learning_rate)

    inner.update_step = update_step
    inner._apply_weight_decay = lambda variables: None

    if originals["_parallel_update_step"] is not None:
        inner._parallel_update_step = _grouped_step(
            inner, originals["_parallel_update_step"], lr_mults, decay_mults, effective_decay,
            keras_variables,
        )


def _grouped_step(inner, fused_step, lr_mults, decay_mults, effective_decay, keras_variables):
    """Torch fused optimizers: one fused update per (lr_mult, decay_mult, decayed?) group."""
    import torch

    def parallel_update_step(grads, variables, learning_rate):
        if torch.compiler.is_compiling():
            # Inductor fuses per-variable ops by itself, while per-group fused
            # calls would recompile once per group at any graph break inside
            # them. Take the per-variable path (our update_step hook), as on
            # TF and JAX; Nadam's product still advances once per step.
            from keras.src.backend.torch.optimizers.torch_parallel_optimizer import (
                TorchParallelOptimizer,
            )

            return super(TorchParallelOptimizer, inner)._backend_update_step(
                grads, variables, learning_rate
            )
        groups: dict[tuple, tuple[list, list, list]] = {}
        for grad, variable in zip(grads, variables):
            index = inner._get_variable_index(variable)
            lr_mult = lr_mults[index]
            if isinstance(lr_mult, float) and lr_mult == 0.0:
                continue
            # Schedules group by identity; equal constants group together.
            no_decay = _base_weight_decay(inner, keras_variables[index]) is None
            key = (lr_mult, decay_mults[index], no_decay)
            group = groups.setdefault(key, ([], [], []))
            group[0].append(grad)
            group[1].append(variable)
            group[2].append(index)

        once_per_step = {
            name: torch.clone(getattr(inner, name).value)
            for name in _ONCE_PER_STEP_STATE
            if hasattr(inner, name)
        }
        ran = False
        for (lr_mult, _, _), (group_grads, group_vars, indices) in groups.items():
            lr_mult = _at_step(lr_mult, inner)
            # Eager torch: a scheduled multiplier at 0 skips its group on the host.
            if not isinstance(lr_mult, float) and float(lr_mult) == 0.0:
                continue
            for name, value in once_per_step.items():
                getattr(inner, name).assign(value)
            rate = _scaled(learning_rate, lr_mult)
            weight_decay = effective_decay(indices[0])
            if weight_decay is not None:
                factor = ops.cast(1 - weight_decay * rate, group_vars[0].dtype)
                torch._foreach_mul_([v.value for v in group_vars], factor)
            fused_step(group_grads, group_vars, rate)
            ran = True
        if not ran and once_per_step:
            _advance_once_per_step_state(inner, learning_rate)

    return parallel_update_step


def _advance_once_per_step_state(inner, learning_rate) -> None:
    """No group ran this step: advance Nadam's product as TF/JAX do."""
    keras.optimizers.Nadam._backend_update_step(inner, [], [], learning_rate)
