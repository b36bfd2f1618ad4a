"""`LayerwiseOptimizer`: the Keras optimizer wrapper users compile with.

Modeled on Keras' own `LossScaleOptimizer`: it owns one inner optimizer, delegates
state, learning rate and serialization to it, and stays invisible to
`model.fit`. What it adds is resolving the rules into per-variable multipliers
at build time and installing the hook (`_hooks.install`) on the inner optimizer.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
import weakref

import keras
import numpy as np

from layerlr.core import _hooks, _keras, _rules, _state
from layerlr.core._keras import (
    cannot_create_state,
    counts_steps,
    current_step,
    eager_value,
    follow_outer_loss_scale,
    find_model,
    not_autograph,
    outside_compiled_step,
    tracking_off,
    tracking_on,
)
from layerlr.core._resolution import (
    Assignment,
    VariableMultipliers,
    match_in_model,
    multipliers_of,
    saved_rules_drift,
    structure_lookup,
    value_now,
    weight_decay_now,
)
from layerlr.core._rules import Multiplier, RuleSpec


class _State:
    """Rules and resolved multipliers, kept out of TF's attribute tracking.

    (On TF, tuples and lists assigned to an optimizer become tracked wrappers,
    and layers inside them would become checkpoint dependencies.)
    """

    def __init__(self, lr_rules, decay_rules, saved):
        self.lr_rules: tuple[_rules.Rule, ...] = lr_rules
        self.decay_rules: tuple[_rules.Rule, ...] = decay_rules
        self.saved: tuple[VariableMultipliers, ...] | None = saved
        self.resolved: tuple[VariableMultipliers, ...] | None = None
        self.model: weakref.ref | None = None
        # Each saved variable's `structural_path`, when the model was known at saving.
        self.saved_structures: tuple[str, ...] | None = None

    def remembered_model(self):
        return None if self.model is None else self.model()


_BASE_OPTIMIZER_KWARGS = (
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


# What the base constructor stores for these before the inner optimizer exists
# (the wrapper takes none of them; see `_read_through`).
_BASE_DEFAULTS = {
    "weight_decay": None,
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "gradient_accumulation_steps": None,
}


def _read_through(name: str) -> property:
    """An attribute of the wrapped optimizer, read and set on it.

    Callbacks and user code read these on ``model.optimizer`` (SwapEMAWeights
    checks ``use_ema``; Keras sets some of them). The base constructor assigns
    them before the inner optimizer exists, and the base ``build`` would create
    EMA or accumulator state on the wrapper itself if it saw them set: in both
    cases the wrapper's own value is the base default.
    """

    def get(self):
        inner = self.__dict__.get("inner_optimizer")
        if inner is None or self.__dict__.get("_layerlr_base_build", False):
            return _BASE_DEFAULTS[name]
        return getattr(inner, name)

    def set(self, value):
        inner = self.__dict__.get("inner_optimizer")
        if inner is not None:
            setattr(inner, name, value)

    return property(get, set, doc=f"The wrapped optimizer's ``{name}``.")


def _same_variables(a, b) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _check_inner(optimizer) -> keras.optimizers.Optimizer:
    if isinstance(optimizer, (str, dict)):
        optimizer = keras.optimizers.get(optimizer)
    if isinstance(optimizer, LayerwiseOptimizer):
        raise ValueError(
            "The optimizer is already a LayerwiseOptimizer. Wrap the plain "
            "optimizer once and put all rules in that one wrapper: "
            "LayerwiseOptimizer(keras.optimizers.Adam(...), lr_mult=..., decay_mult=...)."
        )
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "A LossScaleOptimizer cannot go inside a LayerwiseOptimizer: loss "
            "scaling must be the outermost wrapper. Wrap the plain optimizer, then "
            "the result: LossScaleOptimizer(LayerwiseOptimizer(Adam(...), ...)), or "
            "set the 'mixed_float16' policy and let model.compile() add it."
        )
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        raise ValueError(
            "A MultiOptimizer cannot go inside a LayerwiseOptimizer. Put the "
            "LayerwiseOptimizer inside the MultiOptimizer instead (as one of its "
            "sub-optimizers), or use one optimizer with lr_mult rules."
        )
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "LayerwiseOptimizer wraps a Keras 3 optimizer (an instance of "
            f"keras.optimizers.Optimizer), got {optimizer!r} of type "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}."
        )
    if getattr(optimizer, "_layerlr_wrapped", False):
        raise ValueError(
            f"The optimizer {optimizer.name!r} is already wrapped by another "
            "LayerwiseOptimizer. Create a new optimizer for each wrapper."
        )
    if optimizer.built:
        raise ValueError(
            f"The optimizer {optimizer.name!r} has already been built (used for "
            "training). Wrap a fresh one, e.g. "
            "type(opt).from_config(opt.get_config())."
        )
    return optimizer


def _deserialize_inner(config, custom_objects) -> keras.optimizers.Optimizer:
    # keras.optimizers.deserialize resolves built-ins by name, so a model saved
    # on torch (module paths under keras.src.backend.torch) loads on TF and
    # JAX; deserialize_keras_object would fail there. For classes outside
    # Keras' name list (Lamb, registered user subclasses) it returns the bare
    # class name instead, and those resolve by module or registered name.
    inner = keras.optimizers.deserialize(dict(config), custom_objects=custom_objects)
    if not isinstance(inner, keras.optimizers.Optimizer):
        inner = keras.saving.deserialize_keras_object(dict(config), custom_objects=custom_objects)
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise ValueError(
            "The saved LayerwiseOptimizer wraps an optimizer that cannot be "
            f"restored: {config.get('class_name')!r} (module "
            f"{config.get('module')!r}) is not a Keras optimizer here. If it is "
            "your own class, decorate it with "
            "@keras.saving.register_keras_serializable() or pass it in "
            "custom_objects."
        )
    return inner


class _Wrapper(keras.optimizers.Optimizer):
    """The base-optimizer part of `LayerwiseOptimizer`, kept stateless."""

    def _track_variable(self, variable):
        # The base constructor's own `iteration` and `learning_rate`: in
        # `variables` they would shift every index (`variables[0]` would not be
        # the step counter; a plain optimizer's weights would not fit
        # set_weights or weight files). Never tracked rather than untracked
        # later: on TF, removing items from a tracked list breaks checkpoints.
        if self.__dict__.get("inner_optimizer") is not None:
            super()._track_variable(variable)

    def build(self, var_list):
        # The base build only records the variable list here; it would also
        # create EMA averages and gradient accumulators if it saw `use_ema` /
        # `gradient_accumulation_steps`, which read through to the inner
        # optimizer, where that state lives.
        self.__dict__["_layerlr_base_build"] = True
        try:
            super().build(var_list)
        finally:
            self.__dict__["_layerlr_base_build"] = False


@keras.saving.register_keras_serializable(package="layerlr")
class LayerwiseOptimizer(_Wrapper):
    """Per-layer learning-rate and weight-decay multipliers for any Keras optimizer.

    Each trainable variable ``v`` is trained exactly as if by the wrapped
    optimizer with ``learning_rate = base_lr(step) * lr_mult(v)`` and
    ``weight_decay = base_wd * decay_mult(v)`` (PyTorch param-group semantics),
    with one gradient computation and one optimizer state. Gradients are never
    rescaled, so adaptive optimizers (Adam, RMSprop, Lion, ...) get the
    intended step size.

    Args:
        optimizer: The Keras optimizer to wrap (an instance, or a name such
            as ``"adam"``). Its learning rate, schedule, weight decay, clipping,
            EMA and gradient accumulation all keep working.
        lr_mult: Ordered rules ``{selector: multiplier}`` or a list of
            ``(selector, multiplier)`` pairs. For each variable the first
            matching rule wins; unmatched variables get 1.0.
        decay_mult: The same, for the weight decay.
        name: Optional name; defaults to the wrapped optimizer's name, so
            that logs (TensorBoard's ``learning_rate_<name>`` in a
            MultiOptimizer) stay unique and recognisable.

    Everything else reads as on the wrapped optimizer: ``learning_rate``,
    ``iterations``, ``weight_decay``, ``clipnorm``, ``use_ema``, its own
    hyperparameters (``beta_1``, ``momentum``, ...), and ``variables``, which
    are exactly the wrapped optimizer's (same order, same weight files), so a
    plain optimizer's saved state loads into a wrapped one and back.

    Selectors:
        - a ``keras.Layer``: all its variables, sublayers included, even
          while it is frozen;
        - a ``keras.Variable`` (use the list form: variables are unhashable);
        - a glob string over variable paths, matched against every run of
          whole path segments: ``"backbone"`` selects that layer wherever it
          sits, ``"*bias"`` every bias, ``"block_*/dense"``...;
        - a compiled ``re.Pattern``, searched in the path;
        - a ``keras.Layer`` subclass: every variable of every layer of that type;
        - a predicate ``callable(variable) -> bool``;
        - a tuple of these (any of them).

    Values are finite numbers >= 0. ``lr_mult=0`` leaves the variable and its
    optimizer slots untouched (a frozen-by-rate variable: no moment decay, no
    weight decay, no NaN even for Ftrl). To save the gradient computation as
    well, freeze the layer (``trainable=False``) instead.

    ``global_clipnorm`` clips by the norm over all variables, as with a single
    optimizer (not per group). Weight decay is Keras' decoupled decay, scaled by
    the variable's learning rate: ``v -= v * wd * decay_mult * lr * lr_mult``.

    Example:

    >>> import keras, layerlr
    >>> backbone = keras.Sequential([keras.layers.Dense(8, name="pre")], name="backbone")
    >>> model = keras.Sequential([keras.Input((4,)), backbone, keras.layers.Dense(2, name="head")], name="net")
    >>> opt = layerlr.LayerwiseOptimizer(
    ...     keras.optimizers.AdamW(1e-3, weight_decay=0.05),
    ...     lr_mult={backbone: 0.01},
    ...     decay_mult={"*bias": 0.0},
    ... )
    >>> model.compile(optimizer=opt, loss="mse")
    >>> opt.build(model.trainable_variables)
    >>> [(m.path, m.lr_mult, m.decay_mult) for m in opt.multipliers.values()]
    [('net/backbone/pre/kernel', 0.01, 1.0), ('net/backbone/pre/bias', 0.01, 0.0), ('net/head/kernel', 1.0, 1.0), ('net/head/bias', 1.0, 0.0)]
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        lr_mult: RuleSpec = None,
        decay_mult: RuleSpec = None,
        name: str | None = None,
        **kwargs,
    ):
        # from_config passes saved_multipliers (None when saved unbuilt): the
        # rules were written, and warned about, where the model was made.
        from_config = "saved_multipliers" in kwargs
        saved = kwargs.pop("saved_multipliers", None)
        for key in _BASE_OPTIMIZER_KWARGS:
            if key in kwargs:
                raise ValueError(
                    f"LayerwiseOptimizer does not take `{key}`: set it on the "
                    f"wrapped optimizer, e.g. keras.optimizers.Adam(..., {key}=...)."
                )
        if kwargs:
            raise TypeError(
                f"LayerwiseOptimizer got unexpected arguments: {sorted(kwargs)}."
            )
        # Validate everything before touching the inner optimizer.
        inner = _check_inner(optimizer)
        lr_rules = _rules.parse_rules(lr_mult, "lr_mult")
        decay_rules = _rules.parse_rules(decay_mult, "decay_mult")
        if (
            decay_rules
            and not from_config
            and not (inner.weight_decay or getattr(inner, "adam_weight_decay", None))
        ):
            warnings.warn(
                "layerlr: decay_mult rules have no effect: the wrapped optimizer "
                f"{inner.name!r} has no weight decay (weight_decay={inner.weight_decay!r}). "
                "Set weight_decay on it, e.g. keras.optimizers.AdamW(..., weight_decay=...).",
                stacklevel=2,
            )
        # Tracking off: the base constructor's own variables must not become
        # ours by attribute assignment either (see `_Wrapper._track_variable`).
        with tracking_off():
            super().__init__(learning_rate=0.0, name=name or inner.name)
            # The wrapper keeps no state of its own: its step counter is the
            # inner's and its learning rate reads through.
            _keras.share_state_of(self, inner)
        inner._layerlr_wrapped = True
        self.inner_optimizer = inner
        self._layerlr = _State(lr_rules, decay_rules, _saved_from_config(saved))
        self._layerlr.saved_structures = _structures_from_config(saved)

    # --- building: resolve rules, build the inner optimizer, install the hook --

    @not_autograph
    def build(self, var_list):
        """Builds on ``var_list``, or on a model's trainable variables.

        Passing the model (``opt.build(model)``) also gives layer-type selectors
        the model's layers in a custom training loop. Building again with more
        variables (after unfreezing layers) keeps all existing optimizer state
        and creates state for the new variables only.
        """
        model = None
        if isinstance(var_list, keras.Layer):
            model, var_list = var_list, var_list.trainable_variables
        var_list = list(var_list)
        if self._layerlr.resolved is not None:
            self._grow(var_list, model)
            return
        model = model or find_model(var_list)
        # Resolve first: a bad rule raises before any state is created.
        entries, ordered = self._resolve(var_list, model)
        with tracking_on():
            self.inner_optimizer.build(ordered)
        self._install(entries, model)
        if model is not None and _same_variables(model.trainable_variables, var_list):
            # Remember the model so that `built` turns False when layers are
            # unfrozen: Keras then calls build() again before training.
            self._layerlr.model = weakref.ref(model)
        super().build(var_list)
        follow_outer_loss_scale(model, self)

    def _install(self, entries, model) -> None:
        inner = self.inner_optimizer
        starts = [e.start_step for e in entries]
        with tracking_on(), outside_compiled_step(), _keras.strategy_scope(inner):
            late_state = _state.late_state(inner, starts)
        _hooks.install(inner, [e.lr_mult for e in entries], [e.decay_mult for e in entries], starts, late_state)
        self._layerlr.resolved = entries

    def _starting_now(self, entries) -> tuple[VariableMultipliers, ...]:
        """Freshly resolved variables start training at the current step (or when their schedule does)."""
        inner = self.inner_optimizer
        now = current_step(inner)
        return tuple(
            dataclasses.replace(e, start_step=max(now, _first_step_of(e.lr_mult, inner, e.path)))
            for e in entries
        )

    def _grow(self, var_list, model) -> None:
        """Rebuilds for a changed variable list (layers frozen or unfrozen)."""
        inner = self.inner_optimizer
        new = [v for v in var_list if not self._knows(v)]
        model = model or self._layerlr.remembered_model()
        if current_step(inner) == 0 and (new or len(var_list) < len(_keras.trainable_variables(inner))):
            # Nothing trained yet (e.g. layers frozen after Keras built the
            # optimizer for all of them): start over, so that frozen
            # variables hold no slots.
            entries = self._keep_or_resolve(var_list, model)
            with tracking_on(), outside_compiled_step(), _keras.strategy_scope(inner):
                _state.rebuild(inner, var_list)
            self._install(entries, model)
        elif new:
            entries = self._layerlr.resolved + self._starting_now(
                self._multipliers_of(new, model, check_unused=False)
            )
            with tracking_on(), outside_compiled_step(), _keras.strategy_scope(inner):
                _state.grow(inner, new)
            self._install(entries, model)
        if model is not None and _same_variables(model.trainable_variables, var_list):
            self._layerlr.model = weakref.ref(model)
        # Our own list follows the model's current trainable variables (the
        # order JAX's stateless_apply passes values in); the inner optimizer
        # keeps state for every variable it ever trained.
        _keras.forget_variable_order(self)
        super().build(var_list)
        follow_outer_loss_scale(model, self)

    def _keep_or_resolve(self, variables, model, *, starting_now: bool = True) -> tuple[VariableMultipliers, ...]:
        """Each variable's entry: kept if the inner optimizer trains it, else from the rules.

        Only new variables are resolved, starting now unless ``starting_now``
        is False (loading: the saved start steps replace them): the others
        keep the multipliers they trained with (saved ones included), and the
        rules were checked as a whole when first built.
        """
        inner = self.inner_optimizer
        known = {
            _keras.var_key(inner, v): e
            for v, e in zip(_keras.trainable_variables(inner), self._layerlr.resolved)
        }
        keys = [_keras.var_key(inner, v) for v in variables]
        new = [v for v, key in zip(variables, keys) if key not in known]
        fresh = self._multipliers_of(new, model, check_unused=False) if new else ()
        fresh = iter(self._starting_now(fresh) if starting_now else fresh)
        return tuple(known.get(key) or next(fresh) for key in keys)

    def _knows(self, variable) -> bool:
        return _keras.knows(self.inner_optimizer, variable)

    @property
    def built(self) -> bool:
        if not self.__dict__.get("_layerlr_built", False):
            return False
        state = self.__dict__.get("_layerlr")
        model = state.remembered_model() if state is not None else None
        # False once the model's trainable variables changed, so that Keras
        # calls build() again before training (see `_grow`).
        return model is None or _same_variables(model.trainable_variables, _keras.trainable_variables(self))

    @built.setter
    def built(self, value: bool) -> None:
        self.__dict__["_layerlr_built"] = value

    def _resolve(self, variables, model):
        """(multipliers, the variables in the order the inner optimizer keeps them)."""
        if self._layerlr.saved is not None:
            return self._restore_saved(variables, model)
        return self._starting_now(self._multipliers_of(variables, model)), variables

    def _multipliers_of(self, variables, model, check_unused: bool = True) -> tuple[VariableMultipliers, ...]:
        state = self._layerlr
        return multipliers_of(state.lr_rules, state.decay_rules, variables, model, check_unused)

    def _restore_saved(self, variables, model):
        """Reuses the multipliers saved with the model, matched by variable path.

        Paths lose outer-model prefixes across `load_model`, so rules anchored on
        them could silently select something else; the saved per-variable
        multipliers cannot. The inner optimizer is rebuilt in the saved variable
        order, which is the order its saved state (by index) was written in.
        """
        saved = self._layerlr.saved
        ordered = match_in_model([e.path for e in saved], self._layerlr.saved_structures, variables, model)
        if isinstance(ordered, str):
            raise ValueError(
                f"The multipliers saved with this optimizer do not fit the model "
                f"it is being built for: {ordered}. The model's layers or "
                "variables changed since saving (renamed, added or removed), so "
                "the saved per-variable learning rates cannot be matched safely. "
                "Create a new LayerwiseOptimizer with rules for this model and "
                "compile again (from keras.models.load_model: load with "
                "keras.models.load_model(path, compile=False), then compile)."
            )
        entries = tuple(
            dataclasses.replace(e, path=_rules.variable_path(v)) for v, e in zip(ordered, saved)
        )
        rules = self._layerlr.lr_rules + self._layerlr.decay_rules
        if not all(r.selector.resolvable for r in rules):
            return entries, ordered  # bound to live objects: nothing to cross-check
        reason = saved_rules_drift(
            lambda: self._multipliers_of(ordered, model), entries, VariableMultipliers.same_multipliers,
            lambda e: e.path, "they now give other multipliers for {}",
        )
        if reason:
            warnings.warn(
                "layerlr: the saved rules no longer resolve as when the model "
                f"was saved ({reason}); keeping the saved per-variable "
                "multipliers. Rules anchored on outer-model path prefixes break "
                "across load_model: select layers by name ('dense_1') or by the "
                "layer object instead.",
                stacklevel=2,
            )
        return entries, ordered

    @property
    def multipliers(self) -> dict[str, VariableMultipliers]:
        """The resolved multipliers per trainable variable path, in variable order."""
        resolved = self._layerlr.resolved
        if resolved is None:
            raise ValueError(
                "The optimizer is not built yet, so no variable has a multiplier. "
                "Call `optimizer.build(model.trainable_variables)` (or train) first."
            )
        result: dict[str, VariableMultipliers] = {}
        for e in resolved:
            # Functional blocks leave their name out of paths, so paths can repeat.
            key, n = e.path, 1
            while key in result:
                n += 1
                key = f"{e.path}#{n}"
            result[key] = e
        return result

    @property
    def lr_rules(self) -> tuple[_rules.Rule, ...]:
        """The ``lr_mult`` rules, in order (``rule.describe()``, ``rule.value``)."""
        return self._layerlr.lr_rules

    @property
    def decay_rules(self) -> tuple[_rules.Rule, ...]:
        """The ``decay_mult`` rules, in order."""
        return self._layerlr.decay_rules

    def resolve(self, model: keras.Layer | None = None, *, variables=None) -> list[Assignment]:
        """What every variable gets, and the rates that gives now, without building.

        With ``model``: each trainable variable of the model, then those of its
        frozen layers (``trained=False``: what they get once unfrozen), in
        ``model.weights`` order. Without it: the variables the built optimizer
        trains, in its order. Before the optimizer is built, the rules (or the
        multipliers saved with the model) are resolved as the build will
        resolve them; building would create the optimizer's state. After it
        is built, variables keep what they trained with, and variables it has
        not seen yet (unfrozen since) get the rules' multipliers
        (``new=True``). ``variables`` narrows the model's trainable variables
        to those this optimizer trains (a sub-optimizer of a MultiOptimizer);
        frozen ones are then left out.

        >>> import keras, layerlr
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")], name="net")
        >>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={"*bias": 0.5})
        >>> [(a.path, a.multipliers.lr_rule, round(a.learning_rate, 6)) for a in opt.resolve(model)]
        [('net/head/kernel', None, 0.1), ('net/head/bias', "'*bias'", 0.05)]
        """
        if model is not None and not isinstance(model, keras.Layer):
            raise TypeError(f"Expected a Keras model or layer, got {model!r} of type {type(model).__name__}.")
        inner = self.inner_optimizer
        known = self._known_entries()
        if model is None:
            if not known:
                raise ValueError(
                    "The optimizer is not built yet, so it cannot know the variables: pass "
                    "the model, e.g. optimizer.resolve(model) or layerlr.summary(model, optimizer)."
                )
            trained = list(_keras.trainable_variables(inner))
            frozen: list = []
        elif variables is not None:
            trained, frozen = list(variables), []
        else:
            trained = list(model.trainable_variables)
            trained_ids = {id(v) for v in trained}
            created = _keras.created_trainable_ids(model)
            frozen = [w for w in model.weights if id(w) in created and id(w) not in trained_ids]
        entries = dict(known)
        if not known:
            resolved, ordered = self._resolve(trained, model)
            entries = {id(v): e for v, e in zip(ordered, resolved)}
        candidates, frozen_ids = trained + frozen, {id(v) for v in frozen}
        unseen = [v for v in candidates if id(v) not in entries]
        if unseen:
            entries.update(self._from_rules(unseen, [v for v in candidates if id(v) in entries],
                                            frozen_ids, model))
        step = self.iterations
        base_lr = float(_keras.eager_value(self.learning_rate))

        def assignment(variable) -> Assignment:
            entry = entries.get(id(variable))
            is_trained = id(variable) not in frozen_ids
            lr_mult = decay_mult = None
            if entry is not None:
                lr_mult, decay_mult = value_now(entry.lr_mult, step), value_now(entry.decay_mult, step)
            return Assignment(
                variable=variable,
                path=_rules.variable_path(variable),
                trained=is_trained,
                multipliers=entry,
                new=is_trained and bool(known) and id(variable) not in known,
                lr_mult=lr_mult,
                decay_mult=decay_mult,
                learning_rate=base_lr * lr_mult if is_trained and entry is not None else None,
                weight_decay=weight_decay_now(inner, variable, decay_mult)
                if is_trained and entry is not None else None,
            )

        return [assignment(v) for v in candidates]

    def _known_entries(self) -> dict[int, VariableMultipliers]:
        """What the built optimizer resolved, by id of the variable."""
        resolved = self._layerlr.resolved
        if resolved is None:
            return {}
        return {id(v): e for v, e in zip(_keras.trainable_variables(self.inner_optimizer), resolved)}

    def _from_rules(self, unseen, seen, frozen_ids, model) -> dict[int, VariableMultipliers]:
        """What the next build gives variables the optimizer has not resolved yet."""
        try:
            # With the others, so that rules selecting only those do not count as unused.
            fresh = self._multipliers_of(seen + unseen, model)
        except ValueError:
            if any(id(v) not in frozen_ids for v in unseen):
                raise  # training would fail the same way
            # Only frozen variables are affected (rules restored from a save
            # can be bound to objects that are gone): they get no multipliers.
            return {}
        unseen_ids = {id(v) for v in unseen}
        return {id(v): e for v, e in zip(seen + unseen, fresh) if id(v) in unseen_ids}

    def summary(self, model=None, *, width: int | None = None, print_fn=None) -> None:
        """Prints each variable's multipliers and effective rates (see `layerlr.summary`).

        >>> import keras, layerlr
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")], name="net")
        >>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={"*bias": 0.5})
        >>> lines = []
        >>> opt.summary(model, print_fn=lines.append)
        >>> lines[-1]
        'Trainable: 8 params in 2 variables.'
        """
        # The one upward import (docs/architecture.md): the table is the report's.
        from layerlr.report._summary import print_summary

        print_summary(self, model, width=width, print_fn=print_fn)

    # --- delegation to the inner optimizer ---------------------------------

    @not_autograph
    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if len(grads) != len(trainable_variables):
                raise ValueError(
                    f"Got {len(grads)} gradients for {len(trainable_variables)} "
                    "variables: pass one gradient (or None) per variable, in order."
                )
        if not self.__dict__.get("_layerlr_built", False):
            if trainable_variables is None:
                raise ValueError(
                    "When passing `grads` without `trainable_variables`, the "
                    "optimizer must already be built: call "
                    "`optimizer.build(model.trainable_variables)` first."
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        elif trainable_variables is None:
            trainable_variables = _keras.trainable_variables(self)
            if len(grads) != len(trainable_variables):
                raise ValueError(
                    f"Got {len(grads)} gradients, but the optimizer updates "
                    f"{len(trainable_variables)} variables (the model's trainable "
                    "variables when it was last built). Pass `trainable_variables` "
                    "with the gradients, or call `optimizer.build(model.trainable_variables)` "
                    "after changing which layers are trainable."
                )
        else:
            trainable_variables = list(trainable_variables)
            new = [v for v in trainable_variables if not self._knows(v)]
            if new:
                self._grow_during_apply(new, trainable_variables, grads)
        self.inner_optimizer.apply(grads, trainable_variables)

    def _grow_during_apply(self, new, trainable_variables, grads) -> None:
        """Variables of the trained model that were unfrozen get state; others do not."""
        model = self._layerlr.remembered_model()
        model_variables = {id(v) for v in model.trainable_variables} if model else set()
        strangers = [v for v in new if id(v) not in model_variables]
        if strangers:
            raise ValueError(
                f"Unknown variable(s) for this optimizer: "
                f"{[_rules.variable_path(v) for v in strangers[:3]]}. It was built for "
                f"{len(_keras.trainable_variables(self))} variables of its model. To train "
                "more variables with the same optimizer state, call "
                "`optimizer.build(all_variables)` first. If they belong to another "
                "model, give that model its own optimizer."
            )
        if cannot_create_state(grads):
            raise ValueError(
                f"{len(new)} variable(s) were unfrozen after the optimizer was built "
                f"(e.g. {_rules.variable_path(new[0])!r}). Inside a compiled step "
                "the optimizer cannot create their state: call "
                "`optimizer.build(model.trainable_variables)` or recompile the model "
                "after changing `trainable`, before the next training step."
            )
        self.build(trainable_variables)

    @not_autograph
    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables)
        return _keras.step_counter(self.inner_optimizer)

    def update_step(self, gradient, variable, learning_rate):
        """The wrapped optimizer's update of one variable, at ``learning_rate * lr_mult``.

        As for any Keras optimizer, this is the update rule alone: clipping,
        weight decay and the step count belong to `apply`.
        """
        resolved = self._layerlr.resolved
        if resolved is None:
            raise ValueError(
                "The optimizer is not built yet: call "
                "`optimizer.build(trainable_variables)` before `update_step`."
            )
        inner = self.inner_optimizer
        lr_mult = resolved[_keras.variable_index(inner, variable)].lr_mult
        if isinstance(lr_mult, float):
            if lr_mult == 0.0:
                return  # variable and slots untouched, as in training
            if lr_mult != 1.0:
                learning_rate = learning_rate * lr_mult
        else:
            learning_rate = learning_rate * lr_mult(inner.iterations)
        # The class's own rule: the instance's is our training hook, which
        # also applies weight decay.
        type(inner).update_step(inner, gradient, variable, learning_rate)

    @property
    def variables(self):
        inner = self.__dict__.get("inner_optimizer")
        return [] if inner is None else inner.variables

    def set_weights(self, weights):
        self.inner_optimizer.set_weights(weights)

    def __dir__(self):
        # Keras' saving walks `dir()` and would save the inner optimizer a
        # second time, under `optimizer/inner_optimizer`, where a plain
        # optimizer's file has nothing (and loading one would warn). Its state
        # is already ours (`save_own_variables`), in the plain layout. An inner
        # optimizer with saveable children of its own stays visible, so that
        # nothing of it goes unsaved.
        names = super().__dir__()
        inner = self.__dict__.get("inner_optimizer")
        if inner is not None and not _keras.holds_saveables(inner):
            names = [n for n in names if n != "inner_optimizer"]
        return names

    def __getattr__(self, name):
        # Only reached when normal lookup fails: the inner optimizer's own
        # public hyperparameters (`beta_1`, `momentum`, `epsilon`, ...).
        # Private names are never forwarded: TF's tracking and Keras probe
        # those with hasattr() to detect an object's own state.
        inner = self.__dict__.get("inner_optimizer")
        if inner is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    def __setattr__(self, name, value):
        # Setting a hyperparameter of the inner optimizer (`opt.beta_1 = ...`)
        # must reach it, not shadow it with an unused copy on the wrapper.
        inner = self.__dict__.get("inner_optimizer")
        if (
            inner is not None
            and not name.startswith("_")
            and name not in self.__dict__
            and not hasattr(type(self), name)
            and hasattr(inner, name)
        ):
            setattr(inner, name, value)
            return
        super().__setattr__(name, value)

    weight_decay = _read_through("weight_decay")
    clipnorm = _read_through("clipnorm")
    clipvalue = _read_through("clipvalue")
    global_clipnorm = _read_through("global_clipnorm")
    use_ema = _read_through("use_ema")
    ema_momentum = _read_through("ema_momentum")
    ema_overwrite_frequency = _read_through("ema_overwrite_frequency")
    gradient_accumulation_steps = _read_through("gradient_accumulation_steps")

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def _get_current_learning_rate(self):
        # Base and backend helpers (torch's weight decay) read the rate this way.
        return _keras.current_learning_rate(self.inner_optimizer)

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def loss_scale_factor(self):
        inner = getattr(self, "inner_optimizer", None)
        return None if inner is None else inner.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # Called with None by the base constructor before the inner exists, and
        # by LossScaleOptimizer, which must switch off the inner's own scaling.
        inner = getattr(self, "inner_optimizer", None)
        if inner is not None:
            inner.loss_scale_factor = value

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        if not self.inner_optimizer.use_ema:
            return
        # The inner optimizer keeps its averages in the order variables
        # started training, which after unfreezing is not the model's order.
        for variable in var_list:
            average = self._average_of(variable)
            if average is not None:
                variable.assign(average)

    def _average_of(self, variable):
        return _keras.moving_average_of(self.inner_optimizer, variable)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        self.inner_optimizer.exclude_from_weight_decay(var_list, var_names)

    @property
    def _model_variables_moving_average(self):
        # SwapEMAWeights unwraps one wrapper level (under LossScaleOptimizer
        # that level is us) and pairs these with our `_trainable_variables`.
        return [self._average_of(v) for v in _keras.trainable_variables(self)]

    # --- weight files ------------------------------------------------------

    def save_own_variables(self, store):
        # The inner optimizer's state, in the plain optimizer's layout.
        self.inner_optimizer.save_own_variables(store)
        entries = self._layerlr.resolved
        if entries and any(e.start_step for e in entries):
            # Weight files (BackupAndRestore, save_weights) record state by
            # index only; with late starts that order and the start steps are
            # not the ones a fresh build gives, so they travel with the state.
            structure_of = self._structure_of()
            record = {
                "start_steps": [e.start_step for e in entries],
                "paths": [e.path for e in entries],
                "structures": None if structure_of is None
                else [structure_of(v) for v in _keras.trainable_variables(self.inner_optimizer)],
            }
            store[_LATE_STARTS_KEY] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)

    def load_own_variables(self, store):
        keys = list(store.keys())
        if _LATE_STARTS_KEY in keys:
            record = json.loads(bytes(np.asarray(store[_LATE_STARTS_KEY], dtype=np.uint8)).decode())
            self._restore_late_starts(record)
            store = {k: store[k] for k in keys if k != _LATE_STARTS_KEY}
        self.inner_optimizer.load_own_variables(store)

    def _restore_late_starts(self, record) -> None:
        """Rebuilds the inner optimizer over the saved variables, in the saved order.

        Its values are overwritten by the load that follows; what must match
        is which variables it holds state for (some may be frozen again now,
        e.g. before `GradualUnfreezing` unfreezes them on resuming) and their
        start steps.
        """
        model = self._layerlr.remembered_model() or find_model(())
        if model is None or self._layerlr.resolved is None:
            raise ValueError(
                "These optimizer weights were saved after some variables started "
                "training late (unfrozen layers). Build the optimizer on its model "
                "before loading them: `optimizer.build(model)` or "
                "`model.optimizer.build(model.trainable_variables)` inside the model's "
                "scope, then `model.load_weights(...)`."
            )
        inner = self.inner_optimizer
        ordered = match_in_model(record["paths"], record["structures"], model.trainable_variables, model)
        if isinstance(ordered, str):
            raise ValueError(
                f"The optimizer weights being loaded do not fit this model: {ordered}. "
                "Load them into the model they were saved from."
            )
        entries = tuple(
            dataclasses.replace(entry, start_step=int(start))
            for entry, start in zip(
                self._keep_or_resolve(ordered, model, starting_now=False), record["start_steps"]
            )
        )
        with tracking_on(), outside_compiled_step(), _keras.strategy_scope(inner):
            _state.rebuild(inner, ordered)
        self._install(entries, model)

    # --- serialization -----------------------------------------------------

    def get_config(self):
        state = self._layerlr
        entries = state.resolved if state.resolved is not None else state.saved
        structure_of = self._structure_of()
        saved = None if entries is None else [e.to_config() for e in entries]
        if saved is not None:
            structures = (
                [structure_of(v) for v in _keras.trainable_variables(self.inner_optimizer)]
                if structure_of is not None and state.resolved is not None
                else state.saved_structures
            )
            for entry, structure in zip(saved, structures or ()):
                entry["structure"] = structure
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "lr_mult": _rules_config(state.lr_rules, structure_of),
            "decay_mult": _rules_config(state.decay_rules, structure_of),
            "saved_multipliers": saved,
        }

    def _structure_of(self):
        """variable -> its `structural_path` in the trained model, if the model is known."""
        return structure_lookup(self._layerlr.remembered_model())

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = _deserialize_inner(config.pop("optimizer"), custom_objects)
        return cls(
            inner,
            lr_mult=_rules_from_config(config.pop("lr_mult", None)),
            decay_mult=_rules_from_config(config.pop("decay_mult", None)),
            **config,
        )

    def __repr__(self) -> str:
        state = self.__dict__.get("_layerlr")
        inner = self.__dict__.get("inner_optimizer")
        if state is None or inner is None:
            return object.__repr__(self)

        def rules(rules, limit=6):
            shown = [
                f"{r.describe()}: {r.value:g}" if isinstance(r.value, float)
                else f"{r.describe()}: {type(r.value).__name__}"
                for r in rules[:limit]
            ]
            if len(rules) > limit:
                shown.append(f"... {len(rules) - limit} more")
            return "[" + ", ".join(shown) + "]"

        return (
            f"LayerwiseOptimizer({type(inner).__name__}, lr_mult={rules(state.lr_rules)}, "
            f"decay_mult={rules(state.decay_rules)})"
        )


def _rules_from_config(config):
    return [(rule.selector, rule.value) for rule in _rules.rules_from_config(config)]


_LATE_STARTS_KEY = "layerlr_late_starts"


def _rules_config(rules, structure_of) -> list[dict]:
    """The rules' config; layer and variable selectors also by `structural_path`."""
    config = _rules.rules_to_config(rules)
    if structure_of is not None:
        for rule, rule_config in zip(rules, config):
            _add_structures(rule.selector, rule_config["selector"], structure_of)
    return config


def _add_structures(selector, config: dict, structure_of) -> None:
    if "any" in config:
        for sub, sub_config in zip(selector.selectors, config["any"]):
            _add_structures(sub, sub_config, structure_of)
    elif "paths" in config and selector.own_variables() is not None:
        config["structures"] = [structure_of(v) for v in selector.own_variables()]


def _structures_from_config(saved) -> tuple[str, ...] | None:
    if not saved or any("structure" not in e for e in saved):
        return None
    return tuple(str(e["structure"]) for e in saved)


def _saved_from_config(saved) -> tuple[VariableMultipliers, ...] | None:
    return None if saved is None else tuple(VariableMultipliers.from_config(e) for e in saved)


def _first_step_of(lr_mult: Multiplier, inner, path: str) -> int:
    """The first step at which a multiplier is nonzero, as far as step counting needs it."""
    if isinstance(lr_mult, float):
        return 0
    start = getattr(lr_mult, "start_step", None)
    if start is not None:
        return int(start)
    with outside_compiled_step():
        if float(eager_value(lr_mult(0))) > 0 or not counts_steps(inner):
            return 0
    raise ValueError(
        f"The lr_mult schedule {lr_mult!r} of {path!r} is 0 at step 0, and "
        f"{type(inner).__name__} counts steps (bias correction...): the variable "
        "must count its own steps from the step its multiplier leaves 0, which "
        "this schedule does not say. Use layerlr.schedules.FreezeThenWarmup, or "
        "give the schedule a `start_step` attribute (the first step at which it "
        "is nonzero)."
    )



def layerwise_optimizer_of(model: keras.Layer | None, optimizer=None) -> LayerwiseOptimizer:
    """``optimizer``, or ``model.optimizer``, as a LayerwiseOptimizer, or a ValueError saying why not."""
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
        rate = float(eager_value(optimizer.learning_rate))
        raise ValueError(
            f"The optimizer is a plain {type(optimizer).__name__}, not a "
            "LayerwiseOptimizer: every variable trains at its learning rate "
            f"({rate:.3g}), with no per-layer "
            "multipliers. Wrap it: layerlr.LayerwiseOptimizer("
            f"keras.optimizers.{type(optimizer).__name__}(...), lr_mult={{...}})."
        )
    raise TypeError(
        "Expected a keras.optimizers.Optimizer (a layerlr.LayerwiseOptimizer), got "
        f"{optimizer!r} of type {type(optimizer).__name__}."
    )


def resolve(
    model: keras.Layer,
    optimizer: keras.optimizers.Optimizer | None = None,
    *,
    lr_mult: RuleSpec = None,
    decay_mult: RuleSpec = None,
) -> list[Assignment]:
    """What each variable of ``model`` gets: from its optimizer, or from rules alone.

    ``resolve(model)`` reads ``model.optimizer`` (a `LayerwiseOptimizer`,
    also inside the LossScaleOptimizer of mixed precision);
    ``resolve(model, optimizer)`` that optimizer; both are
    `LayerwiseOptimizer.resolve`. ``resolve(model, lr_mult=..., decay_mult=...)``
    resolves rules without any optimizer: ``learning_rate`` and
    ``weight_decay`` are then relative to a base of 1.0. Nothing is built.

    >>> import keras, layerlr
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="body"),
    ...                           keras.layers.Dense(1, name="head")], name="net")
    >>> [(a.path, a.learning_rate) for a in layerlr.resolve(model, lr_mult={"body": 0.1})]
    [('net/body/kernel', 0.1), ('net/body/bias', 0.1), ('net/head/kernel', 1.0), ('net/head/bias', 1.0)]
    """
    if lr_mult is not None or decay_mult is not None:
        if optimizer is not None:
            raise ValueError(
                "Pass either an optimizer or rules (lr_mult=..., decay_mult=...), not both: "
                "an optimizer's rules are its own (LayerwiseOptimizer(..., lr_mult=...))."
            )
        base = keras.optimizers.SGD(1.0, weight_decay=1.0 if decay_mult is not None else None)
        optimizer = LayerwiseOptimizer(base, lr_mult=lr_mult, decay_mult=decay_mult)
    return layerwise_optimizer_of(model, optimizer).resolve(model)
