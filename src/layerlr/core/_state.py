"""Growing an optimizer's state to newly trainable variables, losing nothing.

Keras optimizers are built once for a fixed variable list; unfreezing a layer
later means "Unknown variable" or a fresh optimizer that forgets every moment.
Built-in optimizers keep per-variable state in lists indexed like their
trainable variables (``_momentums[i]``, ``_velocities[i]``, EMA averages,
gradient accumulators...) and global state in single variables (Nadam's
``_u_product``); rebuilding over ``old + new`` variables and copying every such
value back keeps the old state exactly and gives the new variables fresh slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from layerlr.core import _keras
from layerlr.core._keras import ONCE_PER_STEP_STATE


def _per_variable_lists(inner, count: int) -> dict[str, list]:
    lists = {}
    for name, value in vars(inner).items():
        if name in _keras.NOT_PER_VARIABLE_STATE or isinstance(value, (str, bytes)):
            continue
        if not isinstance(value, Sequence) or len(value) != count:
            continue
        items = list(value)
        if any(isinstance(v, keras.Variable) for v in items) and all(
            v is None or isinstance(v, keras.Variable) for v in items
        ):
            lists[name] = items
    return lists


def _global_variables(inner) -> dict[str, keras.Variable]:
    keep = _keras.counter_and_rate(inner)
    return {
        name: value
        for name, value in vars(inner).items()
        if isinstance(value, keras.Variable) and not any(value is k for k in keep)
    }


def grow(inner, new_variables: Sequence) -> None:
    """Rebuilds the built optimizer ``inner`` over its variables plus ``new_variables``.

    Existing per-variable and global state is copied into the rebuilt state;
    the step counter and learning-rate variable are kept as they are.
    """
    old_variables = list(_keras.trainable_variables(inner))
    per_variable = _per_variable_lists(inner, len(old_variables))
    global_state = _global_variables(inner)
    untracked = _untrack_all_but_counter_and_rate(inner)
    inner.built = False
    inner.build(old_variables + list(new_variables))
    carried = set()
    for name, old in per_variable.items():
        for before, after in zip(old, getattr(inner, name)):
            if before is not None:
                after.assign(before)
                carried.add(id(before))
    for name, before in global_state.items():
        after = getattr(inner, name, None)
        if isinstance(after, keras.Variable) and after is not before:
            after.assign(before)
            carried.add(id(before))
    # State we do not recognise (a subclass's own bookkeeping) stays as it was
    # rather than being dropped from `.variables` (and from saving).
    current = {id(v) for v in _keras.own_variables(inner)}
    for variable in untracked:
        if id(variable) not in carried and id(variable) not in current:
            _keras.track(inner, variable)
    # A new variable's moving average starts at its value, not at 0: swapping
    # in EMA weights before (or right after) its first step must not shrink it.
    averages = _keras.moving_averages(inner) if inner.use_ema else None
    if averages:
        for variable, average in zip(new_variables, averages[len(old_variables):]):
            if average is not None:
                average.assign(variable)


def _untrack_all_but_counter_and_rate(inner) -> list:
    keep = _keras.counter_and_rate(inner)
    untracked = [v for v in _keras.own_variables(inner) if not any(v is k for k in keep)]
    for variable in untracked:
        _keras.untrack(inner, variable)
    return untracked


def rebuild(inner, variables: Sequence) -> None:
    """Builds ``inner`` afresh over ``variables``, dropping all its state.

    For an optimizer that has not taken a step yet: its state is still the
    initial one, and variables frozen before training must hold no slots.
    """
    _untrack_all_but_counter_and_rate(inner)
    inner.__dict__.pop("_layerlr_late_state", None)
    _keras.forget_variable_order(inner)
    inner.built = False
    inner.build(list(variables))


def late_state(inner, start_steps: Sequence[int]) -> dict[int, dict[str, keras.Variable]]:
    """Each nonzero start step's own copy of the once-per-step state (Nadam's product).

    Created on first need, in order of first appearance, so that a rebuild
    from the saved multipliers creates them in the order they were saved in.
    """
    state = inner.__dict__.setdefault("_layerlr_late_state", {})
    names = [n for n in ONCE_PER_STEP_STATE if isinstance(getattr(inner, n, None), keras.Variable)]
    if not names:
        return state
    for start in start_steps:
        if start and start not in state:
            state[start] = {
                name: inner.add_variable(
                    shape=(), initializer="ones", dtype=getattr(inner, name).dtype,
                    name=f"{name.strip('_')}_from_step_{start}",
                )
                for name in names
            }
    return state
