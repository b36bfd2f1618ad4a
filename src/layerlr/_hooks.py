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

from collections.abc import Sequence

from keras import ops

# Optimizer state advanced once per step inside the fused torch step rather
# than per variable (Nadam's running momentum product). Running the fused step
# once per group must not advance it more than once.
_ONCE_PER_STEP_STATE = ("_u_product",)


def _base_weight_decay(inner, variable):
    """The weight decay Keras would apply to ``variable``, or None."""
    if not inner._use_weight_decay(variable):
        return None
    should_use_adamw = getattr(inner, "_should_use_adamw", None)  # Muon
    if should_use_adamw is not None and should_use_adamw(variable):
        return inner.adam_weight_decay
    return inner.weight_decay


def _group_rate(learning_rate, lr_mult: float):
    return learning_rate if lr_mult == 1.0 else learning_rate * lr_mult


def _decay_in_place(variable, weight_decay: float, learning_rate):
    wd = ops.cast(weight_decay, variable.dtype)
    lr = ops.cast(learning_rate, variable.dtype)
    variable.assign(variable - variable * wd * lr)


def install(inner, lr_mults: Sequence[float], decay_mults: Sequence[float]) -> None:
    """Makes ``inner`` apply the multipliers, indexed like its trainable variables.

    ``inner`` must be built. Multipliers are plain floats, so compiled steps
    (tf.function, jax.jit, torch.compile) see them as constants and never retrace.
    """
    lr_mults = tuple(lr_mults)
    decay_mults = tuple(decay_mults)
    keras_variables = tuple(inner._trainable_variables)

    def effective_decay(index: int):
        base = _base_weight_decay(inner, keras_variables[index])
        if base is None or decay_mults[index] == 0.0:
            return None
        return base * decay_mults[index]

    original_update_step = inner.update_step

    def update_step(gradient, variable, learning_rate):
        # `variable` may be a per-replica tf.Variable under tf.distribute: look
        # it up by the optimizer's own key, never by path or id.
        index = inner._get_variable_index(variable)
        lr_mult = lr_mults[index]
        if lr_mult == 0.0:
            # Leave the variable and its slots untouched (Ftrl divides by lr).
            return None
        learning_rate = _group_rate(learning_rate, lr_mult)
        weight_decay = effective_decay(index)
        if weight_decay is not None:
            _decay_in_place(variable, weight_decay, learning_rate)
        return original_update_step(gradient, variable, learning_rate)

    inner.update_step = update_step
    inner._apply_weight_decay = lambda variables: None

    if hasattr(inner, "_parallel_update_step"):
        _install_grouped(inner, lr_mults, effective_decay)


def _install_grouped(inner, lr_mults, effective_decay) -> None:
    """Torch fused optimizers: one fused update per (lr_mult, weight decay) group."""
    import torch

    original_parallel_step = inner._parallel_update_step

    def parallel_update_step(grads, variables, learning_rate):
        groups: dict[tuple[float, float | None], tuple[list, list]] = {}
        for grad, variable in zip(grads, variables):
            index = inner._get_variable_index(variable)
            if lr_mults[index] == 0.0:
                continue
            key = (lr_mults[index], effective_decay(index))
            group_grads, group_vars = groups.setdefault(key, ([], []))
            group_grads.append(grad)
            group_vars.append(variable)

        once_per_step = {
            name: torch.clone(getattr(inner, name).value)
            for name in _ONCE_PER_STEP_STATE
            if hasattr(inner, name)
        }
        if not groups and once_per_step:
            _advance_once_per_step_state(inner, learning_rate)
            return
        for (lr_mult, weight_decay), (group_grads, group_vars) in groups.items():
            for name, value in once_per_step.items():
                getattr(inner, name).assign(value)
            rate = _group_rate(learning_rate, lr_mult)
            if weight_decay is not None:
                torch._foreach_mul_(
                    [v.value for v in group_vars], 1 - weight_decay * rate
                )
            original_parallel_step(group_grads, group_vars, rate)

    inner._parallel_update_step = parallel_update_step


def _advance_once_per_step_state(inner, learning_rate) -> None:
    """Every variable is at lr_mult 0: advance Nadam's product as on TF/JAX."""
    import keras

    keras.optimizers.Nadam._backend_update_step(inner, [], [], learning_rate)
