"""`LayerwiseOptimizer`: the Keras optimizer wrapper users compile with.

Modeled on Keras' own `LossScaleOptimizer`: it owns one inner optimizer, delegates
state, learning rate and serialization to it, and stays invisible to
`model.fit`. What it adds is resolving the rules into per-variable multipliers
at build time and installing the hook (`_hooks.install`) on the inner optimizer.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import keras

from layerlr import _hooks, _rules
from layerlr._rules import Multiplier, RuleSpec


@dataclass(frozen=True)
class VariableMultipliers:
    """What one trainable variable gets, and which rule decided it.

    ``lr_rule`` / ``decay_rule`` describe the first matching rule, or are None
    when no rule matched and the default 1.0 applies.
    """

    path: str
    lr_mult: Multiplier
    decay_mult: Multiplier
    lr_rule: str | None
    decay_rule: str | None

    def to_config(self) -> dict:
        return {
            "path": self.path,
            "lr_mult": _rules.multiplier_to_config(self.lr_mult),
            "decay_mult": _rules.multiplier_to_config(self.decay_mult),
            "lr_rule": self.lr_rule,
            "decay_rule": self.decay_rule,
        }


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


@contextlib.contextmanager
def _tracking_on():
    # LossScaleOptimizer.build turns attribute tracking off around our build;
    # inner optimizers that create state by plain attribute assignment (Nadam's
    # `_u_product`) would then lose it from `.variables` (never saved, and
    # dropped between JAX steps).
    from keras.src.backend.common import global_state

    previous = global_state.get_global_attribute("tracking_on", True)
    global_state.set_global_attribute("tracking_on", True)
    try:
        yield
    finally:
        global_state.set_global_attribute("tracking_on", previous)


def _not_autograph(method):
    """Keeps AutoGraph out of our Python-only logic inside a user's tf.function.

    AutoGraph converts methods of non-Keras classes it meets in a traced step;
    ours only branch on Python values, so conversion would only add warnings.
    """
    if keras.backend.backend() != "tensorflow":
        return method
    import tensorflow as tf

    return tf.autograph.experimental.do_not_convert(method)


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


def _layers_of_model(model) -> dict[int, list]:
    """Maps id(variable) -> every layer (the model included) whose weights hold it."""
    owners: dict[int, list] = {}
    for layer in [model, *model._flatten_layers(include_self=False)]:
        for weight in layer.weights:
            owners.setdefault(id(weight), []).append(layer)
    return owners


def _find_model(variables) -> keras.Layer | None:
    """The model being trained: the caller's `self` that owns all the variables.

    Only layer-type selectors need it; `model.fit`, `train_on_batch`, `compile`
    and `load_model` all build the optimizer from inside a model method.
    """
    wanted = {id(v) for v in variables}
    frame = inspect.currentframe()
    try:
        for _ in range(30):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.Layer) and wanted <= {id(w) for w in owner.weights}:
                return owner
    finally:
        del frame
    return None


@keras.saving.register_keras_serializable(package="layerlr")
class LayerwiseOptimizer(keras.optimizers.Optimizer):
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
        name: Optional name; defaults to ``"layerwise_optimizer"``.

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
    >>> model = keras.Sequential([keras.Input((4,)), backbone, keras.layers.Dense(2, name="head")])
    >>> opt = layerlr.LayerwiseOptimizer(
    ...     keras.optimizers.AdamW(1e-3, weight_decay=0.05),
    ...     lr_mult={backbone: 0.01},
    ...     decay_mult={"*bias": 0.0},
    ... )
    >>> model.compile(optimizer=opt, loss="mse")
    >>> opt.build(model.trainable_variables)
    >>> [(m.path, m.lr_mult, m.decay_mult) for m in opt.multipliers.values()]
    [('backbone/pre/kernel', 0.01, 1.0), ('backbone/pre/bias', 0.01, 0.0), ('head/kernel', 1.0, 1.0), ('head/bias', 1.0, 0.0)]
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        lr_mult: RuleSpec = None,
        decay_mult: RuleSpec = None,
        name: str | None = None,
        **kwargs,
    ):
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
        super().__init__(learning_rate=0.0, name=name or "layerwise_optimizer")
        inner._layerlr_wrapped = True
        self.inner_optimizer = inner
        self._layerlr = _State(lr_rules, decay_rules, _saved_from_config(saved))

    # --- building: resolve rules, build the inner optimizer, install the hook --

    @_not_autograph
    def build(self, var_list):
        """Builds on ``var_list``, or on a model's trainable variables.

        Passing the model (``opt.build(model)``) also gives layer-type selectors
        the model's layers in a custom training loop.
        """
        if self.built:
            return
        model = None
        if isinstance(var_list, keras.Layer):
            model, var_list = var_list, var_list.trainable_variables
        var_list = list(var_list)
        # Resolve first: a bad rule raises before any state is created.
        entries = self._resolve(var_list, model)
        with _tracking_on():
            self.inner_optimizer.build(var_list)
        _hooks.install(
            self.inner_optimizer,
            [e.lr_mult for e in entries],
            [e.decay_mult for e in entries],
        )
        self._layerlr.resolved = entries
        super().build(var_list)

    def _resolve(self, variables, model) -> tuple[VariableMultipliers, ...]:
        state = self._layerlr
        if state.saved is not None:
            return self._restore_saved(variables, model)
        return self._resolve_rules(variables, model)

    def _resolve_rules(self, variables, model) -> tuple[VariableMultipliers, ...]:
        state = self._layerlr
        layers_of = None
        if any(r.selector.needs_layers for r in state.lr_rules + state.decay_rules):
            model = model or _find_model(variables)
            if model is not None:
                owners = _layers_of_model(model)
                layers_of = lambda v: owners.get(id(v), ())  # noqa: E731
        lrs = _rules.resolve(state.lr_rules, variables, "lr_mult", layers_of)
        decays = _rules.resolve(state.decay_rules, variables, "decay_mult", layers_of)
        return tuple(
            VariableMultipliers(_rules.variable_path(v), lr, decay, lr_rule, decay_rule)
            for v, (lr, lr_rule), (decay, decay_rule) in zip(variables, lrs, decays)
        )

    def _restore_saved(self, variables, model) -> tuple[VariableMultipliers, ...]:
        """Reuses the multipliers saved with the model, by variable position.

        Paths lose outer-model prefixes across `load_model`, so rules anchored on
        them could silently select something else; the saved per-variable
        multipliers cannot, once we check the variables still line up.
        """
        saved = self._layerlr.saved
        paths = [_rules.variable_path(v) for v in variables]
        mismatch = _first_path_mismatch([e.path for e in saved], paths)
        if mismatch is not None:
            raise ValueError(
                f"The multipliers saved with this optimizer do not fit the model "
                f"it is being built for: {mismatch}. The model's layers or "
                "variables changed since saving (renamed, added or removed), so "
                "the saved per-variable learning rates cannot be matched safely. "
                "Create a new LayerwiseOptimizer with rules for this model and "
                "compile again."
            )
        entries = tuple(
            VariableMultipliers(p, e.lr_mult, e.decay_mult, e.lr_rule, e.decay_rule)
            for p, e in zip(paths, saved)
        )
        rules = self._layerlr.lr_rules + self._layerlr.decay_rules
        if any(isinstance(r.selector, _rules._Unresolvable) for r in rules):
            return entries  # bound to live objects: nothing to cross-check
        try:
            fresh = self._resolve_rules(variables, model)
        except ValueError as error:
            reason = str(error)
        else:
            changed = [
                f.path
                for f, e in zip(fresh, entries)
                if _multiplier_configs(f) != _multiplier_configs(e)
            ]
            reason = f"they now give other multipliers for {changed[:3]}" if changed else None
        if reason:
            warnings.warn(
                "layerlr: the saved rules no longer resolve as when the model "
                f"was saved ({reason}); keeping the saved per-variable "
                "multipliers. Rules anchored on outer-model path prefixes break "
                "across load_model: select layers by name ('dense_1') or by the "
                "layer object instead.",
                stacklevel=2,
            )
        return entries

    @property
    def multipliers(self) -> dict[str, VariableMultipliers]:
        """The resolved multipliers per trainable variable path, in variable order."""
        resolved = self._layerlr.resolved
        if resolved is None:
            raise ValueError(
                "The optimizer is not built yet, so no variable has a multiplier. "
                "Call `optimizer.build(model.trainable_variables)` (or train) first."
            )
        return {e.path: e for e in resolved}

    # --- delegation to the inner optimizer ---------------------------------

    @_not_autograph
    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "When passing `grads` without `trainable_variables`, the "
                    "optimizer must already be built: call "
                    "`optimizer.build(model.trainable_variables)` first."
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        self.inner_optimizer.apply(grads, trainable_variables)

    @_not_autograph
    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables)
        return self.inner_optimizer._iterations

    @property
    def variables(self):
        return self._variables[:] + self.inner_optimizer.variables

    def set_weights(self, weights):
        own = len(self._variables)
        super().set_weights(weights[:own])
        self.inner_optimizer.set_weights(weights[own:])

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

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
        self.inner_optimizer.finalize_variable_values(var_list)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        self.inner_optimizer.exclude_from_weight_decay(var_list, var_names)

    @property
    def _model_variables_moving_average(self):
        # SwapEMAWeights unwraps one wrapper level; under LossScaleOptimizer
        # that level is us.
        return self.inner_optimizer._model_variables_moving_average

    # --- serialization -----------------------------------------------------

    def get_config(self):
        state = self._layerlr
        entries = state.resolved if state.resolved is not None else state.saved
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "lr_mult": _rules.rules_to_config(state.lr_rules),
            "decay_mult": _rules.rules_to_config(state.decay_rules),
            "saved_multipliers": None if entries is None else [e.to_config() for e in entries],
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        # keras.optimizers.deserialize resolves built-ins by name, so a model
        # saved on torch (module paths under keras.src.backend.torch) loads on
        # TF and JAX; deserialize_keras_object would fail there.
        inner = keras.optimizers.deserialize(
            dict(config.pop("optimizer")), custom_objects=custom_objects
        )
        return cls(
            inner,
            lr_mult=_rules_from_config(config.pop("lr_mult", None)),
            decay_mult=_rules_from_config(config.pop("decay_mult", None)),
            **config,
        )


def _rules_from_config(config):
    return [(rule.selector, rule.value) for rule in _rules.rules_from_config(config)]


def _saved_from_config(saved) -> tuple[VariableMultipliers, ...] | None:
    if saved is None:
        return None
    return tuple(
        VariableMultipliers(
            path=str(e["path"]),
            lr_mult=_rules.multiplier_from_config(e["lr_mult"], f"saved lr_mult of {e['path']}"),
            decay_mult=_rules.multiplier_from_config(e["decay_mult"], f"saved decay_mult of {e['path']}"),
            lr_rule=e.get("lr_rule"),
            decay_rule=e.get("decay_rule"),
        )
        for e in saved
    )


def _multiplier_configs(entry: VariableMultipliers):
    return _rules.multiplier_to_config(entry.lr_mult), _rules.multiplier_to_config(entry.decay_mult)


def _same_variable_path(saved: str, current: str) -> bool:
    return (
        saved == current
        or saved.endswith("/" + current)
        or current.endswith("/" + saved)
    )


def _first_path_mismatch(saved: Sequence[str], current: Sequence[str]) -> str | None:
    if len(saved) != len(current):
        return (
            f"{len(saved)} trainable variables were saved, the model has "
            f"{len(current)}"
        )
    for i, (s, c) in enumerate(zip(saved, current)):
        if not _same_variable_path(s, c):
            return f"trainable variable #{i} was {s!r} and is now {c!r}"
    return None
