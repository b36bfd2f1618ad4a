"""The multiplier table: what every variable gets, in model depth order.

`summary_records` is the data (one dict per variable, ready for pandas or
JSON); `summary` prints it as a plain-text table sized to the terminal. Both
work before training, because they resolve the rules on the model's variables
without building the optimizer (building creates its state), and after
`load_model`, where the optimizer comes back built with its saved multipliers.
"""

from __future__ import annotations

import math
import re
import shutil
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np

from layerlr.core import _hooks, _rules
from layerlr.core._keras import layers_of_model
from layerlr.core._optimizer import LayerwiseOptimizer, VariableMultipliers
from layerlr.core._rules import Multiplier

TRAINED = "trained"
FROZEN = "frozen"
DEFAULT_GROUP = "default"


@dataclass(frozen=True)
class _Row:
    layer: str
    layer_class: str
    path: str
    shape: list[int]
    params: int
    status: str
    lr_mult: float | None
    decay_mult: float | None
    learning_rate: float | None
    weight_decay: float | None
    lr_rule: str | None
    decay_rule: str | None
    group: str | None
    lr_mult_schedule: str | None
    decay_mult_schedule: str | None


@dataclass(frozen=True)
class _Report:
    optimizer: LayerwiseOptimizer
    built: bool
    step: int
    base_lr: float
    base_wd: float | None
    rows: list[_Row]
    non_trainable_params: int
    notes: list[str]
    # The lr multiplier (a number or a schedule) of each group of trained variables.
    group_multipliers: dict[str, Multiplier]
    # The variable of each row, in row order.
    variables: list = field(default_factory=list)


# --- depth order ---------------------------------------------------------------


def layers_in_depth_order(model: keras.Layer) -> list[keras.Layer]:
    """The model's leaf layers from input to output.

    Sequential and functional models list their layers in that order; nested
    models are expanded in place. Other layers count as one leaf even when they
    hold sublayers. Subclassed models list layers in assignment order, which
    may differ from execution order.
    """
    if not isinstance(model, keras.Model):
        return [model]
    leaves: list[keras.Layer] = []
    seen: set[int] = set()

    def walk(container):
        for layer in container.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, keras.Model):
                walk(layer)
            else:
                leaves.append(layer)

    walk(model)
    return leaves


# --- collecting the data -----------------------------------------------------------


def layerwise_optimizer_of(
    model: keras.Layer | None, optimizer=None
) -> LayerwiseOptimizer:
    """The LayerwiseOptimizer to report on, or a ValueError saying why there is none."""
    if optimizer is None:
        if model is None:
            raise ValueError("Pass a model, an optimizer, or both.")
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                f"The model {model.name!r} has no optimizer: it was not compiled, or "
                "was saved without one. Compile it with a LayerwiseOptimizer, or pass "
                "the optimizer: layerlr.summary(model, optimizer)."
            )
    if isinstance(optimizer, str):
        optimizer = keras.optimizers.get(optimizer)
    # mixed_float16 wraps us in a LossScaleOptimizer at compile time.
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if isinstance(optimizer, LayerwiseOptimizer):
        return optimizer
    if isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            f"The optimizer is a plain {type(optimizer).__name__}, not a "
            "LayerwiseOptimizer: every variable trains at its learning rate "
            f"({_format_rate(_as_float(optimizer.learning_rate))}), with no per-layer "
            "multipliers. Wrap it: layerlr.LayerwiseOptimizer("
            f"keras.optimizers.{type(optimizer).__name__}(...), lr_mult={{...}})."
        )
    raise TypeError(
        "Expected a keras.optimizers.Optimizer (a layerlr.LayerwiseOptimizer), got "
        f"{optimizer!r} of type {type(optimizer).__name__}."
    )


def _check_model(model) -> None:
    if isinstance(model, keras.optimizers.Optimizer):
        raise TypeError(
            "Got an optimizer where the model goes: call "
            "layerlr.summary(model, optimizer) or optimizer.summary(model)."
        )
    if not isinstance(model, keras.Layer):
        raise TypeError(
            f"Expected a Keras model or layer, got {model!r} of type "
            f"{type(model).__name__}."
        )
    if not model.weights:
        raise ValueError(
            f"The model {model.name!r} has no weights yet, so no variable has a "
            "multiplier. Build it first: call it on data, give it a keras.Input, "
            "or use model.build(input_shape)."
        )


def _as_float(value) -> float:
    return float(np.asarray(keras.ops.convert_to_numpy(value)))


def _is_schedule(value) -> bool:
    return isinstance(value, keras.optimizers.schedules.LearningRateSchedule)


def multiplier_now(value: Multiplier, optimizer: LayerwiseOptimizer) -> float:
    """A multiplier's value at the optimizer's step (schedules as the hook runs them)."""
    return _as_float(value(optimizer.iterations)) if _is_schedule(value) else float(value)


def _effective_decay(inner, variable, decay_mult: float) -> float | None:
    base = _hooks._base_weight_decay(inner, variable)
    if base is None:
        # Excluded with exclude_from_weight_decay (0), or no decay at all (None).
        return None if getattr(inner, "weight_decay", None) is None else 0.0
    return float(base) * decay_mult


def _variables_in_depth_order(model) -> list[tuple[Any, keras.Layer]]:
    """(variable, owning leaf layer) for every weight, shared weights once."""
    seen: set[int] = set()
    pairs = []
    for layer in [*layers_in_depth_order(model), model]:
        for weight in layer.weights:
            if id(weight) not in seen:
                seen.add(id(weight))
                pairs.append((weight, layer))
    return pairs


def _created_trainable(model) -> set[int]:
    """Variables created trainable: those of a frozen layer become trainable again."""
    ids: set[int] = set()
    for layer in [model, *model._flatten_layers(include_self=False)]:
        ids.update(id(v) for v in getattr(layer, "_trainable_variables", ()))
    return ids


def _base_name(description: str) -> str:
    """A short, TensorBoard-safe name from a rule's description."""
    base = re.sub(r"(?:layer|variable|type|predicate) ", "", description)
    base = base.replace("<locals>.", "").replace("<lambda>", "lambda")
    return re.sub(r"[^A-Za-z0-9_./-]+", "_", base).strip("_./-") or "rule"


def _dedupe(bases: Sequence[str], taken: set[str]) -> list[str]:
    names = []
    for base in bases:
        name, i = base, 2
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        names.append(name)
    return names


def rule_group_names(opt: LayerwiseOptimizer) -> list[str]:
    """The group name of each ``lr_mult`` rule, in rule order.

    Named from the rule's description; two rules that print alike (two
    lambdas) get ``name`` and ``name_2`` in rule order, so the names are
    distinct and do not depend on which variables a model has. ``default``
    is kept for the variables no rule matched.
    """
    rules = opt._layerlr.lr_rules
    return _dedupe([_base_name(r.describe()) for r in rules], {DEFAULT_GROUP})


def _rule_keys(opt: LayerwiseOptimizer, variables: Sequence, entries: Sequence, model=None) -> list:
    """The identity of the rule that decided each entry's lr_mult.

    An index into ``opt._layerlr.lr_rules``, or None for the default. Entries
    carry only the rule's description, so rules that print alike (two
    lambdas, two layers of the same name) are told apart by resolving those
    variables again against the rules, and, where that is impossible (rules
    restored from a save that were functions), by the multiplier they gave.
    """
    rules = opt._layerlr.lr_rules
    by_description: dict[str, list[int]] = {}
    for i, rule in enumerate(rules):
        by_description.setdefault(rule.describe(), []).append(i)
    keys: list = [None] * len(entries)
    ambiguous = []
    for n, entry in enumerate(entries):
        if entry is None or entry.lr_rule is None:
            continue
        candidates = by_description.get(entry.lr_rule)
        if not candidates:
            keys[n] = ("saved", entry.lr_rule)  # a rule the optimizer no longer has
        elif len(candidates) == 1:
            keys[n] = candidates[0]
        else:
            ambiguous.append(n)
    if not ambiguous:
        return keys
    indexed = tuple(_rules.Rule(rule.selector, float(i)) for i, rule in enumerate(rules))
    layers_of = None
    model = model if model is not None else opt._layerlr.remembered_model()
    if model is not None:
        owners = layers_of_model(model)
        layers_of = lambda v: owners.get(id(v), ())  # noqa: E731
    for n in ambiguous:
        entry = entries[n]
        candidates = by_description[entry.lr_rule]
        found = None
        try:
            ((value, description),) = _rules.resolve(
                indexed, [variables[n]], "lr_mult", layers_of, check_unused=False
            )
            if description is not None and int(value) in candidates:
                found = int(value)
        except ValueError:  # e.g. a saved function, or a layer-type rule without the model
            pass
        if found is None:
            wanted = _rules.multiplier_to_config(entry.lr_mult)
            found = next(
                (i for i in candidates if _rules.multiplier_to_config(rules[i].value) == wanted),
                candidates[0],
            )
        keys[n] = found
    return keys


def _key_names(opt: LayerwiseOptimizer, keys: Sequence) -> dict:
    """``{rule key: group name}`` for the keys `_rule_keys` gave."""
    rule_names = rule_group_names(opt)
    names: dict = {None: DEFAULT_GROUP}
    taken = {DEFAULT_GROUP, *rule_names}
    for key in keys:
        if key in names:
            continue
        if isinstance(key, int):
            names[key] = rule_names[key]
        else:
            (names[key],) = _dedupe([_base_name(key[1])], taken)
    return names


def _known_entries(opt: LayerwiseOptimizer) -> dict[int, VariableMultipliers]:
    """What the optimizer already resolved, by variable: index-aligned with its variables."""
    resolved = opt._layerlr.resolved
    if resolved is None:
        return {}
    return {id(v): e for v, e in zip(opt.inner_optimizer._trainable_variables, resolved)}


def _collect(optimizer, model=None) -> _Report:
    if model is not None:
        _check_model(model)
    opt = layerwise_optimizer_of(model, optimizer)
    inner = opt.inner_optimizer
    known = _known_entries(opt)
    if model is None and not known:
        raise ValueError(
            "The optimizer is not built yet, so it cannot know the variables: pass "
            "the model, layerlr.summary(model, optimizer) or optimizer.summary(model)."
        )
    notes: list[str] = []

    if model is None:
        pairs = [(v, None) for v in inner._trainable_variables]
        trainable = [v for v, _ in pairs]
        frozen_ids: set[int] = set()
    else:
        pairs = _variables_in_depth_order(model)
        trainable = list(model.trainable_variables)
        frozen_ids = _created_trainable(model) - {id(v) for v in trainable}
    trainable_ids = {id(v) for v in trainable}

    entries: dict[int, VariableMultipliers] = dict(known)
    if not known:
        # Resolve without building: building would create the optimizer state.
        resolved, ordered = opt._resolve(trainable, model)
        entries = {id(v): e for v, e in zip(ordered, resolved)}
    # Variables the optimizer has not seen (unfrozen since it was built, or
    # frozen all along) get what its next build gives them: the rules.
    unseen = [v for v, _ in pairs if id(v) in trainable_ids | frozen_ids and id(v) not in entries]
    if unseen:
        seen = [v for v, _ in pairs if id(v) in entries] if model is not None else []
        try:
            fresh = opt._resolve_rules(seen + unseen, model)
        except ValueError:
            if any(id(v) in trainable_ids for v in unseen):
                raise  # training would fail the same way
            # Only frozen rows are affected (rules restored from a save can be
            # bound to objects that are gone): they show no multiplier.
            fresh = ()
        entries.update((id(v), e) for v, e in zip(seen + unseen, fresh) if id(v) not in entries)
        pending = [_path(v) for v in unseen if id(v) in trainable_ids and known]
        if pending:
            notes.append(
                f"{len(pending)} trainable variable(s) are new to the optimizer "
                f"({', '.join(pending[:3])}{', ...' if len(pending) > 3 else ''}), "
                "e.g. unfrozen since it was built: they get the multipliers shown, from "
                "the rules, when training resumes (Keras picks up a change of `trainable` "
                "after compiling again or model.make_train_function(force=True))."
            )

    base_lr = _as_float(opt.learning_rate)
    rows_data = []
    non_trainable_params = 0
    for variable, layer in pairs:
        key = id(variable)
        if key in trainable_ids:
            status = TRAINED
        elif key in frozen_ids:
            status = FROZEN
        else:
            non_trainable_params += _count(variable)
            continue
        rows_data.append((variable, layer, status, entries.get(key)))

    keys = _rule_keys(opt, [v for v, _, _, _ in rows_data], [e for _, _, _, e in rows_data], model)
    names = _key_names(opt, keys)
    rows = []
    for (variable, layer, status, entry), key in zip(rows_data, keys):
        path = _path(variable)
        if layer is None:
            layer_name = path.rsplit("/", 2)[-2] if "/" in path else ""
            layer_class = ""
        else:
            layer_name, layer_class = layer.name, type(layer).__name__
        lr_mult = decay_mult = None
        if entry is not None:
            lr_mult = multiplier_now(entry.lr_mult, opt)
            decay_mult = multiplier_now(entry.decay_mult, opt)
        trained = status == TRAINED
        rows.append(
            _Row(
                layer=layer_name,
                layer_class=layer_class,
                path=path,
                shape=[int(d) for d in variable.shape],
                params=_count(variable),
                status=status,
                lr_mult=lr_mult,
                decay_mult=decay_mult,
                learning_rate=base_lr * lr_mult if trained else None,
                weight_decay=_effective_decay(inner, variable, decay_mult) if trained else None,
                lr_rule=None if entry is None else entry.lr_rule,
                decay_rule=None if entry is None else entry.decay_rule,
                group=None if entry is None else names[key],
                lr_mult_schedule=_schedule_text(entry.lr_mult) if entry else None,
                decay_mult_schedule=_schedule_text(entry.decay_mult) if entry else None,
            )
        )

    notes.extend(_unused_rule_notes(opt, rows))
    return _Report(
        optimizer=opt,
        built=bool(known),
        step=int(_as_float(opt.iterations)),
        base_lr=base_lr,
        base_wd=getattr(inner, "weight_decay", None),
        rows=rows,
        non_trainable_params=non_trainable_params,
        notes=notes,
        group_multipliers={
            names[key]: e.lr_mult
            for (_, _, status, e), key in zip(rows_data, keys)
            if status == TRAINED and e is not None
        },
        variables=[v for v, _, _, _ in rows_data],
    )


def _schedule_text(value: Multiplier) -> str | None:
    """``FreezeThenWarmup(freeze_steps=100, ...)`` for a schedule, None for a number."""
    if not _is_schedule(value):
        return None
    try:
        config = value.get_config()
    except NotImplementedError:
        return type(value).__name__
    args = ", ".join(f"{k}={v!r}" for k, v in config.items() if k != "name")
    return f"{type(value).__name__}({args})"


def _unused_rule_notes(opt: LayerwiseOptimizer, rows: list[_Row]) -> list[str]:
    notes = []
    state = opt._layerlr
    for kind, rules, attr in (
        ("lr_mult", state.lr_rules, "lr_rule"),
        ("decay_mult", state.decay_rules, "decay_rule"),
    ):
        deciding = {getattr(r, attr) for r in rows if r.status == TRAINED}
        frozen_only = {getattr(r, attr) for r in rows if r.status == FROZEN}
        for rule in rules:
            description = rule.describe()
            if description in deciding:
                continue
            if description in frozen_only:
                why = "it selects only frozen variables; it applies once they are unfrozen"
            else:
                why = (
                    "every trainable variable it selects matched an earlier rule "
                    "(the first matching rule wins)"
                )
            value = _schedule_text(rule.value) or f"{rule.value:g}"
            notes.append(
                f"The {kind} rule {description} = {value} decides no trained variable: {why}."
            )
    return notes


def _path(variable) -> str:
    return getattr(variable, "path", None) or variable.name


def _count(variable) -> int:
    return int(math.prod(int(d) for d in variable.shape))


# --- groups (shared with the callbacks and plots) ----------------------------------


def lr_groups(optimizer) -> dict[str, list[VariableMultipliers]]:
    """``{group name: its variables' multipliers}`` of a built optimizer.

    A group is the variables whose learning rate the same rule decided
    (``"default"`` for those no rule matched), named after that rule. Rules are
    told apart by identity, never by their printed description.
    """
    opt = layerwise_optimizer_of(None, optimizer)
    entries = opt._layerlr.resolved
    if entries is None:
        raise ValueError(
            "The optimizer is not built yet, so its groups are not known. Train, or "
            "call optimizer.build(model) first."
        )
    keys = _rule_keys(opt, opt.inner_optimizer._trainable_variables, entries)
    names = _key_names(opt, keys)
    groups: dict[str, list[VariableMultipliers]] = {}
    for e, key in zip(entries, keys):
        groups.setdefault(names[key], []).append(e)
    return groups


def group_learning_rates(optimizer, base: float | None = None) -> dict[str, float]:
    """Each group's effective learning rate at the optimizer's current step.

    ``base`` replaces the base learning rate read from the optimizer.
    """
    opt = layerwise_optimizer_of(None, optimizer)
    base = _as_float(opt.learning_rate) if base is None else float(base)
    return {
        name: base * multiplier_now(members[0].lr_mult, opt)
        for name, members in lr_groups(opt).items()
    }


# --- public functions ------------------------------------------------------------


def summary_records(model: keras.Layer, optimizer=None) -> list[dict[str, Any]]:
    """The summary table as records: one JSON-ready dict per trainable variable.

    Rows follow the model's depth order and include the variables of frozen
    layers (``status="frozen"``, with the multipliers they will get once
    unfrozen). Keys: ``layer``, ``layer_class``, ``path``, ``shape``, ``params``,
    ``status`` (``"trained"`` or ``"frozen"``), ``lr_mult`` and ``decay_mult``
    (their values at the optimizer's current step), ``learning_rate`` and
    ``weight_decay`` (the effective values now; None for frozen variables, and
    weight decay None when the optimizer has none), ``lr_rule`` and
    ``decay_rule`` (the matching rule, None for the default 1.0), ``group`` (the
    learning-rate group's name, as logged by
    `layerlr.callbacks.LearningRateLogger`), and ``lr_mult_schedule`` /
    ``decay_mult_schedule`` (the multiplier schedule, e.g.
    ``"FreezeThenWarmup(freeze_steps=100, ...)"``, or None for a number).

    Args:
        model: The model (built, i.e. with weights).
        optimizer: A `LayerwiseOptimizer`; defaults to ``model.optimizer``.

    Example:

    >>> import keras, layerlr
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")], name="net")
    >>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={"*bias": 0.5})
    >>> [(r["path"], r["params"], r["learning_rate"]) for r in layerlr.summary_records(model, opt)]
    [('net/head/kernel', 6, 0.10000000149011612), ('net/head/bias', 2, 0.05000000074505806)]
    """
    report = _collect(optimizer, model)
    return [asdict(row) for row in report.rows]


def summary(
    model: keras.Layer,
    optimizer=None,
    *,
    width: int | None = None,
    print_fn: Callable[[str], Any] | None = None,
) -> None:
    """Prints which learning rate and weight decay every variable gets.

    One row per trainable variable in model depth order: layer, variable path,
    shape, parameter count, ``lr_mult``, ``decay_mult``, the effective learning
    rate and weight decay at the optimizer's current step (schedules included),
    and the rule that decided them (``default`` when none matched). A footer sums
    the parameters per distinct multiplier pair, and frozen layers, rules that
    decide nothing and layers unfrozen since the optimizer was built are called
    out. Scheduled multipliers show their value now, marked ``*``.

    Works before training (the rules are resolved on the model's variables; the
    optimizer is not built) and after `keras.saving.load_model`.

    Args:
        model: The model (built, i.e. with weights).
        optimizer: A `LayerwiseOptimizer`; defaults to ``model.optimizer``.
        width: Line width; defaults to the terminal's (120 when unknown).
        print_fn: Called with each line; defaults to `print`.

    Example:

    >>> import keras, layerlr
    >>> backbone = keras.Sequential([keras.layers.Dense(4, name="conv")], name="backbone")
    >>> head = keras.layers.Dense(2, name="head")
    >>> model = keras.Sequential([keras.Input((3,)), backbone, head], name="net")
    >>> opt = layerlr.LayerwiseOptimizer(
    ...     keras.optimizers.AdamW(1e-3, weight_decay=0.01),
    ...     lr_mult={backbone: 0.01},
    ...     decay_mult={"*bias": 0.0},
    ... )
    >>> layerlr.summary(model, opt, width=130)
    LayerwiseOptimizer(AdamW) at step 0 (not built yet: multipliers resolved from the model)
    base learning rate 0.001, weight decay 0.01
    Layer         Variable                  Shape   Params  lr_mult  decay_mult  LR now  WD now  Rule
    ---------------------------------------------------------------------------------------------------------------------------------
    conv (Dense)  net/backbone/conv/kernel  (3, 4)      12     0.01           1   1e-05    0.01  lr: layer 'backbone'
                  net/backbone/conv/bias    (4,)         4     0.01           0   1e-05       0  lr: layer 'backbone'; decay: '*bias'
    head (Dense)  net/head/kernel           (4, 2)       8        1           1   0.001    0.01  default
                  net/head/bias             (2,)         2        1           0   0.001       0  decay: '*bias'
    ---------------------------------------------------------------------------------------------------------------------------------
    Parameters per multiplier (lr_mult, decay_mult):
      0.01, 1: 12 params in 1 variable, learning rate 1e-05
      0.01, 0: 4 params in 1 variable, learning rate 1e-05
      1, 1: 8 params in 1 variable, learning rate 0.001
      1, 0: 2 params in 1 variable, learning rate 0.001
    Trainable: 26 params in 4 variables.
    """
    print_summary(optimizer, model, width=width, print_fn=print_fn)


def print_summary(
    optimizer,
    model: keras.Layer | None = None,
    *,
    width: int | None = None,
    print_fn: Callable[[str], Any] | None = None,
) -> None:
    """The logic of ``LayerwiseOptimizer.summary(model=None)``.

    Without a model the optimizer must be built; rows then follow its variable
    order and frozen layers are not shown.

    >>> import keras, layerlr
    >>> from layerlr.report._summary import print_summary
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")], name="net")
    >>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={"*bias": 0.5})
    >>> opt.build(model)
    >>> lines = []
    >>> print_summary(opt, print_fn=lines.append)
    >>> lines[-1]
    'Trainable: 8 params in 2 variables.'
    """
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive number of characters, got {width!r}.")
    report = _collect(optimizer, model)
    emit = print_fn or print
    for line in format_report(report, width or _terminal_width()):
        emit(line)


# --- text rendering ----------------------------------------------------------------


def _terminal_width() -> int:
    # Notebooks and pipes have no terminal: fall back to a width that reads well there.
    return shutil.get_terminal_size(fallback=(120, 24)).columns


def _format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _format_mult(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _rule_text(row: _Row) -> str:
    parts = []
    if row.lr_rule is not None:
        parts.append(f"lr: {row.lr_rule}")
    if row.decay_rule is not None:
        parts.append(f"decay: {row.decay_rule}")
    text = "; ".join(parts) or "default"
    return f"FROZEN ({text})" if row.status == FROZEN else text


def _lr_text(row: _Row) -> str:
    return "frozen" if row.status == FROZEN else _format_rate(row.learning_rate)


def _mult_text(value: float | None, schedule: str | None) -> str:
    # A scheduled multiplier shows its value now, marked; the footer names it.
    return _format_mult(value) + ("*" if schedule else "")


def _truncate(text: str, width: int, keep_end: bool) -> str:
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    if keep_end:
        # A path's end names the layer and the variable; its start is the model.
        return "..." + text[len(text) - (width - 3) :]
    return text[: width - 3] + "..."


def _shape_text(shape: list[int]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[_Row], str]
    right: bool = False
    # Columns that give up width when the table is too wide, down to this minimum.
    shrink_to: int | None = None


_LAYER = _Column("Layer", lambda r: f"{r.layer} ({r.layer_class})" if r.layer_class else r.layer, shrink_to=10)
_COLUMNS = (
    _LAYER,
    _Column("Variable", lambda r: r.path, shrink_to=16),
    _Column("Shape", lambda r: _shape_text(r.shape), shrink_to=8),
    _Column("Params", lambda r: f"{r.params:,}", right=True),
    _Column("lr_mult", lambda r: _mult_text(r.lr_mult, r.lr_mult_schedule), right=True),
    _Column("decay_mult", lambda r: _mult_text(r.decay_mult, r.decay_mult_schedule), right=True),
    _Column("LR now", _lr_text, right=True),
    _Column("WD now", lambda r: _format_rate(r.weight_decay), right=True),
    _Column("Rule", _rule_text, shrink_to=12),
)
_DECAY_COLUMNS = ("decay_mult", "WD now")
_SHRINK_ORDER = {"Variable": 0, "Layer": 1, "Shape": 2, "Rule": 3}
# Too narrow even then: these go, in this order (the path names the layer).
_DROP_ORDER = ("Shape", "Layer", "Params", "WD now")


def _has_decay(report: _Report) -> bool:
    return report.base_wd is not None or bool(report.optimizer._layerlr.decay_rules)


def _columns(report: _Report) -> list[_Column]:
    # Without any weight decay the decay columns would only repeat "1" and "-".
    has_decay = _has_decay(report)
    return [c for c in _COLUMNS if has_decay or c.header not in _DECAY_COLUMNS]


def _cells(report: _Report, columns: Sequence[_Column]) -> list[list[str]]:
    cells = []
    previous_layer = None
    for row in report.rows:
        line = [c.cell(row) for c in columns]
        key = (row.layer, row.layer_class)
        if key == previous_layer:
            line[columns.index(_LAYER)] = ""  # the layer is named on its first row
        previous_layer = key
        cells.append(line)
    return cells


def _column_widths(columns: Sequence[_Column], cells: list[list[str]], width: int) -> list[int]:
    widths = [max([len(c.header)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    gaps = 2 * (len(widths) - 1)
    order = sorted(range(len(columns)), key=lambda i: _SHRINK_ORDER.get(columns[i].header, 99))
    while sum(widths) + gaps > width:
        # Paths lose their start first (their end names the layer and variable,
        # and the Layer column repeats the rest); the rule is cut last.
        for i in order:
            if columns[i].shrink_to is not None and widths[i] > columns[i].shrink_to:
                widths[i] -= 1
                break
        else:
            break
    return widths


def _fit_columns(
    columns: list[_Column], cells: list[list[str]], width: int
) -> tuple[list[_Column], list[list[str]], list[int]]:
    """Shrinks the text columns, then drops the least needed ones, to fit ``width``."""
    while True:
        widths = _column_widths(columns, cells, width)
        over = sum(widths) + 2 * (len(widths) - 1) > width
        droppable = [h for h in _DROP_ORDER if any(c.header == h for c in columns)]
        if not over or not droppable:
            return columns, cells, widths
        i = next(i for i, c in enumerate(columns) if c.header == droppable[0])
        columns = columns[:i] + columns[i + 1 :]
        cells = [line[:i] + line[i + 1 :] for line in cells]


def _line(cells: Sequence[str], columns: Sequence[_Column], widths: Sequence[int]) -> str:
    parts = []
    for cell, column, w in zip(cells, columns, widths):
        cell = _truncate(cell, w, keep_end=column.header == "Variable")
        parts.append(cell.rjust(w) if column.right else cell.ljust(w))
    return "  ".join(parts).rstrip()


def format_report(report: _Report, width: int) -> list[str]:
    inner = report.optimizer.inner_optimizer
    state = "" if report.built else " (not built yet: multipliers resolved from the model)"
    lines = [f"LayerwiseOptimizer({type(inner).__name__}) at step {report.step}{state}"]
    schedule = getattr(inner, "_learning_rate", None)
    kind = (
        f" ({type(schedule).__name__})"
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule)
        else ""
    )
    decay = "no weight decay" if report.base_wd is None else f"weight decay {report.base_wd:.3g}"
    lines.append(f"base learning rate {_format_rate(report.base_lr)}{kind}, {decay}")

    columns = _columns(report)
    cells = _cells(report, columns)
    columns, cells, widths = _fit_columns(columns, cells, width)
    rule = "-" * min(width, sum(widths) + 2 * (len(widths) - 1))
    table = [_line([c.header for c in columns], columns, widths), rule]
    table += [_line(line, columns, widths) for line in cells]
    table.append(rule)
    footer = []

    trained = [r for r in report.rows if r.status == TRAINED]
    with_decay = _has_decay(report)
    groups: dict[tuple, list[_Row]] = {}
    for r in trained:
        lr_key = (r.lr_mult, r.lr_mult_schedule)
        key = (lr_key, (r.decay_mult, r.decay_mult_schedule)) if with_decay else (lr_key,)
        groups.setdefault(key, []).append(r)
    if groups:
        kind = "(lr_mult, decay_mult)" if with_decay else "(lr_mult)"
        footer.append(f"Parameters per multiplier {kind}:")
        for key, members in groups.items():
            params = sum(r.params for r in members)
            plural = "s" if len(members) != 1 else ""
            lr_mult = key[0][0]
            text = (
                f"{', '.join(_mult_text(*m) for m in key)}: {params:,} params in "
                f"{len(members)} variable{plural}, learning rate "
                f"{_format_rate(report.base_lr * lr_mult)}"
            )
            if lr_mult == 0.0:
                text += " (NOT UPDATED: lr_mult 0" + (" now)" if key[0][1] else ")")
            footer.append("  " + text)
    schedules = {}
    for r in report.rows:
        for rule, schedule in ((r.lr_rule, r.lr_mult_schedule), (r.decay_rule, r.decay_mult_schedule)):
            if schedule:
                schedules.setdefault((rule, schedule), None)
    if schedules:
        footer.append(f"* scheduled multiplier, its value at step {report.step}:")
        footer += [f"  {rule}: {schedule}" for rule, schedule in schedules]
    total = sum(r.params for r in trained)
    footer.append(f"Trainable: {total:,} params in {len(trained)} variables.")
    frozen = [r for r in report.rows if r.status == FROZEN]
    if frozen:
        frozen_layers = sorted({r.layer for r in frozen})
        shown = ", ".join(frozen_layers[:5]) + (", ..." if len(frozen_layers) > 5 else "")
        footer.append(
            f"FROZEN (trainable=False): {sum(r.params for r in frozen):,} params in "
            f"{len(frozen_layers)} layer{'s' if len(frozen_layers) != 1 else ''} ({shown}); "
            "not trained."
        )
    if report.non_trainable_params:
        footer.append(
            f"Non-trainable state (not listed, e.g. BatchNorm statistics): "
            f"{report.non_trainable_params:,} params."
        )
    footer += ["WARNING: " + note for note in report.notes]
    wrap = lambda line: textwrap.wrap(  # noqa: E731
        line, width=max(width, 40), subsequent_indent=" " * (len(line) - len(line.lstrip()) + 4)
    ) or [""]
    return [w for line in lines for w in wrap(line)] + table + [
        w for line in footer for w in wrap(line)
    ]
