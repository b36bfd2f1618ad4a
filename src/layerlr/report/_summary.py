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

from layerlr.core import _keras, _rules
from layerlr.core._optimizer import LayerwiseOptimizer, layerwise_optimizer_of
from layerlr.core._resolution import Assignment, VariableMultipliers, value_now
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


def _collect(optimizer, model=None) -> _Report:
    if model is not None:
        _check_model(model)
    opt = layerwise_optimizer_of(model, optimizer)
    assignments = opt.resolve(model)
    by_id = {id(a.variable): a for a in assignments}
    if model is None:
        pairs = [(a.variable, None) for a in assignments]
        non_trainable_params = 0
    else:
        everything = _variables_in_depth_order(model)
        pairs = [(v, layer) for v, layer in everything if id(v) in by_id]
        non_trainable_params = sum(_count(v) for v, _ in everything if id(v) not in by_id)
    ordered = [by_id[id(v)] for v, _ in pairs]
    names = _group_names(opt, [a.multipliers for a in ordered])
    rows = [_row(a, layer, name) for a, (_, layer), name in zip(ordered, pairs, names)]
    inner = opt.inner_optimizer
    return _Report(
        optimizer=opt,
        built=_has_resolved(opt),
        step=int(_as_float(opt.iterations)),
        base_lr=_as_float(opt.learning_rate),
        base_wd=getattr(inner, "weight_decay", None),
        rows=rows,
        non_trainable_params=non_trainable_params,
        notes=_new_variable_notes(ordered) + _unused_rule_notes(opt, ordered),
        group_multipliers={
            name: a.multipliers.lr_mult
            for a, name in zip(ordered, names)
            if a.trained and a.multipliers is not None
        },
        variables=[a.variable for a in ordered],
    )


def _has_resolved(opt: LayerwiseOptimizer) -> bool:
    """Whether the optimizer was built (it reads not `built` again after unfreezing)."""
    try:
        opt.multipliers
    except ValueError:
        return False
    return True


def _row(assignment: Assignment, layer, group: str | None) -> _Row:
    path = assignment.path
    if layer is None:
        layer_name = path.rsplit("/", 2)[-2] if "/" in path else ""
        layer_class = ""
    else:
        layer_name, layer_class = layer.name, type(layer).__name__
    entry = assignment.multipliers
    return _Row(
        layer=layer_name,
        layer_class=layer_class,
        path=path,
        shape=[int(d) for d in assignment.variable.shape],
        params=_count(assignment.variable),
        status=TRAINED if assignment.trained else FROZEN,
        lr_mult=assignment.lr_mult,
        decay_mult=assignment.decay_mult,
        learning_rate=assignment.learning_rate,
        weight_decay=assignment.weight_decay,
        lr_rule=None if entry is None else entry.lr_rule,
        decay_rule=None if entry is None else entry.decay_rule,
        group=None if entry is None else group,
        lr_mult_schedule=_schedule_text(entry.lr_mult) if entry else None,
        decay_mult_schedule=_schedule_text(entry.decay_mult) if entry else None,
    )


def _new_variable_notes(assignments: Sequence[Assignment]) -> list[str]:
    pending = [a.path for a in assignments if a.new]
    if not pending:
        return []
    return [
        f"{len(pending)} trainable variable(s) are new to the optimizer "
        f"({', '.join(pending[:3])}{', ...' if len(pending) > 3 else ''}), "
        "e.g. unfrozen since it was built: they get the multipliers shown, from "
        "the rules, when training resumes (Keras picks up a change of `trainable` "
        "after compiling again or model.make_train_function(force=True))."
    ]


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


def _unused_rule_notes(opt: LayerwiseOptimizer, assignments: Sequence[Assignment]) -> list[str]:
    notes = []
    entries = [(a.trained, a.multipliers) for a in assignments if a.multipliers is not None]
    for kind, rules in (("lr_mult", opt.lr_rules), ("decay_mult", opt.decay_rules)):
        keys = [(trained, _rule_key(e, kind, rules)) for trained, e in entries]
        deciding = {key for trained, key in keys if trained}
        frozen_only = {key for trained, key in keys if not trained}
        for i, rule in enumerate(rules):
            if i in deciding:
                continue
            if i in frozen_only:
                why = "it selects only frozen variables; it applies once they are unfrozen"
            else:
                why = (
                    "every trainable variable it selects matched an earlier rule "
                    "(the first matching rule wins)"
                )
            value = _schedule_text(rule.value) or f"{rule.value:g}"
            notes.append(
                f"The {kind} rule {rule.describe()} = {value} decides no trained variable: {why}."
            )
    return notes


def _count(variable) -> int:
    return int(math.prod(int(d) for d in variable.shape))


# --- groups (shared with the callbacks and plots) ----------------------------------


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
    return _dedupe([_base_name(r.describe()) for r in opt.lr_rules], {DEFAULT_GROUP})


def _rule_key(entry: VariableMultipliers, kind: str, rules) -> int | tuple | None:
    """The rule that decided ``entry``'s ``kind``: its index, None for the default.

    Entries carry the rule's index. Those saved by layerlr 0.1.0 carry only
    its description: they are matched by description, then by the multiplier
    the rule gave; a rule the optimizer no longer has is ``("saved", description)``.
    """
    lr = kind == "lr_mult"
    description = entry.lr_rule if lr else entry.decay_rule
    index = entry.lr_rule_index if lr else entry.decay_rule_index
    if description is None:
        return None
    if index is not None and index < len(rules) and rules[index].describe() == description:
        return index
    candidates = [i for i, rule in enumerate(rules) if rule.describe() == description]
    if not candidates:
        return ("saved", description)
    wanted = _rules.multiplier_to_config(entry.lr_mult if lr else entry.decay_mult)
    return next((i for i in candidates if _rules.multiplier_to_config(rules[i].value) == wanted), candidates[0])


def _group_names(opt: LayerwiseOptimizer, entries: Sequence[VariableMultipliers | None]) -> list[str | None]:
    """The learning-rate group of each entry (None for an entry that is None)."""
    rule_names = rule_group_names(opt)
    names: dict = {None: DEFAULT_GROUP}
    taken = {DEFAULT_GROUP, *rule_names}
    result: list[str | None] = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        key = _rule_key(entry, "lr_mult", opt.lr_rules)
        if key not in names:
            names[key] = rule_names[key] if isinstance(key, int) else _dedupe([_base_name(key[1])], taken)[0]
        result.append(names[key])
    return result


def lr_groups(optimizer) -> dict[str, list[VariableMultipliers]]:
    """``{group name: its variables' multipliers}`` of a built optimizer.

    A group is the variables whose learning rate the same rule decided
    (``"default"`` for those no rule matched), named after that rule. Rules are
    told apart by identity, never by their printed description.
    """
    opt = layerwise_optimizer_of(None, optimizer)
    try:
        entries = [a.multipliers for a in opt.resolve()]
    except ValueError:
        raise ValueError(
            "The optimizer is not built yet, so its groups are not known. Train, or "
            "call optimizer.build(model) first."
        ) from None
    groups: dict[str, list[VariableMultipliers]] = {}
    for entry, name in zip(entries, _group_names(opt, entries)):
        groups.setdefault(name, []).append(entry)
    return groups


def group_learning_rates(optimizer, base: float | None = None) -> dict[str, float]:
    """Each group's effective learning rate at the optimizer's current step.

    ``base`` replaces the base learning rate read from the optimizer.
    """
    opt = layerwise_optimizer_of(None, optimizer)
    base = _as_float(opt.learning_rate) if base is None else float(base)
    return {
        name: base * value_now(members[0].lr_mult, opt.iterations)
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
    return report.base_wd is not None or bool(report.optimizer.decay_rules)


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
    """The printed summary: a header, the table sized to ``width``, and a footer."""
    footer = [
        *_multiplier_totals(report),
        *_schedule_notes(report),
        *_parameter_totals(report),
        *("WARNING: " + note for note in report.notes),
    ]
    return _wrapped(_header(report), width) + _table(report, width) + _wrapped(footer, width)


def _header(report: _Report) -> list[str]:
    inner = report.optimizer.inner_optimizer
    state = "" if report.built else " (not built yet: multipliers resolved from the model)"
    schedule = _keras.learning_rate_schedule(inner)
    kind = f" ({type(schedule).__name__})" if schedule is not None else ""
    decay = "no weight decay" if report.base_wd is None else f"weight decay {report.base_wd:.3g}"
    return [
        f"LayerwiseOptimizer({type(inner).__name__}) at step {report.step}{state}",
        f"base learning rate {_format_rate(report.base_lr)}{kind}, {decay}",
    ]


def _table(report: _Report, width: int) -> list[str]:
    columns = _columns(report)
    cells = _cells(report, columns)
    columns, cells, widths = _fit_columns(columns, cells, width)
    rule = "-" * min(width, sum(widths) + 2 * (len(widths) - 1))
    return [
        _line([c.header for c in columns], columns, widths),
        rule,
        *(_line(line, columns, widths) for line in cells),
        rule,
    ]


def _multiplier_totals(report: _Report) -> list[str]:
    """Parameters per distinct multiplier (pair), with the learning rate each gives."""
    with_decay = _has_decay(report)
    groups: dict[tuple, list[_Row]] = {}
    for r in report.rows:
        if r.status != TRAINED:
            continue
        lr_key = (r.lr_mult, r.lr_mult_schedule)
        key = (lr_key, (r.decay_mult, r.decay_mult_schedule)) if with_decay else (lr_key,)
        groups.setdefault(key, []).append(r)
    if not groups:
        return []
    lines = [f"Parameters per multiplier {'(lr_mult, decay_mult)' if with_decay else '(lr_mult)'}:"]
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
        lines.append("  " + text)
    return lines


def _schedule_notes(report: _Report) -> list[str]:
    schedules = {}
    for r in report.rows:
        for rule, schedule in ((r.lr_rule, r.lr_mult_schedule), (r.decay_rule, r.decay_mult_schedule)):
            if schedule:
                schedules.setdefault((rule, schedule), None)
    if not schedules:
        return []
    return [f"* scheduled multiplier, its value at step {report.step}:"] + [
        f"  {rule}: {schedule}" for rule, schedule in schedules
    ]


def _parameter_totals(report: _Report) -> list[str]:
    trained = [r for r in report.rows if r.status == TRAINED]
    lines = [f"Trainable: {sum(r.params for r in trained):,} params in {len(trained)} variables."]
    frozen = [r for r in report.rows if r.status == FROZEN]
    if frozen:
        frozen_layers = sorted({r.layer for r in frozen})
        shown = ", ".join(frozen_layers[:5]) + (", ..." if len(frozen_layers) > 5 else "")
        lines.append(
            f"FROZEN (trainable=False): {sum(r.params for r in frozen):,} params in "
            f"{len(frozen_layers)} layer{'s' if len(frozen_layers) != 1 else ''} ({shown}); "
            "not trained."
        )
    if report.non_trainable_params:
        lines.append(
            f"Non-trainable state (not listed, e.g. BatchNorm statistics): "
            f"{report.non_trainable_params:,} params."
        )
    return lines


def _wrapped(lines: Sequence[str], width: int) -> list[str]:
    """Lines wrapped to ``width``; continuation lines indented under their text."""
    wrapped = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        wrapped += textwrap.wrap(line, width=max(width, 40), subsequent_indent=indent) or [""]
    return wrapped
