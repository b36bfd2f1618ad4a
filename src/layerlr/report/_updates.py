"""How far each group of weights moves in one training step (`UpdateLogger`).

Everything here reads the model and its optimizer from outside the compiled
training step, on the steps being measured only: a copy of every trained
weight before the step, another after it, and the norms computed on the host
in float64. Nothing runs inside the training step, so training is exactly what
it is without the logger.

Groups are the learning-rate groups of a `LayerwiseOptimizer` (one per
``lr_mult`` rule, told apart by rule identity, ``default`` for the unmatched
variables: the groups of `LearningRateLogger`, `layerlr.summary` and the
plots), the sub-optimizers of a ``MultiOptimizer``, ``default`` for a plain
optimizer, or one group per layer.

The gradient norm is read back from the optimizer's own state: Adam, AdamW,
Nadam, Lamb, Adamax and Lion keep a first moment that each step updates as
``m <- beta * m + (1 - beta) * g``, so the gradient the step used (after
clipping and loss-scale unscaling) is ``(m_after - beta * m_before) / (1 -
beta)``, exactly, from the same two snapshots. Other optimizers keep no such
state; their gradient norm is NaN.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import keras
import numpy as np

from layerlr.core import _keras
from layerlr.core._optimizer import LayerwiseOptimizer
from layerlr.interop._multi import SelectorMultiOptimizer
from layerlr.report import _summary

TRAINED = "trained"
FROZEN = "frozen"
NOT_UPDATED = "not updated"
METRICS = ("update_ratio", "weight_norm", "grad_norm")


def _unwrap(optimizer):
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer


def _slot_holder(optimizer):
    """The optimizer object whose lists are indexed like its variables."""
    return optimizer.inner_optimizer if isinstance(optimizer, LayerwiseOptimizer) else optimizer


def _host(value) -> np.ndarray:
    """A float64 copy on the host. A copy, always: torch shares CPU memory with
    numpy and updates in place, JAX reuses donated buffers."""
    return np.array(np.asarray(value), dtype=np.float64, copy=True)


def settle(model) -> None:
    """Waits for the training steps already dispatched to finish (JAX only).

    JAX dispatches ``fit``'s steps asynchronously: by the time a callback runs,
    the host may be tens of steps ahead of the computation, and the first read
    of a weight waits for all of them. That wait is not work the logger adds
    (``fit`` waits for the same steps at the end of the epoch); doing it here,
    in one place, keeps it apart from the reads, which then take well under a
    millisecond. TensorFlow and torch on CPU run each step to completion
    before the callbacks, and their reads synchronise by themselves.
    """
    if keras.backend.backend() != "jax":
        return
    import jax

    state = _keras.jax_training_state(model)
    if state is not None:
        # Plain lists: Keras' TrackedList is no pytree, block_until_ready would skip it.
        arrays = [*(state.get("trainable_variables") or ()), *(state.get("optimizer_variables") or ())]
    else:
        arrays = [v.value for v in [*model.trainable_variables, *model.optimizer.variables]]
    jax.block_until_ready(arrays)


def _copy(variable) -> np.ndarray:
    value = variable.value
    if keras.backend.backend() != "jax":
        value = keras.ops.convert_to_numpy(value)
    return _host(value)


def _values(model, variables) -> list[np.ndarray]:
    """float64 copies of the variables' values now (`settle` first, on JAX).

    On JAX, ``fit`` keeps the training state outside the variables during an
    epoch; reading a variable would first write the whole state back into every
    variable (``jax_state_sync``) and make the next step fetch it all again. So
    the values come straight from that state.
    """
    state = _keras.jax_training_state(model)
    if state is not None:
        arrays: dict[int, object] = {}
        for refs, values in (
            (model.trainable_variables, state.get("trainable_variables")),
            (model.optimizer.variables, state.get("optimizer_variables")),
        ):
            if values:
                arrays.update((id(r), v) for r, v in zip(refs, values))
        if all(id(v) in arrays for v in variables):
            return [_host(arrays[id(v)]) for v in variables]
    return [_copy(v) for v in variables]


def _sq(x: np.ndarray) -> float:
    # Not np.dot: BLAS threads fight the backend's own threads for the cores.
    return float(np.square(x).sum())


@dataclass
class Layout:
    """Which variables form which group, for one optimizer and trainable set."""

    optimizer: object
    trainable_key: tuple
    groups: dict[str, list] = field(default_factory=dict)  # name -> variables created trainable
    trained: set[int] = field(default_factory=set)  # ids of the variables trained now
    # The optimizer that holds each trained variable (for its first moment).
    holders: dict[int, object] = field(default_factory=dict)


def _dedupe(names: list[str]) -> list[str]:
    return _summary._dedupe(names, set())


def _created_trainable_in_depth_order(model) -> list[tuple]:
    created = _keras.created_trainable_ids(model)
    return [(v, layer) for v, layer in _summary._variables_in_depth_order(model) if id(v) in created]


def _sub_optimizer_of(multi, variable, subs, routes):
    for i, sub in enumerate(subs):
        if _keras.knows(sub, variable):
            return i
    if id(variable) in routes:  # layerlr's multi_optimizer, not built yet
        return routes[id(variable)]
    try:  # frozen variables, Keras' OptimizerMap: where the routing would send them
        routed = _keras.routing_of(multi)(variable)
    except Exception:  # noqa: BLE001 - layerlr's router refuses unknown variables
        return None
    return next((i for i, sub in enumerate(subs) if sub is routed), None)


def build_layout(model, groups: str | None) -> Layout:
    optimizer = _unwrap(model.optimizer)
    trainable = list(model.trainable_variables)
    layout = Layout(optimizer, tuple(id(v) for v in trainable), trained={id(v) for v in trainable})
    pairs = _created_trainable_in_depth_order(model)
    names: list[tuple] = []  # (variable, group)
    if groups == "layers":
        layer_names: dict[int, str] = {}
        unique = _dedupe([layer.name for layer in dict((id(l), l) for _, l in pairs).values()])
        for layer_id, name in zip(dict((id(l), l) for _, l in pairs), unique):
            layer_names[layer_id] = name
        names = [(v, layer_names[id(layer)]) for v, layer in pairs]
    elif isinstance(optimizer, LayerwiseOptimizer):
        by_id = {id(a.variable): a.multipliers for a in optimizer.resolve(model)}
        entries = [by_id.get(id(v)) for v, _ in pairs]
        names = [
            (v, name or _summary.DEFAULT_GROUP)
            for (v, _), name in zip(pairs, _summary._group_names(optimizer, entries))
        ]
    elif isinstance(optimizer, keras.optimizers.MultiOptimizer):
        subs = list(optimizer.optimizers)
        sub_names = _dedupe([sub.name for sub in subs])
        routes = {}
        if isinstance(optimizer, SelectorMultiOptimizer) and not optimizer.built:
            # TensorFlow builds the optimizer in the first step, after the
            # first snapshot: route the variables as that build will.
            routes = {id(v): subs.index(sub) for v, sub in optimizer.resolve(model)}
        index = {id(v): _sub_optimizer_of(optimizer, v, subs, routes) for v, _ in pairs}
        inner_names: dict[int, dict[int, str]] = {}
        for i, sub in enumerate(subs):
            if not isinstance(sub, LayerwiseOptimizer):
                continue
            # Before it is built: the rules on what will be routed to it.
            assignments = sub.resolve() if sub.built else sub.resolve(
                model, variables=[v for v in trainable if index[id(v)] == i])
            group_names = _summary._group_names(sub, [a.multipliers for a in assignments])
            inner_names[i] = {id(a.variable): name for a, name in zip(assignments, group_names)}
        for v, _ in pairs:
            i = index[id(v)]
            if i is None:
                names.append((v, "unrouted"))
            elif i in inner_names and id(v) in inner_names[i]:
                names.append((v, f"{sub_names[i]}/{inner_names[i][id(v)]}"))
            else:
                names.append((v, sub_names[i]))
            if i is not None and id(v) in layout.trained:
                sub = subs[i]
                layout.holders[id(v)] = _slot_holder(sub)
    else:
        names = [(v, _summary.DEFAULT_GROUP) for v, _ in pairs]
    for v, name in names:
        layout.groups.setdefault(name, []).append(v)
    if not isinstance(optimizer, keras.optimizers.MultiOptimizer):
        holder = _slot_holder(optimizer)
        layout.holders = {id(v): holder for v in trainable}
    return layout


def step_counter(optimizer):
    """(the variable counting every batch the optimizer saw, batches per update)."""
    optimizer = _unwrap(optimizer)
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        return _keras.step_counter(optimizer), 1
    holder = _slot_holder(optimizer)
    return _keras.step_counter(holder), int(getattr(holder, "gradient_accumulation_steps", None) or 1)


@dataclass
class Snapshot:
    layout: Layout
    step: int  # optimizer update index (0 = the first update)
    raw_step: int
    weights: dict[int, np.ndarray]
    moments: dict[int, np.ndarray]  # first moments, where the optimizer has one


def _moments_of(layout: Layout, variables) -> dict[int, object]:
    """The first-moment slot variable of each variable, where its optimizer has one
    (None while that optimizer has not built the variable's slot)."""
    slots = {}
    for v in variables:
        holder = layout.holders.get(id(v))
        spec = None if holder is None else _keras.first_moment_slots(holder)
        if spec is None:
            continue
        built = spec[0] is not None and _keras.knows(holder, v)
        slots[id(v)] = spec[0][_keras.variable_index(holder, v)] if built else None
    return slots


def _read(layout: Layout, model, counter):
    """(raw step, {id: weight}, {id: moment or None}) of the trained variables, read at once."""
    trained = [v for vs in layout.groups.values() for v in vs if id(v) in layout.trained]
    slots = _moments_of(layout, trained)
    with_slot = [v for v in trained if slots.get(id(v)) is not None]
    values = _values(model, [counter] + trained + [slots[id(v)] for v in with_slot])
    raw = int(values[0])
    weights = {id(v): x for v, x in zip(trained, values[1 : 1 + len(trained)])}
    moments = {id(v): None for v in trained if id(v) in slots}
    moments.update((id(v), x) for v, x in zip(with_slot, values[1 + len(trained):]))
    return raw, weights, moments


def snapshot(layout: Layout, model, accumulation: int) -> Snapshot:
    counter, _ = step_counter(model.optimizer)
    raw, weights, moments = _read(layout, model, counter)
    # A slot not built yet (TensorFlow builds in the first step) or created
    # at unfreezing starts at zero.
    moments = {k: (m if m is not None else np.zeros(weights[k].shape)) for k, m in moments.items()}
    return Snapshot(layout, raw // accumulation, raw, weights, moments)


def measure(before: Snapshot, model) -> dict[str, dict]:
    """``{group: {"update_ratio", "weight_norm", "grad_norm", "status"}}`` for one step."""
    layout = before.layout
    counter, _ = step_counter(model.optimizer)
    raw, after, moments = _read(layout, model, counter)
    skipped = raw == before.raw_step
    results = {}
    for name, variables in layout.groups.items():
        trained = [v for v in variables if id(v) in before.weights]
        if not trained:
            results[name] = dict(update_ratio=math.nan, weight_norm=math.nan,
                                 grad_norm=math.nan, status=FROZEN)
            continue
        delta = weight = grad = 0.0
        has_grad = False
        for v in trained:
            w0, w1 = before.weights[id(v)], after[id(v)]
            delta += _sq(w1 - w0)
            weight += _sq(w0)
            m0, m1 = before.moments.get(id(v)), moments.get(id(v))
            if m0 is None or m1 is None:
                continue
            if np.array_equal(m0, m1) and np.array_equal(w0, w1):
                continue  # not updated (lr_mult 0 now, no gradient): nothing to read
            holder = layout.holders[id(v)]
            beta = _keras.first_moment_slots(holder)[1]
            grad += _sq((m1 - beta * m0) / (1.0 - beta))
            has_grad = True
        status = TRAINED if (delta > 0 and not skipped) else NOT_UPDATED
        results[name] = dict(
            update_ratio=math.sqrt(delta / weight) if weight > 0 else math.nan,
            weight_norm=math.sqrt(weight),
            grad_norm=math.sqrt(grad) if has_grad and not skipped else math.nan,
            status=status,
        )
    return results


def warn_without_gradients(layout: Layout) -> None:
    plain = {type(h).__name__ for h in layout.holders.values() if _keras.first_moment_slots(h) is None}
    if plain:
        warnings.warn(
            "layerlr.callbacks.UpdateLogger: grad_norm is read back from the first "
            "moment of Adam, AdamW, Nadam, Lamb, Adamax and Lion; "
            f"{', '.join(sorted(plain))} keeps none, so the gradient norm of the "
            "groups it trains is logged as NaN (update ratios and weight norms are "
            "measured all the same).",
            stacklevel=3,
        )
