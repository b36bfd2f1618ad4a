"""Resolution's shortcuts decide exactly as each selector's own `matches`.

`resolve` does not call `selector.matches(variable)` for every (variable, rule)
pair: layer, variable, layer-type and saved-path selectors become sets of
variable ids computed once, consecutive path rules are searched as one joined
pattern first, and a tuple of such selectors is split into its set and its
paths. Here random rule lists of every kind are resolved both ways on a model
with nested blocks, a frozen block and non-trainable statistics, and must
give the same winner for every variable; predicates must be called exactly
as often, and in the same order, as when every rule is tried in turn.
"""

from __future__ import annotations

import fnmatch
import re

import keras
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerlr.core import _rules
from layerlr.core._keras import layers_of_model


class ScaledDense(keras.layers.Dense):
    pass


def is_vector(v):
    return len(v.shape) == 1


def has_ten(v):
    return "d10" in v.path


PREDICATES = [is_vector, has_ten]

GLOBS = ["d1", "d1*", "*bias", "block_a", "block_?", "net/block_b/*", "d1_1/kernel",
         "[bd]1*", "[!d]*", "*/ln/*", "gamma", "kernel", "net", "zz*", "*"]

REGEXES = [
    re.compile(r"^net/"), re.compile(r"bias$"), re.compile(r"d1\d"),
    re.compile(r"(d1)_\1"),  # a group and a backreference: not joinable
    re.compile(r"(?i)KERNEL"),  # a global inline flag: not joinable
    re.compile(r"BLOCK_A", re.IGNORECASE),
    re.compile(r"(?:moving|beta)"),
    re.compile(r"nothing here"),
]


@pytest.fixture(scope="module")
def built():
    block_a = keras.Sequential([keras.layers.Dense(3, name="d1"), keras.layers.Dense(3, name="d10"),
                                keras.layers.LayerNormalization(name="ln")], name="block_a")
    block_b = keras.Sequential([ScaledDense(3, name="d1_1"), keras.layers.BatchNormalization(name="bn")],
                               name="block_b")
    frozen = keras.Sequential([keras.layers.Dense(3, name="f1")], name="block_f")
    head = keras.layers.Dense(2, name="head")
    model = keras.Sequential([block_a, block_b, frozen, head], name="net")
    model.build((None, 4))
    frozen.trainable = False
    layers = [model, block_a, block_b, frozen, head, *block_a.layers, *block_b.layers, *frozen.layers]
    owners = layers_of_model(model)
    return model, layers, owners


def selectors(built):
    model, layers, _ = built
    variables = model.weights
    paths = sorted({v.path for v in variables})
    # Saved forms keep paths, also as Keras rewrites them across load_model.
    saved_paths = paths + [p.split("/", 1)[1] for p in paths] + ["outer/" + p for p in paths]
    simple = st.one_of(
        st.sampled_from(GLOBS).map(_rules._Glob),
        st.sampled_from(REGEXES).map(_rules._Regex),
        st.sampled_from(layers).map(_rules._LayerInstance),
        st.sampled_from(variables).map(_rules._VariableInstance),
        st.sampled_from([keras.layers.Dense, ScaledDense, keras.layers.LayerNormalization,
                         keras.Sequential, keras.layers.Layer, keras.layers.Conv2D]).map(_rules._LayerType),
        st.sampled_from(PREDICATES).map(_rules._Predicate),
        st.lists(st.sampled_from(saved_paths), min_size=1, max_size=3).map(
            lambda ps: _rules._SavedPaths(ps, "saved")),
    )
    return st.one_of(simple, st.lists(simple, min_size=1, max_size=3).map(
        lambda parts: _rules._AnyOf(tuple(parts))))


def reference(rules, variables, layers_of):
    """The winner of every variable, asking each rule's `matches` in turn."""
    out = []
    for v in variables:
        winner = next((i for i, r in enumerate(rules) if r.selector.matches(v, layers_of)), None)
        out.append(None if winner is None else float(winner))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_shortcuts_pick_the_same_rule_as_matches(built, data):
    model, _, owners = built
    rules = tuple(_rules.Rule(selector, float(i)) for i, selector in enumerate(
        data.draw(st.lists(selectors(built), min_size=1, max_size=12))))
    layers_of = lambda v: owners.get(id(v), ())  # noqa: E731
    # All weights, frozen and non-trainable ones included: the sets must cover them too.
    variables = model.weights
    got = [value if rule is not None else None
           for value, rule in _rules.resolve(rules, variables, "lr_mult", layers_of, check_unused=False)]
    assert got == reference(rules, variables, layers_of)


@settings(max_examples=300, deadline=None)
@given(st.text("ab/*?[]!-", min_size=1, max_size=7), st.text("ab/[]*!\n", max_size=9))
def test_a_glob_matches_iff_it_matches_a_run_of_whole_segments(glob, path):
    runs = ["/".join(path.split("/")[i:j]) for i in range(path.count("/") + 1)
            for j in range(i + 1, path.count("/") + 2)]
    expected = any(fnmatch.fnmatchcase(run, glob) for run in runs)
    assert (_rules._glob_regex(glob).search(path) is not None) == expected


def test_joined_patterns_keep_groups_and_flags_apart():
    # Joined into one alternation, the second backreference would point at the
    # first pattern's group, "(?i)" would be refused, and re.I would be lost.
    patterns = [_rules._Glob("x*"), _rules._Regex(re.compile(r"(a)\1")),
                _rules._Regex(re.compile(r"(b)\1")), _rules._Regex(re.compile("B", re.I)),
                _rules._Regex(re.compile("(?i)C")), _rules._Glob("d"), _rules._Regex(re.compile("e$"))]
    rules = tuple(_rules.Rule(selector, 10.0 + i) for i, selector in enumerate(patterns))

    class Named:
        def __init__(self, path):
            self.path = path

    paths = ["xa", "aa", "bb", "b", "C", "d/y", "ye", "AA", "X"]
    got = [value for value, _ in _rules.resolve(rules, [Named(p) for p in paths], "lr_mult",
                                                check_unused=False)]
    assert got == [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 1.0, 1.0]


def test_predicates_are_called_only_where_every_earlier_rule_failed(built):
    model, layers, owners = built
    block_a = layers[1]
    calls = []

    def spy(v):
        calls.append(v.path)
        return v.path.endswith("bias")

    layers_of = lambda v: owners.get(id(v), ())  # noqa: E731
    variables = model.trainable_variables
    in_block_a = [v.path for v in block_a.weights if v.trainable]
    rules = (_rules.Rule(_rules._LayerInstance(block_a), 0.5), _rules.Rule(_rules._Predicate(spy), 0.1))
    _rules.resolve(rules, variables, "lr_mult", layers_of, check_unused=False)
    assert calls == [v.path for v in variables if v.path not in in_block_a]

    calls.clear()  # a predicate first is asked about every variable, in order
    _rules.resolve(rules[::-1], variables, "lr_mult", layers_of, check_unused=False)
    assert calls == [v.path for v in variables]

    calls.clear()  # inside a tuple, before a layer: asked even where the layer matches
    both = _rules._AnyOf((_rules._Predicate(spy), _rules._LayerInstance(block_a)))
    _rules.resolve((_rules.Rule(both, 0.2),), variables, "lr_mult", layers_of, check_unused=False)
    assert calls == [v.path for v in variables]


def broken(v):
    return v.missing_attribute


@pytest.mark.parametrize("in_tuple", [False, True])
def test_a_raising_predicate_is_named_with_the_variable(built, in_tuple):
    model, layers, owners = built
    selector = _rules._Predicate(broken)
    if in_tuple:
        selector = _rules._AnyOf((_rules._Glob("zz"), selector))
    rules = (_rules.Rule(_rules._LayerInstance(layers[1]), 0.5), _rules.Rule(selector, 0.1))
    with pytest.raises(ValueError, match=r"predicate broken raised AttributeError on the variable "
                                         r"'net/block_b/d1_1/kernel'") as info:
        _rules.resolve(rules, model.trainable_variables, "lr_mult", lambda v: owners.get(id(v), ()))
    assert isinstance(info.value.__cause__, AttributeError)
