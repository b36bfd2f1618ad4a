"""The optimizer hook: how per-variable multipliers reach a Keras optimizer.

Keras hands every variable's update to ``update_step(gradient, variable,
learning_rate)`` with one global learning rate; that is the single per-variable
point all backends reach, so we wrap it on the inner optimizer instance and pass
``learning_rate * lr_mult``. Weight decay moves into the same hook (Keras applies
it to all variables before the updates, and each update reads only its own
variable and slots, so applying it just before the variable's own update is
equivalent). The torch backend swaps nine built-in optimizers for fused
``torch._foreach`` versions that bypass ``update_step``; for those we replace
``_parallel_update_step`` by the same fused arithmetic with a learning rate per
tensor (`_torch_fused`): one fused update per step, whatever the groups.

Gradients are never scaled: Adam-family optimizers are invariant to that.

Variables that start training late (unfrozen at step k, or held at 0 by a
schedule until step k) count their own steps from k, like a parameter added to
a torch optimizer with ``add_param_group`` at step k: while their update runs,
the optimizer's step counter reads ``iterations - k`` (Adam's bias correction,
Adafactor's decay, ScheduleFree's averaging weight...), and once-per-step state
such as Nadam's momentum product has a copy per start step. Variables that
start at step 0 take none of these detours.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import keras
from keras import ops

from layerlr.core import _keras
from layerlr.core._rules import Multiplier

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


def _late_start(inner, start: int, late_state: dict):
    """The context a late variable's update runs in: its own step and once-per-step state."""
    if not start:
        return contextlib.nullcontext()
    own = {name: variable for name, variable in late_state.get(start, {}).items()}
    if not own:
        return _keras.steps_counted_from(inner, start)
    stack = contextlib.ExitStack()
    stack.enter_context(_keras.steps_counted_from(inner, start))
    stack.enter_context(_keras.swapped(inner, own))
    return stack


def advance_late_state(inner, late_state: dict) -> None:
    """Advances each start step's copy of the once-per-step state, from its own step."""
    for start, state in late_state.items():
        for name, variable in state.items():
            local = inner.iterations - start
            advanced = _keras.ONCE_PER_STEP_STATE[name](inner, variable, local)
            inner.assign(variable, ops.where(ops.greater_equal(local, 0), advanced, variable.value))


def install(
    inner,
    lr_mults: Sequence[Multiplier],
    decay_mults: Sequence[Multiplier],
    start_steps: Sequence[int],
    late_state: dict,
) -> None:
    """Makes ``inner`` apply the multipliers, indexed like its trainable variables.

    ``inner`` must be built. Constant multipliers are Python floats, so compiled
    steps (tf.function, jax.jit, torch.compile) see them as constants; scheduled
    ones are evaluated at ``inner.iterations`` inside the step, so changing phase
    never retraces. ``start_steps`` are the steps at which each variable started
    training (Python ints, constants in the compiled step); ``late_state`` maps
    a nonzero start step to its copies of once-per-step state. Installing again
    (after the variable list grew) replaces the previous hook.
    """
    lr_mults = tuple(lr_mults)
    decay_mults = tuple(decay_mults)
    start_steps = tuple(int(s) for s in start_steps)
    keras_variables = tuple(_keras.trainable_variables(inner))
    originals = _keras.original_steps(inner)

    # Within one step (one `_backend_update_step` call: one trace when
    # compiled), each distinct multiplier's value and multiplied rate are
    # computed once and shared by its variables, not once per variable.
    step_cache: dict | None = None

    def cached(key, compute):
        if step_cache is None:
            return compute()
        if key not in step_cache:
            step_cache[key] = compute()
        return step_cache[key]

    def at_step(multiplier):
        if isinstance(multiplier, float):
            return multiplier
        return cached(("at", id(multiplier)), lambda: _at_step(multiplier, inner))

    def effective_decay(index: int):
        base = _keras.base_weight_decay(inner, keras_variables[index])
        decay_mult = decay_mults[index]
        if base is None or (isinstance(decay_mult, float) and decay_mult == 0.0):
            return None
        if isinstance(decay_mult, float):
            return base * decay_mult
        return cached(("wd", base, id(decay_mult)), lambda: base * at_step(decay_mult))

    def decay(variable, weight_decay, learning_rate):
        wd = ops.cast(weight_decay, variable.dtype)
        lr = ops.cast(learning_rate, variable.dtype)
        inner.assign(variable, variable - variable * wd * lr)

    def update_step(gradient, variable, learning_rate):
        # `variable` may be a per-replica tf.Variable under tf.distribute: look
        # it up by the optimizer's own key, never by path or id.
        index = _keras.variable_index(inner, variable)
        lr_mult = lr_mults[index]
        if isinstance(lr_mult, float) and lr_mult == 0.0:
            # Leave the variable and its slots untouched (Ftrl divides by lr).
            return None
        key = lr_mult if isinstance(lr_mult, float) else id(lr_mult)
        lr_mult = at_step(lr_mult)
        gate = (
            contextlib.nullcontext()
            if isinstance(lr_mult, float)
            else _writes_only_if(inner, cached(("on", key), lambda: ops.greater(lr_mult, 0)))
        )
        opaque = step_cache.get("opaque") if step_cache else None
        if opaque and isinstance(lr_mult, float) and lr_mult in opaque:
            lr_mult = opaque[lr_mult]  # the same value, read at run time
        source, scaled = cached(("lr", key), lambda: (learning_rate, _scaled(learning_rate, lr_mult)))
        learning_rate = scaled if source is learning_rate else _scaled(learning_rate, lr_mult)
        with gate:
            weight_decay = effective_decay(index)
            if weight_decay is not None:
                decay(variable, weight_decay, learning_rate)
            with _late_start(inner, start_steps[index], late_state):
                return originals["update_step"](gradient, variable, learning_rate)

    fused = originals["parallel_update_step"] is not None

    def backend_update_step(grads, variables, learning_rate):
        nonlocal step_cache
        # The fused torch step advances the state itself.
        if late_state and not (fused and not _keras.torch_compiling()):
            advance_late_state(inner, late_state)
        step_cache = {}
        # A local name: under tf.distribute each replica runs this in its own
        # thread, and another replica's `finally` may reset `step_cache` first.
        opaque = _keras.opaque_constants(constants, learning_rate) if len(constants) > 1 else None
        step_cache["opaque"] = opaque
        try:
            result = originals["backend_update_step"](grads, variables, learning_rate)
            if opaque and variables:
                # The first variable's gradient comes last in backpropagation,
                # so its update is among the last operations of a training step.
                _keras.hold_until_updated(opaque, variables[0])
            return result
        finally:
            step_cache = None

    # Distinct constant multipliers other than 0 and 1 (see `_keras.opaque_constants`).
    constants = tuple(sorted({m for m in lr_mults if isinstance(m, float) and m not in (0.0, 1.0)}))

    parallel_update_step = None
    if fused:
        grouped = _grouped_step(
            inner, originals["parallel_update_step"], lr_mults, decay_mults, start_steps,
            late_state, effective_decay, keras_variables,
        )
        from layerlr.core import _torch_fused

        per_tensor = _torch_fused.step_for(inner, originals["parallel_update_step"])
        parallel_update_step = grouped if per_tensor is None else _one_fused_step(
            inner, per_tensor, grouped, lr_mults, decay_mults, start_steps, late_state, keras_variables,
        )
    _keras.replace_steps(
        inner,
        update_step=update_step,
        backend_update_step=backend_update_step,
        parallel_update_step=parallel_update_step,
        # Keras' own EMA update is right when every variable starts at step 0.
        moving_average_update=functools.partial(_moving_average_from_own_start, inner, start_steps)
        if any(start_steps) else None,
    )


def _moving_average_from_own_start(inner, start_steps, trainable_variables) -> None:
    """Keras' EMA update, with "first step" meaning each variable's own first step.

    Keras sets the average to the variable at step 0; a variable that joins at
    step k gets the same at its step k (before it, the variable does not move
    and its average follows it).
    """
    for variable, average, start in zip(trainable_variables, _keras.moving_averages(inner), start_steps):
        if average is None:
            continue
        started = ops.greater(inner.iterations, start)
        momentum = ops.multiply(ops.cast(started, variable.dtype), inner.ema_momentum)
        average.assign(
            ops.add(ops.multiply(momentum, average), ops.multiply(ops.subtract(1, momentum), variable))
        )


def _one_fused_step(inner, per_tensor, grouped, lr_mults, decay_mults, start_steps, late_state,
                    keras_variables):
    """Torch fused optimizers: one fused update for all variables, a rate per tensor.

    ``per_tensor`` is the optimizer's step from `_torch_fused`. Its per-tensor
    rates and decay factors are computed on the host, once per distinct
    multiplier (and decay) per step. ``grouped`` (one fused call per group)
    takes over under torch.compile and for non-float32 variables, whose
    host arithmetic would have to mimic another dtype.
    """
    import numpy as np
    import torch

    from layerlr.core import _torch_fused

    plans: dict[tuple, tuple] = {}

    def plan_for(variables):
        key = tuple(map(id, variables))
        plan = plans.get(key)
        if plan is None:
            entries = []
            for position, variable in enumerate(variables):
                index = _keras.variable_index(inner, variable)
                lr_mult = lr_mults[index]
                if isinstance(lr_mult, float) and lr_mult == 0.0:
                    continue  # untouched, slots included
                decay_mult = decay_mults[index]
                decays = not (isinstance(decay_mult, float) and decay_mult == 0.0) and (
                    _keras.uses_weight_decay(inner, keras_variables[index]))
                entries.append((position, index, lr_mult, decay_mult if decays else None, start_steps[index]))
            float32 = all(str(v.dtype) == "float32" for v in variables)
            if len(plans) >= 16:
                plans.clear()
            # Holding the variables keeps their ids from being reused.
            plan = plans[key] = (tuple(variables), tuple(entries), float32)
        return plan

    def parallel_update_step(grads, variables, learning_rate):
        if torch.compiler.is_compiling():
            return grouped(grads, variables, learning_rate)
        _, entries, float32 = plan_for(variables)
        if not float32:
            return grouped(grads, variables, learning_rate)
        iterations = int(_item(inner.iterations))
        # float32 products, as `learning_rate * lr_mult` on a float32 tensor.
        lr = np.float32(_item(learning_rate))
        base_decay = inner.weight_decay
        scheduled: dict[int, np.float32] = {}

        def now(schedule):
            value = scheduled.get(id(schedule))
            if value is None:
                value = scheduled[id(schedule)] = np.float32(ops.convert_to_numpy(schedule(inner.iterations)))
            return value

        rate_of: dict = {}
        factor_of: dict = {}
        step_grads, values, indices, rates, starts = [], [], [], [], []
        decayed, factors = [], []
        for position, index, lr_mult, decay_mult, start in entries:
            if isinstance(lr_mult, float):
                key = (True, lr_mult)
                rate = rate_of.get(key)
                if rate is None:
                    rate = rate_of[key] = lr if lr_mult == 1.0 else lr * np.float32(lr_mult)
            else:
                key = (False, id(lr_mult))
                multiplier = now(lr_mult)
                if multiplier == 0.0:
                    # A scheduled 0 skips the variable on the host, like a constant 0.
                    continue
                rate = rate_of.get(key)
                if rate is None:
                    rate = rate_of[key] = lr * multiplier
            value = variables[position].value
            if decay_mult is not None and base_decay is not None:
                decay_key = (key, decay_mult if isinstance(decay_mult, float) else id(decay_mult))
                factor = factor_of.get(decay_key)
                if factor is None:
                    if isinstance(decay_mult, float):
                        weight_decay = np.float32(base_decay * decay_mult)
                    else:
                        weight_decay = np.float32(base_decay) * now(decay_mult)
                    factor = factor_of[decay_key] = float(_torch_fused.ONE - weight_decay * rate)
                decayed.append(value)
                factors.append(factor)
            step_grads.append(grads[position])
            values.append(value)
            indices.append(index)
            rates.append(rate)
            starts.append(start)
        if decayed:
            _keras.torch_foreach().mul_(decayed, factors)
        per_tensor(inner, step_grads, values, indices, rates, starts, iterations, late_state, torch.float32)

    return parallel_update_step


def _item(value):
    """A Keras variable's, tensor's or number's value as a Python number (torch)."""
    value = getattr(value, "value", value)
    return value.item() if hasattr(value, "item") else value


def _grouped_step(inner, fused_step, lr_mults, decay_mults, start_steps, late_state,
                  effective_decay, keras_variables):
    """Torch fused optimizers: one fused update per (lr_mult, decay, start step) group.

    For subclasses of the fused optimizers (whose step `_torch_fused` does not
    mirror), non-float32 variables and torch.compile.
    """
    import torch

    def parallel_update_step(grads, variables, learning_rate):
        if torch.compiler.is_compiling():
            # Inductor fuses per-variable ops by itself, while per-group fused
            # calls would recompile once per group at any graph break inside
            # them. Take the per-variable path (our update_step hook), as on
            # TF and JAX; Nadam's product still advances once per step.
            advance_late_state(inner, late_state)
            return _keras.per_variable_update_step(inner, grads, variables, learning_rate)
        groups = _groups(inner, grads, variables, lr_mults, decay_mults, start_steps, keras_variables)
        # Once-per-step state (Nadam's product) is advanced inside the fused
        # step: each group must start from its value before this step.
        state = {0: _own_once_per_step_state(inner), **late_state}
        before = {id(v): torch.clone(v.value) for per_start in state.values() for v in per_start.values()}
        advanced: set[int] = set()
        for (lr_mult, _, _, start), (group_grads, group_vars, indices) in groups.items():
            lr_mult = _at_step(lr_mult, inner)
            # Eager torch: a scheduled multiplier at 0 skips its group on the host.
            if not isinstance(lr_mult, float) and float(lr_mult) == 0.0:
                continue
            _restore(state.get(start, {}), before)
            rate = _scaled(learning_rate, lr_mult)
            weight_decay = effective_decay(indices[0])
            if weight_decay is not None:
                factor = ops.cast(1 - weight_decay * rate, group_vars[0].dtype)
                _keras.torch_foreach().mul_([v.value for v in group_vars], factor)
            with _late_start(inner, start, late_state):
                fused_step(group_grads, group_vars, rate)
            advanced.add(start)
        # As on TF and JAX, the state advances every step, trained or not.
        untrained = {s: per_start for s, per_start in state.items() if s not in advanced and per_start}
        if 0 in untrained:
            _restore(untrained[0], before)
        advance_late_state(inner, untrained)

    return parallel_update_step


def _groups(inner, grads, variables, lr_mults, decay_mults, start_steps, keras_variables) -> dict:
    """``{(lr_mult, decay_mult, no decay, start step): (grads, variables, indices)}``.

    Schedules group by identity, equal constants together; a constant 0 is
    left out (variable and slots untouched).
    """
    groups: dict[tuple, tuple[list, list, list]] = {}
    for grad, variable in zip(grads, variables):
        index = _keras.variable_index(inner, variable)
        lr_mult = lr_mults[index]
        if isinstance(lr_mult, float) and lr_mult == 0.0:
            continue
        no_decay = _keras.base_weight_decay(inner, keras_variables[index]) is None
        key = (lr_mult, decay_mults[index], no_decay, start_steps[index])
        group = groups.setdefault(key, ([], [], []))
        group[0].append(grad)
        group[1].append(variable)
        group[2].append(index)
    return groups


def _restore(state: dict, before: dict) -> None:
    for variable in state.values():
        variable.assign(before[id(variable)])


def _own_once_per_step_state(inner) -> dict:
    """The optimizer's own once-per-step state (Nadam's product), by attribute name."""
    return {name: getattr(inner, name) for name in _keras.ONCE_PER_STEP_STATE if hasattr(inner, name)}
