"""Rules: which variable gets which multiplier.

A rule set is an ordered list of ``(selector, value)`` pairs; for each variable
the first rule whose selector matches wins, and unmatched variables get 1.0.
This module knows nothing about optimizers: it turns user input into rules,
resolves rules against variables, and (de)serializes them.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import numbers
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import keras

Selector = Union[
    keras.Layer,
    keras.Variable,
    str,
    "re.Pattern[str]",
    type,
    Callable[[keras.Variable], bool],
    tuple,
]
"""Anything that picks variables: see `LayerwiseOptimizer` for the kinds."""

RuleSpec = Union[Mapping[Any, float], Sequence[tuple[Any, float]], None]
"""An ordered mapping ``{selector: value}`` or a list of ``(selector, value)``."""


def variable_path(variable) -> str:
    """The variable's path (``"block/dense/kernel"``), the name as a fallback."""
    return getattr(variable, "path", None) or variable.name


def same_variable_path(saved: str, current: str) -> bool:
    """Equal up to outer-model prefixes, which Keras drops across ``load_model``."""
    return saved == current or saved.endswith("/" + current) or current.endswith("/" + saved)


def structural_path(variable, owners) -> str:
    """``"net/enc/d/kernel"``: the names of the layers holding the variable, outermost first.

    Layer names survive ``load_model`` where variable paths lose their outer
    prefixes, so two sub-models with equally named layers stay apart.
    """
    chain = sorted(owners, key=lambda layer: -len(layer.weights))
    return "/".join([layer.name for layer in chain] + [variable.name.split(":")[0]])


def uses_structure(selector) -> bool:
    """Whether the selector matches by `structural_path` when it can see the layers."""
    if isinstance(selector, _AnyOf):
        return any(uses_structure(s) for s in selector.selectors)
    return isinstance(selector, _SavedPaths) and selector.structures is not None


def _segment_subpaths(path: str) -> list[str]:
    """Every run of consecutive path segments: ``a/b/c`` -> ``a, a/b, a/b/c, b, ...``."""
    parts = path.split("/")
    return [
        "/".join(parts[i:j])
        for i in range(len(parts))
        for j in range(i + 1, len(parts) + 1)
    ]


# --- selectors ---------------------------------------------------------------
# Each selector answers `matches(variable, layers_of)` where `layers_of(v)`
# returns the layers that own `v` (needed only by layer-type selectors).


class _Selector:
    needs_layers = False
    resolvable = True  # False once restored without the live object it needs
    # `search(path)` when the selector looks at nothing but the variable path:
    # `resolve` then computes each path once and skips the method calls.
    path_search: Callable[[str], Any] | None = None

    def matches(self, variable, layers_of) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def to_config(self) -> dict:
        """A JSON-able form; selectors bound to live objects keep a description."""
        return {"unresolvable": self.describe()}

    def own_variables(self):
        """Variables the selector names directly (layers, variables), else None."""
        return None


class _Glob(_Selector):
    def __init__(self, pattern: str):
        if not pattern:
            raise ValueError("An empty string is not a valid selector.")
        self.pattern = pattern
        self.path_search = _glob_regex(pattern).search

    def matches(self, variable, layers_of):
        return self.path_search(variable_path(variable)) is not None

    def describe(self):
        return repr(self.pattern)

    def to_config(self):
        return {"glob": self.pattern}


def _glob_regex(pattern: str) -> re.Pattern:
    """Matches iff the glob matches some run of whole segments of the path.

    A run starts at the path's start or after a "/" and ends at its end or
    before a "/": one search instead of an fnmatch per run (n^2/2 of them).
    """
    body = re.sub(r"\\[Zz]$", "", fnmatch.translate(pattern))
    return re.compile(r"(?:^|(?<=/))(?:" + body + r")(?=/|$)")


class _Regex(_Selector):
    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern
        self.path_search = pattern.search

    def matches(self, variable, layers_of):
        return self.pattern.search(variable_path(variable)) is not None

    def describe(self):
        return f"re.compile({self.pattern.pattern!r})"

    def to_config(self):
        return {"regex": self.pattern.pattern, "flags": int(self.pattern.flags)}


class _LayerInstance(_Selector):
    def __init__(self, layer: keras.Layer):
        self.layer = layer

    def own_variables(self):
        return self.layer.weights

    def matches(self, variable, layers_of):
        return any(variable is w for w in self.layer.weights)

    def describe(self):
        return f"layer {self.layer.name!r}"

    def to_config(self):
        # Frozen weights included: they get this multiplier once unfrozen.
        return {"paths": [variable_path(w) for w in self.layer.weights], "description": self.describe()}


class _VariableInstance(_Selector):
    def __init__(self, variable):
        self.variable = variable

    def own_variables(self):
        return [self.variable]

    def matches(self, variable, layers_of):
        return variable is self.variable

    def describe(self):
        return f"variable {variable_path(self.variable)!r}"

    def to_config(self):
        return {"paths": [variable_path(self.variable)], "description": self.describe()}


class _SavedPaths(_Selector):
    """A layer or variable selector restored from a config, by its variables' paths."""

    def __init__(self, paths, description: str, structures=None):
        self.paths = tuple(paths)
        self.description = description
        self.structures = None if structures is None else tuple(structures)

    def matches(self, variable, layers_of):
        if self.structures is not None and layers_of is not None:
            return structural_path(variable, layers_of(variable)) in self.structures
        path = variable_path(variable)
        return any(same_variable_path(saved, path) for saved in self.paths)

    def describe(self):
        return self.description

    def to_config(self):
        config = {"paths": list(self.paths), "description": self.description}
        if self.structures is not None:
            config["structures"] = list(self.structures)
        return config


class _LayerType(_Selector):
    needs_layers = True

    def __init__(self, layer_type: type):
        self.layer_type = layer_type

    def matches(self, variable, layers_of):
        return any(isinstance(layer, self.layer_type) for layer in layers_of(variable))

    def describe(self):
        return f"type {self.layer_type.__name__}"

    def to_config(self):
        name = _layer_type_name(self.layer_type)
        if name is None:  # the saved multipliers still restore it
            return super().to_config()
        return {"layer_type": name}


class _Predicate(_Selector):
    def __init__(self, predicate: Callable):
        self.predicate = predicate

    def matches(self, variable, layers_of):
        try:
            return bool(self.predicate(variable))
        except Exception as error:
            raise ValueError(
                f"The rule {self.describe()} raised {type(error).__name__} on the "
                f"variable {variable_path(variable)!r}: {error}. A predicate gets each "
                "keras.Variable (.path, .name, .shape, .dtype) and returns True or False."
            ) from error

    def describe(self):
        name = getattr(self.predicate, "__qualname__", None) or repr(self.predicate)
        return f"predicate {name}"


class _AnyOf(_Selector):
    def __init__(self, selectors: tuple[_Selector, ...]):
        if not selectors:
            raise ValueError("An empty tuple is not a valid selector.")
        self.selectors = selectors
        self.needs_layers = any(s.needs_layers for s in selectors)
        self.resolvable = all(s.resolvable for s in selectors)

    def own_variables(self):
        parts = [s.own_variables() for s in self.selectors]
        if any(p is None for p in parts):
            return None
        return [v for p in parts for v in p]

    def matches(self, variable, layers_of):
        return any(s.matches(variable, layers_of) for s in self.selectors)

    def describe(self):
        return "(" + ", ".join(s.describe() for s in self.selectors) + ")"

    def to_config(self):
        return {"any": [s.to_config() for s in self.selectors]}


class _Unresolvable(_Selector):
    """A selector restored from a config whose live object could not be saved."""

    resolvable = False

    def __init__(self, description: str):
        self.description = description

    def matches(self, variable, layers_of):
        raise ValueError(
            f"The rule {self.description} was a function, which cannot be saved, "
            "so after loading it cannot decide the multiplier of a variable that "
            f"was not trained when the model was saved ({variable_path(variable)!r}). "
            "Create a new LayerwiseOptimizer with rules for this model."
        )

    def describe(self):
        return self.description


def _layer_type_name(layer_type: type) -> str | None:
    """A name that finds the class again on load, or None."""
    if getattr(keras.layers, layer_type.__name__, None) is layer_type:
        return layer_type.__name__
    registered = keras.saving.get_registered_name(layer_type)
    if keras.saving.get_registered_object(registered) is layer_type:
        return registered
    return None


def _is_variable(obj) -> bool:
    if isinstance(obj, keras.Variable):
        return True
    # Raw tf.Variables reach us in hand-written TensorFlow loops.
    return type(obj).__name__ in ("ResourceVariable", "UninitializedVariable")


def make_selector(obj) -> _Selector:
    """Turns user input into a selector, or raises a TypeError naming the kinds."""
    if isinstance(obj, _Selector):
        return obj
    if isinstance(obj, keras.optimizers.Optimizer):
        raise TypeError(f"An optimizer is not a selector: {obj!r}.")
    if isinstance(obj, keras.Layer):
        return _LayerInstance(obj)
    if _is_variable(obj):
        return _VariableInstance(obj)
    if isinstance(obj, str):
        return _Glob(obj)
    if isinstance(obj, re.Pattern):
        return _Regex(obj)
    if isinstance(obj, type):
        if issubclass(obj, keras.Layer):
            return _LayerType(obj)
        raise TypeError(
            f"The class {obj.__name__} is not a selector: only subclasses of "
            "keras.Layer select variables by type."
        )
    if isinstance(obj, tuple):
        return _AnyOf(tuple(make_selector(o) for o in obj))
    if callable(obj):
        return _Predicate(obj)
    raise TypeError(
        f"Unknown selector {obj!r} of type {type(obj).__name__}. Expected one of: "
        "a keras.Layer, a keras.Variable, a glob string over variable paths "
        "(e.g. 'backbone' or '*bias'), a compiled re.Pattern, a keras.Layer "
        "subclass, a callable(variable) -> bool, or a tuple of these."
    )


def selector_from_config(config: dict) -> _Selector:
    if "glob" in config:
        return _Glob(config["glob"])
    if "regex" in config:
        return _Regex(re.compile(config["regex"], config.get("flags", 0)))
    if "layer_type" in config:
        name = config["layer_type"]
        layer_type = getattr(keras.layers, name, None) or keras.saving.get_registered_object(name)
        if layer_type is None:
            raise ValueError(
                f"Unknown layer type {name!r} in a saved layerlr rule: import the "
                "module that registers it before loading."
            )
        return _LayerType(layer_type)
    if "paths" in config:
        return _SavedPaths(config["paths"], config.get("description", "saved paths"), config.get("structures"))
    if "any" in config:
        return _AnyOf(tuple(selector_from_config(c) for c in config["any"]))
    if "unresolvable" in config:
        return _Unresolvable(config["unresolvable"])
    raise ValueError(f"Unknown saved selector {config!r}.")


# --- values ------------------------------------------------------------------

Multiplier = Union[float, keras.optimizers.schedules.LearningRateSchedule]
"""A multiplier: a number, or a schedule of the optimizer step evaluated in-graph."""


def as_multiplier(value, what: str) -> Multiplier:
    """Validates a multiplier: a finite number >= 0, or a LearningRateSchedule."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{what} must be a finite number >= 0 or a "
            "keras.optimizers.schedules.LearningRateSchedule (see layerlr.schedules), "
            f"got {value!r} of type {type(value).__name__}."
        )
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}.")
    return value


def multiplier_to_config(value: Multiplier):
    if isinstance(value, float):
        return value
    return {"schedule": keras.saving.serialize_keras_object(value)}


def multiplier_from_config(config, what: str) -> Multiplier:
    if isinstance(config, dict) and "schedule" in config:
        config = keras.saving.deserialize_keras_object(config["schedule"])
    return as_multiplier(config, what)


# --- rules -------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    selector: _Selector
    value: Multiplier

    def describe(self) -> str:
        return self.selector.describe()


def parse_rules(spec: RuleSpec, kind: str) -> tuple[Rule, ...]:
    """Turns ``{selector: value}`` or ``[(selector, value), ...]`` into rules."""
    if spec is None:
        return ()
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, (set, frozenset)):
        raise TypeError(
            f"{kind} must be ordered (the first matching rule wins), got a "
            f"{type(spec).__name__}: use a dict or a list of (selector, multiplier) pairs."
        )
    elif isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
        raise TypeError(
            f"{kind} must be a dict {{selector: multiplier}} or a list of "
            f"(selector, multiplier) pairs, got {type(spec).__name__}: {spec!r}."
        )
    else:
        items = list(spec)
        for i, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(
                    f"{kind}[{i}] must be a (selector, multiplier) pair, got {item!r}."
                )
    rules = []
    for selector, value in items:
        sel = make_selector(selector)
        rules.append(Rule(sel, as_multiplier(value, f"{kind} for {sel.describe()}")))
    return tuple(rules)


def rules_to_config(rules: tuple[Rule, ...]) -> list[dict]:
    return [
        {"selector": r.selector.to_config(), "value": multiplier_to_config(r.value)}
        for r in rules
    ]


def rules_from_config(config) -> tuple[Rule, ...]:
    return tuple(
        Rule(selector_from_config(c["selector"]), multiplier_from_config(c["value"], "value"))
        for c in config or ()
    )


def resolve(
    rules: tuple[Rule, ...],
    variables: Sequence,
    kind: str,
    layers_of: Callable | None = None,
    frozen: Sequence = (),
    model_weights: set[int] | None = None,
    check_unused: bool = True,
) -> list[tuple[Multiplier, str | None]]:
    """Per variable: ``(value, description of the winning rule or None)``.

    Raises a ValueError naming the rule when a rule selects none of
    ``variables`` nor of the ``frozen`` ones (whose multiplier applies once
    they are unfrozen).
    """
    if layers_of is None and any(r.selector.needs_layers for r in rules):
        raise ValueError(
            f"The {kind} rule(s) "
            + ", ".join(r.describe() for r in rules if r.selector.needs_layers)
            + " select by layer type, which needs the model's layers. Train through "
            "model.fit / train_on_batch, or build the optimizer with "
            "`optimizer.build(model)` before a custom training loop."
        )
    result: list[tuple[Multiplier, str | None]] = []
    used = [False] * len(rules)
    searches = [rule.selector.path_search for rule in rules]
    descriptions = [rule.describe() for rule in rules]
    for variable in variables:
        path = variable_path(variable)
        for i, rule in enumerate(rules):
            search = searches[i]
            if (
                search(path) is not None
                if search is not None
                else rule.selector.matches(variable, layers_of)
            ):
                result.append((rule.value, descriptions[i]))
                used[i] = True
                break
        else:
            result.append((1.0, None))
    for rule, was_used in zip(rules, used):
        if check_unused and not was_used and not any(rule.selector.matches(v, layers_of) for v in frozen):
            _raise_if_selects_nothing(rule, rules, variables, kind, layers_of, model_weights)
    return result


def _raise_if_selects_nothing(
    rule: Rule, rules, variables, kind: str, layers_of, model_weights=None
) -> None:
    own = rule.selector.own_variables()
    if own:
        # A frozen layer still counts: its multiplier applies once it is unfrozen.
        if model_weights is not None and not any(id(v) in model_weights for v in own):
            example = (
                f"model.get_layer({rule.selector.layer.name!r})"
                if isinstance(rule.selector, _LayerInstance) else "model.get_layer(name)"
            )
            raise ValueError(
                f"The {kind} rule {rule.describe()} selects no variable of the model "
                "being trained: it is not part of the model (is it from another model, "
                "e.g. the original of keras.models.clone_model?). Select the layer of "
                f"the model you train, e.g. {example}."
            )
        return
    if own is not None:
        raise ValueError(
            f"The {kind} rule {rule.describe()} selects no variable: the layer has "
            "no weights yet. Build the model (call it on data or use "
            "model.build(input_shape)) before building the optimizer."
        )
    shadowed = next((v for v in variables if rule.selector.matches(v, layers_of)), None)
    if shadowed is not None:
        # Legitimate when composing rule lists (first match wins), so not an error.
        winner = next(r for r in rules if r.selector.matches(shadowed, layers_of))
        warnings.warn(
            f"layerlr: the {kind} rule {rule.describe()} never applies: every "
            f"variable it selects (e.g. {variable_path(shadowed)!r}) is taken by the "
            f"earlier rule {winner.describe()} (first match wins). Put the more "
            "specific rule first if that is not what you meant.",
            stacklevel=4,
        )
        return
    if not variables:
        raise ValueError(
            f"The {kind} rule {rule.describe()} selects nothing: there are no "
            "trainable variables yet. Build the model first (call it on a batch, or "
            "model.build(input_shape)), or let model.fit build it."
        )
    paths = [variable_path(v) for v in variables]
    hint = ""
    if isinstance(rule.selector, _Glob):
        candidates = sorted({s for p in paths for s in _segment_subpaths(p)})
        close = difflib.get_close_matches(rule.selector.pattern, candidates, n=3, cutoff=0.5)
        if close:
            hint = " Closest paths: " + ", ".join(repr(c) for c in close) + "."
    if isinstance(rule.selector, _Glob) and (
        ".*" in rule.selector.pattern or any(c in rule.selector.pattern for c in "^$+()|{}\\")
    ):
        hint += (
            " Strings are glob patterns over whole path segments, not regular "
            "expressions: for a regex pass re.compile(...)."
        )
    shown = ", ".join(repr(p) for p in paths[:8]) + (", ..." if len(paths) > 8 else "")
    raise ValueError(
        f"The {kind} rule {rule.describe()} matches none of the {len(paths)} "
        f"trainable variables ({shown}).{hint} Fix the selector or remove the rule. "
        "(Frozen layers count when the optimizer is built from the model, as in "
        "model.fit or optimizer.build(model); a layer object always works.)"
    )
