"""Who gets which multiplier: rules resolved over a model's variables.

`LayerwiseOptimizer` resolves its rules here when it is built and
`multi_optimizer` routes its groups here; both match settings saved with a
model back to its variables here after ``load_model``. What comes out is a
`VariableMultipliers` per variable, and, for reporting, an `Assignment`: the
multipliers together with the rates they give now
(`LayerwiseOptimizer.resolve`, `layerlr.resolve`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from layerlr.core import _keras, _rules
from layerlr.core._rules import Multiplier, same_variable_path, variable_path


@dataclass(frozen=True)
class VariableMultipliers:
    """What one trainable variable gets, and which rule decided it.

    ``lr_rule`` / ``decay_rule`` describe the first matching rule, or are None
    when no rule matched and the default 1.0 applies; ``lr_rule_index`` /
    ``decay_rule_index`` are that rule's position among the optimizer's rules
    (two rules may print alike: two lambdas, two layers of one name).
    ``start_step`` is the optimizer step at which the variable started
    training (it was unfrozen then, or its scheduled multiplier left 0): it
    counts its own steps from there, like a parameter added with
    ``add_param_group`` at that step.
    """

    path: str
    lr_mult: Multiplier
    decay_mult: Multiplier
    lr_rule: str | None
    decay_rule: str | None
    start_step: int = 0
    lr_rule_index: int | None = None
    decay_rule_index: int | None = None

    def to_config(self) -> dict:
        return {
            "path": self.path,
            "lr_mult": _rules.multiplier_to_config(self.lr_mult),
            "decay_mult": _rules.multiplier_to_config(self.decay_mult),
            "lr_rule": self.lr_rule,
            "decay_rule": self.decay_rule,
            "start_step": self.start_step,
            "lr_rule_index": self.lr_rule_index,
            "decay_rule_index": self.decay_rule_index,
        }

    @classmethod
    def from_config(cls, config: dict) -> VariableMultipliers:
        path = str(config["path"])
        return cls(
            path=path,
            lr_mult=_rules.multiplier_from_config(config["lr_mult"], f"saved lr_mult of {path}"),
            decay_mult=_rules.multiplier_from_config(config["decay_mult"], f"saved decay_mult of {path}"),
            lr_rule=config.get("lr_rule"),
            decay_rule=config.get("decay_rule"),
            start_step=int(config.get("start_step", 0)),
            # Absent from files saved by layerlr 0.1.0.
            lr_rule_index=config.get("lr_rule_index"),
            decay_rule_index=config.get("decay_rule_index"),
        )

    def same_multipliers(self, other: VariableMultipliers) -> bool:
        return (_rules.multiplier_to_config(self.lr_mult), _rules.multiplier_to_config(self.decay_mult)) == (
            _rules.multiplier_to_config(other.lr_mult), _rules.multiplier_to_config(other.decay_mult))


@dataclass(frozen=True)
class Assignment:
    """One variable of a model: its multipliers and the rates they give now.

    ``trained`` is False for a variable of a frozen layer: its multipliers are
    the ones it gets once unfrozen (None when its rules cannot tell, e.g.
    rules restored from a save that were functions). ``new`` marks a trained
    variable the built optimizer has not seen yet (unfrozen since it was
    built): it gets these multipliers when training resumes. ``lr_mult`` and
    ``decay_mult`` are the multipliers' values at the optimizer's current
    step (schedules evaluated); ``learning_rate`` and ``weight_decay`` the
    effective values now, for trained variables (weight decay None when the
    optimizer has none, 0.0 for a variable excluded from it).
    """

    variable: Any
    path: str
    trained: bool
    multipliers: VariableMultipliers | None
    new: bool = False
    lr_mult: float | None = None
    decay_mult: float | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None


def layer_lookup(model) -> Callable[[Any], tuple] | None:
    """variable -> the layers that own it, for selectors that need layers (None without a model)."""
    if model is None:
        return None
    owners = _keras.layers_of_model(model)
    return lambda variable: owners.get(id(variable), ())


def _needs_model(rules) -> bool:
    return any(r.selector.needs_layers or _rules.uses_structure(r.selector) for r in rules)


def resolve_in_model(
    rules: tuple[_rules.Rule, ...],
    variables: Sequence,
    kind: str,
    model,
    check_unused: bool = True,
) -> list[tuple[Multiplier, int | None]]:
    """`_rules.resolve` with the model's layers, and its frozen weights as candidates.

    A rule that selects only frozen variables is not an error: its multiplier
    applies once they are unfrozen.
    """
    return _rules.resolve(rules, variables, kind, *_model_context(model, rules), check_unused)


def _model_context(model, rules) -> tuple:
    """(layer lookup if the rules need one, frozen candidates, ids of the model's weights)."""
    if model is None:
        return None, (), None
    layers_of = layer_lookup(model) if _needs_model(rules) else None
    return layers_of, _keras.frozen_weights(model), {id(w) for w in model.weights}


def multipliers_of(
    lr_rules: tuple[_rules.Rule, ...],
    decay_rules: tuple[_rules.Rule, ...],
    variables: Sequence,
    model,
    check_unused: bool = True,
) -> tuple[VariableMultipliers, ...]:
    """What the rules give each of ``variables`` (start steps not decided yet: 0).

    Without ``model``, rules that need layers look for the model being
    trained among the callers (`_keras.find_model`).
    """
    if model is None and _needs_model(lr_rules + decay_rules):
        model = _keras.find_model(variables)
    context = _model_context(model, lr_rules + decay_rules)  # computed once for both
    lrs = _rules.resolve(lr_rules, variables, "lr_mult", *context, check_unused)
    decays = _rules.resolve(decay_rules, variables, "decay_mult", *context, check_unused)
    return tuple(
        VariableMultipliers(
            _rules.variable_path(v), lr, decay,
            None if lr_index is None else lr_rules[lr_index].describe(),
            None if decay_index is None else decay_rules[decay_index].describe(),
            lr_rule_index=lr_index, decay_rule_index=decay_index,
        )
        for v, (lr, lr_index), (decay, decay_index) in zip(variables, lrs, decays)
    )


def match_in_model(
    saved_paths: Sequence[str],
    saved_structures: Sequence[str] | None,
    variables: Sequence,
    model,
    *,
    frozen_too: bool = True,
) -> list | str:
    """The variables in the order they were saved, or why they cannot be matched.

    The one matching policy for everything saved per variable (multipliers,
    start steps, multi_optimizer routes): by `structural_path` (layer names
    from the outer model down) when both the save and the model know their
    layers, else by variable path up to an outer-model prefix; a saved entry
    that could be either of two variables is refused (`match_saved`).
    ``frozen_too``: a saved variable may be frozen now (its state is kept).
    """
    frozen = _keras.frozen_weights(model) if model is not None and frozen_too else ()
    if saved_structures is not None and model is not None:
        ordered = match_saved(saved_structures, variables, frozen, path_of=structure_lookup(model))
    else:
        ordered = match_saved(saved_paths, variables, frozen)
    if isinstance(ordered, str) and len(saved_paths) != len(variables):
        ordered = f"{len(saved_paths)} trainable variables were saved, the model has {len(variables)}; {ordered}"
    return ordered


def match_saved(saved_paths: Sequence[str], trainable, frozen, path_of=variable_path) -> list | str:
    """The model's variables in the saved order, or a description of the mismatch.

    Exact paths are matched first, then paths that differ by an outer prefix;
    a saved path that could be either of two variables is refused. Frozen
    variables may match: their state was saved while they trained.
    ``path_of`` gives the current path to compare (`structural_path` when the
    model's layers are known: then only exact matches count).
    """
    pool = list(trainable) + [v for v in frozen if not any(v is t for t in trainable)]
    paths = [path_of(v) for v in pool]
    chosen: list = [None] * len(saved_paths)
    used: set[int] = set()
    tests = (str.__eq__,) if path_of is not variable_path else (str.__eq__, same_variable_path)
    for same in tests:
        for i, saved in enumerate(saved_paths):
            if chosen[i] is not None:
                continue
            candidates = [j for j, path in enumerate(paths) if j not in used and same(saved, path)]
            if len(candidates) > 1 and same is not str.__eq__:
                a, b = (paths[j] for j in candidates[:2])
                return (
                    f"the saved variable {saved!r} could be {a!r} or {b!r} (paths lose "
                    "outer-model prefixes across load_model)"
                )
            if candidates:
                chosen[i] = pool[candidates[0]]
                used.add(candidates[0])
    for i, saved in enumerate(saved_paths):
        if chosen[i] is None:
            return f"the saved variable #{i} {saved!r} has no counterpart in the model"
    for j, variable in enumerate(pool[: len(trainable)]):
        if j not in used:
            return f"the trainable variable {paths[j]!r} was not saved with the optimizer"
    return chosen


def saved_rules_drift(resolve_again: Callable[[], Sequence], saved: Sequence, same: Callable,
                      path_of: Callable, changed: str) -> str | None:
    """Why the rules, resolved again, no longer give what was saved; None when they do.

    After ``load_model`` the saved per-variable settings are kept either way;
    this only says whether to warn (rules anchored on outer-model path
    prefixes break across loading). ``changed`` is the reason's text with
    ``{}`` for the first paths that differ.
    """
    try:
        fresh = resolve_again()
    except ValueError as error:
        return str(error)
    paths = [path_of(s) for f, s in zip(fresh, saved) if not same(f, s)]
    return changed.format(paths[:3]) if paths else None


def structure_lookup(model) -> Callable[[Any], str] | None:
    """variable -> its `structural_path` in ``model`` (None without a model)."""
    if model is None:
        return None
    owners = _keras.layers_of_model(model)
    return lambda variable: _rules.structural_path(variable, owners.get(id(variable), ()))


def value_now(multiplier: Multiplier, iterations) -> float:
    """A multiplier's value at step ``iterations``, as a Python float (eagerly)."""
    if isinstance(multiplier, float):
        return multiplier
    return float(_keras.eager_value(multiplier(iterations)))


def weight_decay_now(inner, variable, decay_mult: float) -> float | None:
    """The weight decay ``variable`` gets: None without any, 0.0 when it is excluded."""
    base = _keras.base_weight_decay(inner, variable)
    if base is None:
        return None if getattr(inner, "weight_decay", None) is None else 0.0
    return float(base) * decay_mult
