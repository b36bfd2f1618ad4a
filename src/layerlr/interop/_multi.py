"""Different optimizers per variable group, chosen with layerlr selectors.

`multi_optimizer` returns a Keras ``MultiOptimizer`` (a thin registered
subclass) whose routing is our ordered selector language instead of
``OptimizerMap``'s regex full-match. Keras still does all the work (building,
dispatch, state, callbacks); the subclass only adds two things:

- routing is resolved once, at build time, against the whole variable list, so
  a selector that selects nothing raises (as in `LayerwiseOptimizer`);
- the config stores the resolved route of every variable. A callable
  routing map cannot be reloaded under ``safe_mode``, and an ``OptimizerMap``
  of exact paths silently mis-routes after ``load_model`` (``Sequential``
  drops the model-name prefix: ``seq/d1/kernel`` -> ``d1/kernel``), so on
  reload the saved routes are matched back to the variables by path, with
  the same policy as `LayerwiseOptimizer`'s saved multipliers
  (`_resolution.match_in_model`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Union

import keras

from layerlr.core import _keras, _rules
from layerlr.core._resolution import match_in_model, resolve_in_model, saved_rules_drift

GroupSpec = Union[
    Mapping[Any, keras.optimizers.Optimizer],
    Sequence[tuple[Any, keras.optimizers.Optimizer]],
]
"""An ordered ``{selector: optimizer}`` or a list of ``(selector, optimizer)``."""

_KIND = "multi_optimizer group"


def _check_optimizer(optimizer, what: str) -> keras.optimizers.Optimizer:
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            f"{what} is a LossScaleOptimizer, which cannot go inside a "
            "MultiOptimizer: loss scaling must be the outermost wrapper. Use the "
            "plain optimizer here and set the 'mixed_float16' policy (compile() "
            "then wraps the whole MultiOptimizer)."
        )
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        raise ValueError(
            f"{what} is a MultiOptimizer; MultiOptimizers cannot be nested. Put "
            "all groups in one multi_optimizer(...) call."
        )
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            f"{what} must be a Keras optimizer instance (e.g. "
            f"keras.optimizers.Adam(1e-3)), got {optimizer!r} of type "
            f"{type(optimizer).__name__}. Groups are (selector, optimizer) pairs."
        )
    if optimizer.built:
        raise ValueError(
            f"{what} ({optimizer.name!r}) has already been built (used for "
            "training). Pass a fresh optimizer, e.g. "
            "type(opt).from_config(opt.get_config())."
        )
    return optimizer


def _parse_groups(groups) -> list[tuple[_rules._Selector, keras.optimizers.Optimizer]]:
    items = _rules.selector_pairs(groups, "groups", "optimizer")
    if not items:
        raise ValueError(
            "multi_optimizer needs at least one (selector, optimizer) group; with "
            "a single optimizer for everything, use that optimizer directly."
        )
    parsed = []
    for selector, optimizer in items:
        sel = _rules.make_selector(selector)
        parsed.append((sel, _check_optimizer(optimizer, f"The optimizer for {sel.describe()}")))
    return parsed


class _Router:
    """The routing callable Keras' MultiOptimizer calls once per variable in build.

    Also holds our rules, so that nothing here becomes a TF checkpoint
    dependency (the optimizer's attributes are auto-tracked on TensorFlow).
    """

    def __init__(self, groups, default, saved_routes):
        self.groups: tuple[tuple[_rules._Selector, keras.optimizers.Optimizer], ...] = tuple(groups)
        self.default_optimizer: keras.optimizers.Optimizer | None = default
        unique: list = []
        for optimizer in [o for _, o in self.groups] + ([default] if default is not None else []):
            if not any(optimizer is u for u in unique):
                unique.append(optimizer)
        # Keras' MultiOptimizer takes its sub-optimizers in `values()` order
        # (the default is in there): the order of their states in saved files.
        self.optimizers: tuple = tuple(unique)
        self.saved_routes: tuple[tuple[str, int, str | None], ...] | None = saved_routes
        self.routes: tuple[tuple[str, int, str | None], ...] | None = None
        self._by_id: dict[int, keras.optimizers.Optimizer] = {}

    def values(self):
        return list(self.optimizers)

    def index(self, optimizer) -> int:
        return next(i for i, o in enumerate(self.optimizers) if o is optimizer)

    def __call__(self, variable):
        try:
            return self._by_id[id(variable)]
        except KeyError:
            raise ValueError(
                f"The variable {_rules.variable_path(variable)!r} was not among the "
                "variables this multi_optimizer was built for. Create a new "
                "multi_optimizer when the model's trainable variables change."
            ) from None


@keras.saving.register_keras_serializable(package="layerlr")
class SelectorMultiOptimizer(keras.optimizers.MultiOptimizer):
    """A Keras MultiOptimizer routed by layerlr selectors; see `multi_optimizer`."""

    def __init__(
        self,
        groups: GroupSpec,
        default: keras.optimizers.Optimizer | None = None,
        name: str | None = None,
        loss_scale_factor: float | None = None,
        **kwargs,
    ):
        saved = kwargs.pop("saved_routes", None)
        if kwargs:
            raise TypeError(f"multi_optimizer got unexpected arguments: {sorted(kwargs)}.")
        parsed = _parse_groups(groups)
        if default is not None:
            default = _check_optimizer(default, "The default optimizer")
        router = _Router(parsed, default, _routes_from_config(saved))
        super().__init__(router, loss_scale_factor=loss_scale_factor, name=name or "multi_optimizer")

    def build(self, var_list):
        """Builds on ``var_list``, or on a model's trainable variables.

        Passing the model (``opt.build(model)``) gives layer-type selectors the
        model's layers in a custom training loop.
        """
        if self.built:
            return
        model = None
        if isinstance(var_list, keras.Layer):
            model, var_list = var_list, var_list.trainable_variables
        var_list = list(var_list)
        router = self._router
        routes, ordered = self._resolve(var_list, model)
        router._by_id = {id(v): router.optimizers[i] for v, (_, i, _) in zip(ordered, routes)}
        try:
            # Under LossScaleOptimizer.build tracking is off, and sub-optimizers
            # that add state by attribute (Nadam's `_u_product`) would lose it.
            with _keras.tracking_on():
                # Sub-optimizers keep their state in build order: the saved one.
                super().build(ordered)
        finally:
            router._by_id = {}
        if any(a is not b for a, b in zip(ordered, var_list)):
            # Gradients come in the model's order.
            _keras.follow_variables(self, var_list)
        position = {id(v): k for k, v in enumerate(ordered)}
        router.routes = tuple(routes[position[id(v)]] for v in var_list)

    @property
    def _router(self) -> _Router:
        return _keras.routing_of(self)

    def _resolve(self, variables, model):
        """(route of each variable, the variables in the order to build in)."""
        if self._router.saved_routes is not None:
            return self._restore_saved(variables, model)
        return self._resolve_rules(variables, model), variables

    def _resolve_rules(self, variables, model):
        router = self._router
        rules = tuple(_rules.Rule(sel, 1.0) for sel, _ in router.groups)
        if model is None and any(r.selector.needs_layers for r in rules):
            model = _keras.find_model(variables)
        # First match wins, and a selector that selects nothing raises.
        resolved = resolve_in_model(rules, variables, _KIND, model)
        routes = []
        unmatched = []
        for variable, (_, group) in zip(variables, resolved):
            path = _rules.variable_path(variable)
            if group is None:
                if router.default_optimizer is None:
                    unmatched.append(path)
                    continue
                routes.append((path, router.index(router.default_optimizer), None))
            else:
                routes.append((path, router.index(router.groups[group][1]), rules[group].describe()))
        if unmatched:
            shown = ", ".join(repr(p) for p in unmatched[:8]) + (", ..." if len(unmatched) > 8 else "")
            raise ValueError(
                f"No group selects {len(unmatched)} trainable variable(s) ({shown}) "
                "and there is no default optimizer. Add a group that selects them, "
                "or pass default=keras.optimizers.Adam(...) to multi_optimizer."
            )
        return tuple(routes)

    def _restore_saved(self, variables, model):
        router = self._router
        saved = router.saved_routes
        # Frozen variables are not candidates: Keras' MultiOptimizer gives
        # every variable it was built for a gradient in each step.
        ordered = match_in_model([p for p, _, _ in saved], None, variables, model, frozen_too=False)
        if isinstance(ordered, str):
            raise ValueError(
                f"The routes saved with this multi_optimizer do not fit the model it "
                f"is being built for: {ordered}. The model's layers or variables "
                "changed since saving, so the saved optimizer states cannot be "
                "matched safely. Create a new multi_optimizer for this model and "
                "compile again."
            )
        if any(i >= len(router.optimizers) for _, i, _ in saved):
            raise ValueError(
                "The saved routes name an optimizer this multi_optimizer does not "
                "have; the saved config is inconsistent."
            )
        entries = tuple((_rules.variable_path(v), i, rule) for v, (_, i, rule) in zip(ordered, saved))
        if not all(sel.resolvable for sel, _ in router.groups):
            return entries, ordered  # bound to live objects: nothing to cross-check
        reason = saved_rules_drift(
            lambda: self._resolve_rules(ordered, model), entries, lambda fresh, saved: fresh[1] == saved[1],
            lambda e: e[0], "they now route {} elsewhere",
        )
        if reason:
            warnings.warn(
                "layerlr: the saved multi_optimizer groups no longer resolve as when "
                f"the model was saved ({reason}); keeping the saved routes. Select "
                "layers by name ('dense_1') or by the layer object rather than by "
                "outer-model path prefixes, which change across load_model.",
                stacklevel=2,
            )
        return entries, ordered

    def resolve(self, model: keras.Layer) -> list[tuple[object, keras.optimizers.Optimizer]]:
        """(variable, its sub-optimizer) for each trainable variable of ``model``, without building."""
        variables = list(model.trainable_variables)
        routes, ordered = self._resolve(variables, model)
        by_id = {id(v): self._router.optimizers[i] for v, (_, i, _) in zip(ordered, routes)}
        return [(v, by_id[id(v)]) for v in variables]

    @property
    def routes(self) -> dict[str, keras.optimizers.Optimizer]:
        """The sub-optimizer of every trainable variable, by path, in variable order."""
        router = self._router
        if router.routes is None:
            raise ValueError(
                "The optimizer is not built yet, so no variable has a route. Call "
                "`optimizer.build(model)` (or train) first."
            )
        return {path: router.optimizers[i] for path, i, _ in router.routes}

    def get_config(self):
        router = self._router
        routes = router.routes if router.routes is not None else router.saved_routes
        return {
            "name": self.name,
            "loss_scale_factor": self.loss_scale_factor,
            "optimizers": [keras.saving.serialize_keras_object(o) for o in router.optimizers],
            "groups": [
                {"selector": sel.to_config(), "optimizer": router.index(opt)}
                for sel, opt in router.groups
            ],
            "default": None
            if router.default_optimizer is None
            else router.index(router.default_optimizer),
            "saved_routes": None
            if routes is None
            else [{"path": p, "optimizer": i, "rule": rule} for p, i, rule in routes],
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        # Name-based lookup: a model saved on torch loads on TF and JAX.
        optimizers = [
            keras.optimizers.deserialize(dict(c), custom_objects=custom_objects)
            for c in config.pop("optimizers")
        ]
        groups = [
            (_rules.selector_from_config(g["selector"]), optimizers[g["optimizer"]])
            for g in config.pop("groups")
        ]
        default = config.pop("default", None)
        return cls(groups, default=None if default is None else optimizers[default], **config)


def _routes_from_config(saved) -> tuple[tuple[str, int, str | None], ...] | None:
    if saved is None:
        return None
    return tuple((str(e["path"]), int(e["optimizer"]), e.get("rule")) for e in saved)


def multi_optimizer(
    groups: GroupSpec,
    default: keras.optimizers.Optimizer | None = None,
    *,
    name: str | None = None,
) -> keras.optimizers.MultiOptimizer:
    """A Keras ``MultiOptimizer`` whose groups are chosen with layerlr selectors.

    Use it when groups need different optimizers (SGD for the backbone, Adam
    for the head), not just different rates; for different rates of one
    optimizer, `LayerwiseOptimizer` is lighter (one state, one schedule). A
    `LayerwiseOptimizer` can itself be a group's optimizer.

    Args:
        groups: Ordered ``{selector: optimizer}`` or a list of
            ``(selector, optimizer)`` pairs, with the selectors of
            `LayerwiseOptimizer` (layers, variables, globs, regexes, layer
            types, predicates, tuples). Each variable goes to the first group
            that selects it. A selector that selects no trainable variable is
            an error when the optimizer is built. Several groups may share one
            optimizer instance.
        default: The optimizer for variables no group selects. Without it,
            every trainable variable must be selected by some group.
        name: Optional name; defaults to ``"multi_optimizer"``.

    Returns:
        A ``keras.optimizers.MultiOptimizer``. After build, ``.routes`` maps
        each variable path to its optimizer. It saves and reloads with the
        model (``model.save`` / ``keras.models.load_model``): the route of
        every variable is saved, so groups selected by layer objects or
        predicates reload too.

    Example:

    >>> import keras, layerlr
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
    ...                           keras.layers.Dense(2, name="head")], name="net")
    >>> opt = layerlr.multi_optimizer(
    ...     {"head": keras.optimizers.Adam(1e-3)},
    ...     default=keras.optimizers.SGD(1e-2, momentum=0.9),
    ... )
    >>> model.compile(optimizer=opt, loss="mse")
    >>> opt.build(model)
    >>> {path: type(o).__name__ for path, o in opt.routes.items()}
    {'net/body/kernel': 'SGD', 'net/body/bias': 'SGD', 'net/head/kernel': 'Adam', 'net/head/bias': 'Adam'}
    """
    return SelectorMultiOptimizer(groups, default=default, name=name)
