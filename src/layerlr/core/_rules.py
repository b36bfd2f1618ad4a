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
# `resolve` asks each selector once per resolution for a cheaper equivalent
# test (`_compile`), because `matches` on a layer would rebuild `layer.weights`
# for every variable tested (seconds for 10,000 variables).

# What a compiled test looks at: `id(variable) in a set`, the variable's path,
# or the variable itself.
_IDS, _PATH, _VAR = "ids", "path", "variable"
_IDS_OR_PATH = "ids or path"  # (ids, path test): a tuple of layers and globs


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

    def _compile(self, context: _Context) -> tuple[str, Any]:
        """``(kind, test)`` deciding as `matches` does, for one resolution.

        ``_IDS``: a set of ``id(variable)``; ``_PATH``: an ``re.Pattern`` that
        `search`es the path, or ``test(path)``, truthy on a match; ``_VAR``:
        ``test(variable)``, truthy on a match; ``_IDS_OR_PATH``: ``(ids, path
        test)``, a match when either matches.
        """
        if self.path_search is not None:
            return _PATH, self.path_search
        layers_of = context.layers_of
        return _VAR, lambda variable: self.matches(variable, layers_of)


class _Glob(_Selector):
    def __init__(self, pattern: str):
        if not pattern:
            raise ValueError("An empty string is not a valid selector.")
        self.pattern = pattern
        self.regex = _glob_regex(pattern)
        self.path_search = self.regex.search

    def matches(self, variable, layers_of):
        return self.path_search(variable_path(variable)) is not None

    def _compile(self, context):
        return _PATH, self.regex

    def describe(self):
        return repr(self.pattern)

    def to_config(self):
        return {"glob": self.pattern}


def _glob_regex(pattern: str) -> re.Pattern:
    """Matches iff the glob matches some run of whole segments of the path.

    A run starts at the path's start or after a "/" and ends at its end or
    before a "/": one search instead of an fnmatch per run (n^2/2 of them).
    The boundaries are negative lookarounds rather than ``(?:^|(?<=/))``,
    and a leading literal is matched before its boundary is checked, which
    lets `re` scan for the literal like ``str.find``: 2-5x faster searches,
    the bulk of resolving 100 globs.
    """
    literal = re.match(r"[^*?\[]*", pattern).group()
    rest = pattern[len(literal):]
    body = re.sub(r"\\[Zz]$", "", fnmatch.translate(rest)) if rest else ""
    if not literal:
        return re.compile(r"(?<![^/])(?:" + body + r")(?![^/])")
    escaped = re.escape(literal)
    return re.compile(escaped + r"(?<![^/]" + escaped + r")(?:" + body + r")(?![^/])")


def _search_of(path_test) -> Callable[[str], Any]:
    """A compiled path test (a pattern or a callable) as ``test(path)``."""
    return path_test.search if isinstance(path_test, re.Pattern) else path_test


def _joinable(path_test) -> bool:
    """True for a pattern that means the same inside ``(?:...)|(?:...)``.

    Without groups there are no backreferences to renumber, and with no flags
    but the default there are no global inline flags (``(?i)``, ``(?x)``) that
    would apply to, or be refused in, the joined pattern.
    """
    return (isinstance(path_test, re.Pattern) and isinstance(path_test.pattern, str)
            and path_test.groups == 0 and path_test.flags == re.UNICODE)


def _join(patterns) -> re.Pattern:
    """One pattern that `search`es a path iff one of the `_joinable` ``patterns`` does."""
    return re.compile("|".join(f"(?:{p.pattern})" for p in patterns))


class _Regex(_Selector):
    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern
        self.path_search = pattern.search

    def matches(self, variable, layers_of):
        return self.pattern.search(variable_path(variable)) is not None

    def _compile(self, context):
        return _PATH, self.pattern

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

    def _compile(self, context):
        return _IDS, context.weight_ids(self.layer)

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

    def _compile(self, context):
        return _IDS, {id(self.variable)}

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

    def _compile(self, context):
        if self.structures is not None and context.layers_of is not None:
            return _VAR, lambda variable: self.matches(variable, context.layers_of)
        return _IDS, context.same_path_ids(self.paths)

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

    def _compile(self, context):
        return _IDS, context.type_ids(self.layer_type)

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
            raise self.error(error, variable) from error

    def error(self, error: Exception, variable) -> ValueError:
        return ValueError(
            f"The rule {self.describe()} raised {type(error).__name__} on the "
            f"variable {variable_path(variable)!r}: {error}. A predicate gets each "
            "keras.Variable (.path, .name, .shape, .dtype) and returns True or False."
        )

    def _compile(self, context):
        # The bare predicate saves a call per test; `resolve` wraps its errors
        # as `matches` does.
        return _VAR, self.predicate

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

    def _compile(self, context):
        parts = [
            # Inside a tuple a predicate's errors must be wrapped where it is called.
            (_VAR, lambda v, s=s: s.matches(v, None)) if isinstance(s, _Predicate)
            else s._compile(context)
            for s in self.selectors
        ]
        if any(kind is _VAR for kind, _ in parts):
            # A variable test may raise or have effects: keep the tuple's order.
            parts = [(kind, _search_of(part) if kind is _PATH else
                      (part[0], _search_of(part[1])) if kind is _IDS_OR_PATH else part)
                     for kind, part in parts]

            def test(variable):
                for kind, part in parts:
                    if kind is _IDS:
                        if id(variable) in part:
                            return True
                    elif kind is _PATH:
                        if part(variable_path(variable)):
                            return True
                    elif kind is _IDS_OR_PATH:
                        if id(variable) in part[0] or part[1](variable_path(variable)):
                            return True
                    elif part(variable):
                        return True
                return False

            return _VAR, test
        # Membership and path tests cannot raise, so their order is free: the
        # set is settled up front like a layer's, the paths in the loop.
        ids: set[int] = set()
        paths = []  # patterns or callables
        for kind, part in parts:
            if kind is _IDS:
                ids |= part
            elif kind is _PATH:
                paths.append(part)
            else:
                ids |= part[0]
                paths.append(part[1])
        if not paths:
            return _IDS, ids
        if len(paths) == 1:
            path_test = paths[0]
        elif all(_joinable(p) for p in paths):
            path_test = _join(paths)  # one search instead of one per part
        else:
            searches = [_search_of(p) for p in paths]
            path_test = lambda path: any(search(path) for search in searches)  # noqa: E731
        return (_IDS_OR_PATH, (ids, path_test)) if ids else (_PATH, path_test)

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


def selector_pairs(spec, name: str, value: str) -> list:
    """``spec`` as a list of (selector, value) pairs: a mapping's items, or a list of pairs.

    ``name`` (the argument) and ``value`` (what a selector maps to) go into the errors.
    """
    if isinstance(spec, Mapping):
        return list(spec.items())
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
        raise TypeError(
            f"{name} must be a dict {{selector: {value}}} or a list of "
            f"(selector, {value}) pairs, got {type(spec).__name__}: {spec!r}."
        )
    items = list(spec)
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"{name}[{i}] must be a (selector, {value}) pair, got {item!r}.")
    return items


def parse_rules(spec: RuleSpec, kind: str) -> tuple[Rule, ...]:
    """Turns ``{selector: value}`` or ``[(selector, value), ...]`` into rules."""
    if spec is None:
        return ()
    if isinstance(spec, (set, frozenset)):
        raise TypeError(
            f"{kind} must be ordered (the first matching rule wins), got a "
            f"{type(spec).__name__}: use a dict or a list of (selector, multiplier) pairs."
        )
    items = selector_pairs(spec, kind, "multiplier")
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


class _Context:
    """What the selectors of one resolution share, each computed at most once.

    Valid for one call of `resolve` only: layers gain weights and variables
    are created between calls.
    """

    def __init__(self, layers_of: Callable | None, tested: Sequence):
        self.layers_of = layers_of
        self._tested = tested  # every variable a rule is asked about
        self._weight_ids: dict[int, set[int]] = {}
        self._owners: list | None = None
        self._by_path: dict[str, list[int]] | None = None
        self._by_tail: dict[str, list[int]] | None = None

    def weight_ids(self, layer) -> set[int]:
        """``id`` of every weight of ``layer``, frozen ones included."""
        ids = self._weight_ids.get(id(layer))
        if ids is None:
            ids = self._weight_ids[id(layer)] = {id(w) for w in layer.weights}
        return ids

    def type_ids(self, layer_type: type) -> set[int]:
        """The tested variables owned by some instance of ``layer_type``.

        Each owning layer is type-checked once, not once per variable it owns.
        """
        if self._owners is None:
            owned: dict[int, tuple[Any, list[int]]] = {}
            for variable in self._tested:
                for layer in self.layers_of(variable):
                    entry = owned.get(id(layer))
                    if entry is None:
                        owned[id(layer)] = (layer, [id(variable)])
                    else:
                        entry[1].append(id(variable))
            self._owners = list(owned.values())
        ids: set[int] = set()
        for layer, owned_ids in self._owners:
            if isinstance(layer, layer_type):
                ids.update(owned_ids)
        return ids

    def same_path_ids(self, saved_paths) -> set[int]:
        """The tested variables whose path is `same_variable_path` as a saved one.

        Looked up from the saved paths' side: a path matches when equal, or
        when one is a run of trailing segments of the other.
        """
        if self._by_path is None:
            self._by_path, self._by_tail = {}, {}
            for variable in self._tested:
                path = variable_path(variable)
                self._by_path.setdefault(path, []).append(id(variable))
                for tail in _proper_tails(path):
                    self._by_tail.setdefault(tail, []).append(id(variable))
        ids: set[int] = set()
        for saved in saved_paths:
            ids.update(self._by_path.get(saved, ()))  # equal
            ids.update(self._by_tail.get(saved, ()))  # saved is a tail of the path
            for tail in _proper_tails(saved):  # the path is a tail of saved
                ids.update(self._by_path.get(tail, ()))
        return ids


def _proper_tails(path: str) -> list[str]:
    """What follows each "/": the ``t`` for which ``path.endswith("/" + t)``."""
    tails = []
    cut = path.find("/")
    while cut != -1:
        tails.append(path[cut + 1:])
        cut = path.find("/", cut + 1)
    return tails


# How `resolve` runs a per-variable test: on the variable, on its path, or as
# a chunk of consecutive path rules whose patterns are searched as one first.
_ON_VARIABLE, _ON_PATH, _CHUNK = 0, 1, 2


def _per_variable_tests(compiled) -> list[tuple[int, int, Any]]:
    """``(first rule index, how, test)`` for the rules not decided by set membership.

    Consecutive rules with `_joinable` patterns become one chunk, tested
    with all their patterns joined in one alternation, which matches iff
    one of them does; only then are they tried one by one. Most variables
    match few of the path rules, so a run of them mostly costs one C-level
    search instead of one Python call per rule.
    """
    tests: list[tuple[int, int, Any]] = []
    chunk: list[tuple[int, re.Pattern]] = []

    def close_chunk():
        if len(chunk) == 1:
            tests.append((chunk[0][0], _ON_PATH, chunk[0][1].search))
        elif chunk:
            members = [(i, pattern.search) for i, pattern in chunk]
            tests.append((chunk[0][0], _CHUNK, (_join([p for _, p in chunk]).search, members)))
        chunk.clear()

    for i, (test_kind, test) in enumerate(compiled):
        if test_kind is _IDS:
            continue
        if test_kind is _VAR:
            close_chunk()
            tests.append((i, _ON_VARIABLE, test))
            continue
        path_test = test if test_kind is _PATH else test[1]  # _IDS_OR_PATH: set settled apart
        if _joinable(path_test):
            chunk.append((i, path_test))
        else:
            close_chunk()
            tests.append((i, _ON_PATH, _search_of(path_test)))
    close_chunk()
    return tests


def _matcher(selector: _Selector, kind: str, test, layers_of) -> Callable[[Any], bool]:
    """``variable -> bool`` from a compiled test, for the checks after resolving."""
    if kind is _IDS:
        return lambda variable: id(variable) in test
    if kind is _PATH:
        search = _search_of(test)
        return lambda variable: bool(search(variable_path(variable)))
    if kind is _IDS_OR_PATH:
        ids, search = test[0], _search_of(test[1])
        return lambda variable: id(variable) in ids or bool(search(variable_path(variable)))
    return lambda variable: selector.matches(variable, layers_of)  # errors wrapped


def resolve(
    rules: tuple[Rule, ...],
    variables: Sequence,
    kind: str,
    layers_of: Callable | None = None,
    frozen: Sequence = (),
    model_weights: set[int] | None = None,
    check_unused: bool = True,
) -> list[tuple[Multiplier, int | None]]:
    """Per variable: ``(value, index of the winning rule, or None)``.

    Raises a ValueError naming the rule when a rule selects none of
    ``variables`` nor of the ``frozen`` ones (whose multiplier applies once
    they are unfrozen).
    """
    _require_layers_for_layer_types(rules, kind, layers_of)
    variables = list(variables)
    frozen = list(frozen) if check_unused else []
    context = _Context(layers_of, variables + frozen)
    compiled = [rule.selector._compile(context) for rule in rules]
    winners = _first_matches(rules, compiled, variables)
    if check_unused:
        _check_every_rule_selects_something(
            rules, compiled, winners, variables, frozen, kind, layers_of, model_weights)
    # The last entry is the outcome of winner len(rules): no rule matched.
    outcomes = [(rule.value, i) for i, rule in enumerate(rules)] + [(1.0, None)]
    return [outcomes[winner] for winner in winners]


def _require_layers_for_layer_types(rules, kind: str, layers_of) -> None:
    if layers_of is None and any(r.selector.needs_layers for r in rules):
        raise ValueError(
            f"The {kind} rule(s) "
            + ", ".join(r.describe() for r in rules if r.selector.needs_layers)
            + " select by layer type, which needs the model's layers. Train through "
            "model.fit / train_on_batch, or build the optimizer with "
            "`optimizer.build(model)` before a custom training loop."
        )


def _first_matches(rules, compiled, variables: list) -> list[int]:
    """Per variable, the index of the first rule that matches it; ``len(rules)`` if none."""
    n_rules = len(rules)
    # Rules decided by set membership are settled for every variable up
    # front, first rule first; the per-variable loop below then tries only
    # the path and variable tests of the rules before that one.
    first_by_id: dict[int, int] = {}
    for i, (test_kind, test) in enumerate(compiled):
        if test_kind is _IDS or test_kind is _IDS_OR_PATH:
            for variable_id in test if test_kind is _IDS else test[0]:
                first_by_id.setdefault(variable_id, i)
    tests = _per_variable_tests(compiled)
    first_test = tests[0][0] if tests else n_rules
    winners = []
    for variable in variables:
        winner = first_by_id.get(id(variable), n_rules)
        if first_test < winner:
            path = variable_path(variable)
            i = first_test
            try:
                for i, how, test in tests:
                    if i >= winner:
                        break
                    if how == _ON_PATH:
                        if test(path):
                            winner = i
                            break
                    elif how == _ON_VARIABLE:
                        if test(variable):
                            winner = i
                            break
                    elif test[0](path) is not None:
                        found = next((j for j, search in test[1]
                                      if j < winner and search(path) is not None), None)
                        if found is not None:
                            winner = found
                            break
            except Exception as error:
                selector = rules[i].selector
                if isinstance(selector, _Predicate):
                    raise selector.error(error, variable) from error
                raise
        winners.append(winner)
    return winners


# --- rules that select nothing -------------------------------------------------
# Checked only after resolving, and only for the rules no variable took: the
# common case, every rule used, costs nothing.

# `warnings.warn` from `_warn_shadowed` names the caller of resolve's caller:
# _warn_shadowed <- _check_rule_selects_something <-
# _check_every_rule_selects_something <- resolve <- caller <- its caller.
_SHADOWED_STACKLEVEL = 6


def _check_every_rule_selects_something(
    rules, compiled, winners, variables, frozen, kind: str, layers_of, model_weights
) -> None:
    used = set(winners)
    if all(i in used for i in range(len(rules))):
        return
    matchers = [_matcher(rule.selector, test_kind, test, layers_of)
                for rule, (test_kind, test) in zip(rules, compiled)]
    for i, rule in enumerate(rules):
        if i not in used and not any(matchers[i](v) for v in frozen):
            _check_rule_selects_something(i, rules, variables, kind, matchers, model_weights)


def _check_rule_selects_something(
    index: int, rules, variables, kind: str, matchers: list, model_weights=None
) -> None:
    """For a rule that won no variable: an error, or a warning if it is only shadowed."""
    rule = rules[index]
    own = rule.selector.own_variables()
    if own:
        # A frozen layer still counts: its multiplier applies once it is unfrozen.
        if model_weights is not None and not any(id(v) in model_weights for v in own):
            _raise_not_in_model(rule, kind)
        return
    if own is not None:
        _raise_unbuilt_layer(rule, kind)
    shadowed = next((v for v in variables if matchers[index](v)), None)
    if shadowed is not None:
        # Legitimate when composing rule lists (first match wins), so not an error.
        _warn_shadowed(rule, shadowed, rules, matchers, kind)
        return
    if not variables:
        _raise_no_variables_yet(rule, kind)
    _raise_matches_nothing(rule, variables, kind)


def _raise_not_in_model(rule: Rule, kind: str) -> None:
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


def _raise_unbuilt_layer(rule: Rule, kind: str) -> None:
    raise ValueError(
        f"The {kind} rule {rule.describe()} selects no variable: the layer has "
        "no weights yet. Build the model (call it on data or use "
        "model.build(input_shape)) before building the optimizer."
    )


def _warn_shadowed(rule: Rule, shadowed, rules, matchers: list, kind: str) -> None:
    winner = next(r for r, m in zip(rules, matchers) if m(shadowed))
    warnings.warn(
        f"layerlr: the {kind} rule {rule.describe()} never applies: every "
        f"variable it selects (e.g. {variable_path(shadowed)!r}) is taken by the "
        f"earlier rule {winner.describe()} (first match wins). Put the more "
        "specific rule first if that is not what you meant.",
        stacklevel=_SHADOWED_STACKLEVEL,
    )


def _raise_no_variables_yet(rule: Rule, kind: str) -> None:
    raise ValueError(
        f"The {kind} rule {rule.describe()} selects nothing: there are no "
        "trainable variables yet. Build the model first (call it on a batch, or "
        "model.build(input_shape)), or let model.fit build it."
    )


def _raise_matches_nothing(rule: Rule, variables, kind: str) -> None:
    paths = [variable_path(v) for v in variables]
    shown = ", ".join(repr(p) for p in paths[:8]) + (", ..." if len(paths) > 8 else "")
    raise ValueError(
        f"The {kind} rule {rule.describe()} matches none of the {len(paths)} "
        f"trainable variables ({shown}).{_glob_hints(rule.selector, paths)} Fix the "
        "selector or remove the rule. (Frozen layers count when the optimizer is "
        "built from the model, as in model.fit or optimizer.build(model); a layer "
        "object always works.)"
    )


def _glob_hints(selector: _Selector, paths: list[str]) -> str:
    """The closest paths to a glob that matches nothing, and a word if it looks like a regex."""
    if not isinstance(selector, _Glob):
        return ""
    hint = ""
    candidates = sorted({s for p in paths for s in _segment_subpaths(p)})
    close = difflib.get_close_matches(selector.pattern, candidates, n=3, cutoff=0.5)
    if close:
        hint = " Closest paths: " + ", ".join(repr(c) for c in close) + "."
    if ".*" in selector.pattern or any(c in selector.pattern for c in "^$+()|{}\\"):
        hint += (
            " Strings are glob patterns over whole path segments, not regular "
            "expressions: for a regex pass re.compile(...)."
        )
    return hint
