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

# Lists that hold variables but are not per-variable optimizer state.
_NOT_STATE = ("_variables", "_trainable_variables")


def _per_variable_lists(inner, count: int) -> dict[str, list]:
    lists = {}
    for name, value in vars(inner).items():
        if name in _NOT_STATE or isinstance(value, (str, bytes)):
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
    keep = (inner._iterations, getattr(inner, "_learning_rate", None))
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
    old_variables = list(inner._trainable_variables)
    per_variable = _per_variable_lists(inner, len(old_variables))
    global_state = _global_variables(inner)
    keep = (inner._iterations, getattr(inner, "_learning_rate", None))
    untracked = [v for v in inner._variables if not any(v is k for k in keep)]
    for variable in untracked:
        inner._untrack_variable(variable)
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
    current = {id(v) for v in inner._variables}
    for variable in untracked:
        if id(variable) not in carried and id(variable) not in current:
            inner._track_variable(variable)
