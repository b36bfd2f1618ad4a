"""Per-group learning rates for TensorFlow 1.x-style graph code (``tf.compat.v1``).

TF1 code asks our question with ``tf.compat.v1.train.*Optimizer`` and
``minimize``; the usual answer, two optimizers each calling ``minimize`` on
its own variable list, computes the gradients twice and races (one update can
run before the other group's gradients read the variables). The correct
generalisation is one gradient computation, split by group, and one
``apply_gradients`` per group, each by an optimizer made at
``learning_rate * lr_mult``: every group has its own slots and its own
non-slot state (Adam's beta powers), so adaptive optimizers step exactly as a
separate optimizer per group would, and the global step advances once, after
every group's update.

Weight decay is not handled here: TF1 optimizers have none; decay lives in the
loss as L2 terms, which users scale themselves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import keras

from layerlr.core import _rules
from layerlr.core._rules import RuleSpec


class _GraphVariable:
    """What selectors see of a graph variable: its name without ``:0`` as path.

    Globs over whole path segments (``"*bias"``) must not trip over the
    output-index suffix of TF1 variable names (``head/bias:0``).
    """

    __slots__ = ("variable", "path", "name")

    def __init__(self, variable):
        self.variable = variable
        self.path = re.sub(r":\d+$", "", variable.name)
        self.name = self.path


class _GraphVariableInstance(_rules._Selector):
    def __init__(self, variable):
        self.variable = variable

    def matches(self, view, layers_of):
        return view.variable is self.variable

    def describe(self):
        return f"variable {re.sub(r':[0-9]+$', '', self.variable.name)!r}"


class _GraphPredicate(_rules._Selector):
    """Calls the user's predicate with the graph variable itself, not our view."""

    def __init__(self, predicate: Callable):
        self.predicate = predicate

    def matches(self, view, layers_of):
        return bool(self.predicate(view.variable))

    def describe(self):
        name = getattr(self.predicate, "__qualname__", None) or repr(self.predicate)
        return f"predicate {name}"


def _graph_selector(obj, tf):
    if isinstance(obj, tuple):
        return tuple(_graph_selector(o, tf) for o in obj)
    if isinstance(obj, (keras.Layer, keras.Variable)) or (
        isinstance(obj, type) and issubclass(obj, keras.Layer)
    ):
        raise TypeError(
            f"{obj!r} is a Keras object, but tf.compat.v1 graph code has no Keras "
            "layers owning its variables. Select graph variables by name glob "
            "(e.g. 'backbone' or '*bias'), compiled regex, the tf.Variable itself, "
            "or a predicate callable(variable) -> bool."
        )
    if isinstance(obj, tf.Variable):
        return _GraphVariableInstance(obj)
    if callable(obj) and not isinstance(obj, (type, re.Pattern)):
        return _GraphPredicate(obj)
    return obj


def _graph_rules(lr_mult: RuleSpec, tf) -> tuple[_rules.Rule, ...]:
    # tf.Variables are unhashable, so variable selectors come in the list form.
    if isinstance(lr_mult, Mapping):
        spec: Any = [(_graph_selector(k, tf), v) for k, v in lr_mult.items()]
    elif isinstance(lr_mult, (list, tuple)):
        spec = [
            (_graph_selector(item[0], tf), item[1])
            if isinstance(item, (tuple, list)) and len(item) == 2
            else item
            for item in lr_mult
        ]
    else:
        spec = lr_mult
    return _rules.parse_rules(spec, "lr_mult")


def _scaled_rate(learning_rate, lr_mult: float):
    if lr_mult == 1.0:
        return learning_rate
    if callable(learning_rate):
        return lambda: learning_rate() * lr_mult
    return learning_rate * lr_mult


def _default_var_list(tf) -> list:
    keys = tf.compat.v1.GraphKeys
    seen: set[int] = set()
    result = []
    for v in tf.compat.v1.trainable_variables() + tf.compat.v1.get_collection(
        keys.TRAINABLE_RESOURCE_VARIABLES
    ):
        if id(v) not in seen:
            seen.add(id(v))
            result.append(v)
    return result


def compat_v1_minimize(
    loss,
    optimizer: Callable[[Any], Any],
    learning_rate,
    lr_mult: RuleSpec,
    *,
    var_list=None,
    global_step=None,
    name: str | None = None,
):
    """One ``tf.compat.v1`` training op with a learning rate per variable group.

    The TF1 counterpart of `LayerwiseOptimizer`: every variable ``v`` is
    trained as if by ``optimizer(learning_rate * lr_mult(v))`` on its own, with
    ONE gradient computation for all of them. Variables at ``lr_mult=0`` are
    left out of the gradient computation altogether (as in Caffe) and get no
    slots.

    Args:
        loss: The scalar loss tensor of the current graph.
        optimizer: A function that makes a ``tf.compat.v1.train`` optimizer
            from a learning rate, called once per distinct multiplier: an
            optimizer class (``tf.compat.v1.train.AdamOptimizer``) or e.g.
            ``lambda lr: tf.compat.v1.train.MomentumOptimizer(lr, 0.9)``.
            (An optimizer instance cannot be copied safely at another rate.)
        learning_rate: The base rate: a float, a scalar tensor (e.g.
            ``tf.compat.v1.train.exponential_decay(..., global_step, ...)``),
            or a callable returning one.
        lr_mult: Ordered rules ``{selector: multiplier}`` or a list of
            ``(selector, multiplier)``; first match wins, unmatched variables
            get 1.0. Selectors: a glob over variable names without ``:0``
            (``"backbone"``, ``"*bias"``), a compiled regex (searched), the
            ``tf.Variable`` itself (list form), a predicate
            ``callable(tf.Variable) -> bool``, or a tuple of these. A selector
            matching no variable is an error.
        var_list: The variables to train; defaults to the graph's trainable
            variables, as for ``Optimizer.minimize``.
        global_step: Optional step variable, incremented once per run after
            every group's update.
        name: Optional name of the returned op.

    Returns:
        The training ``tf.Operation``: run it once per step.

    Example:

    >>> import numpy as np, tensorflow as tf, layerlr
    >>> with tf.Graph().as_default():
    ...     x = tf.constant(np.ones((4, 3), "float32"))
    ...     with tf.compat.v1.variable_scope("backbone"):
    ...         w = tf.compat.v1.get_variable("w", initializer=np.ones((3, 2), "float32"))
    ...     with tf.compat.v1.variable_scope("head"):
    ...         u = tf.compat.v1.get_variable("u", initializer=np.ones((2, 1), "float32"))
    ...     loss = tf.reduce_sum(tf.matmul(tf.matmul(x, w), u))
    ...     train_op = layerlr.compat_v1_minimize(
    ...         loss, tf.compat.v1.train.GradientDescentOptimizer, 0.1,
    ...         lr_mult={"backbone": 0.5})
    ...     with tf.compat.v1.Session() as sess:
    ...         sess.run(tf.compat.v1.global_variables_initializer())
    ...         _ = sess.run(train_op)
    ...         w_after, u_after = sess.run([w, u])
    >>> round(float(w_after[0, 0]), 6), round(float(u_after[0, 0]), 6)  # 1 - 0.05*4, 1 - 0.1*12
    (0.8, -0.2)
    """
    import tensorflow as tf

    _check_graph_mode(tf)
    _check_optimizer_factory(optimizer, tf)
    rules = _numeric_rules(lr_mult, tf)
    variables = _checked_variables(var_list, tf)
    mults = [m for m, _ in _rules.resolve(rules, [_GraphVariable(v) for v in variables], "lr_mult")]
    groups = _groups_by_multiplier(variables, mults)
    optimizers = {mult: _make_optimizer(optimizer, learning_rate, mult, tf) for mult in groups}
    trained = [v for v, mult in zip(variables, mults) if mult != 0.0]
    grads = _gradients_once(loss, next(iter(optimizers.values())), trained)
    with tf.compat.v1.name_scope(name, "layerlr_minimize"):
        updates = _apply_per_group(groups, optimizers, grads)
        train_op = _train_op(updates, global_step, name, tf)
    _register_train_op(train_op, tf)
    return train_op


# --- the steps of compat_v1_minimize --------------------------------------------


def _check_graph_mode(tf) -> None:
    if tf.executing_eagerly():
        raise RuntimeError(
            "compat_v1_minimize builds graph-mode training ops: call it while "
            "building a graph (inside `with tf.Graph().as_default():`, or after "
            "tf.compat.v1.disable_eager_execution()). For eager TF2 or Keras "
            "training, use layerlr.LayerwiseOptimizer."
        )


def _check_optimizer_factory(optimizer, tf) -> None:
    if isinstance(optimizer, tf.compat.v1.train.Optimizer):
        raise TypeError(
            f"optimizer must make an optimizer from a learning rate, got the "
            f"instance {optimizer!r}. Pass its class "
            f"(tf.compat.v1.train.{type(optimizer).__name__}) or a function such "
            "as lambda lr: tf.compat.v1.train.MomentumOptimizer(lr, momentum=0.9): "
            "each group needs its own optimizer and state."
        )
    if not callable(optimizer):
        raise TypeError(
            "optimizer must be a callable learning_rate -> "
            f"tf.compat.v1.train.Optimizer, got {optimizer!r}."
        )


def _numeric_rules(lr_mult: RuleSpec, tf) -> tuple[_rules.Rule, ...]:
    # Each group's rate is fixed when its optimizer is made: a schedule of the
    # multiplier would have no step to follow.
    rules = _graph_rules(lr_mult, tf)
    for rule in rules:
        if not isinstance(rule.value, float):
            raise TypeError(
                f"The lr_mult rule {rule.describe()} has a schedule; in graph code "
                "multipliers are numbers. Make the base learning_rate a tensor of "
                "the global step instead (e.g. tf.compat.v1.train.exponential_decay)."
            )
    return rules


def _checked_variables(var_list, tf) -> list:
    variables = _default_var_list(tf) if var_list is None else list(var_list)
    if not variables:
        raise ValueError("No variables to optimize: the graph has no trainable variables.")
    for v in variables:
        if not isinstance(v, tf.Variable):
            raise TypeError(f"var_list must hold tf.Variables, got {v!r}.")
    return variables


def _groups_by_multiplier(variables: list, mults: list) -> dict[float, list]:
    """``{multiplier: variables}`` in first-seen order, without the ``lr_mult=0`` ones."""
    groups: dict[float, list] = {}
    for variable, mult in zip(variables, mults):
        if mult != 0.0:
            groups.setdefault(mult, []).append(variable)
    if not groups:
        raise ValueError(
            "Every variable has lr_mult 0, so there is nothing to train. Remove "
            "the training op, or give some variables a multiplier above 0."
        )
    return groups


def _make_optimizer(optimizer: Callable, learning_rate, mult: float, tf):
    opt = optimizer(_scaled_rate(learning_rate, mult))
    if not isinstance(opt, tf.compat.v1.train.Optimizer):
        raise TypeError(
            f"optimizer(learning_rate) must return a tf.compat.v1.train "
            f"optimizer, got {opt!r}. For Keras optimizers, use "
            "layerlr.LayerwiseOptimizer."
        )
    return opt


def _gradients_once(loss, any_optimizer, trained: list) -> dict[int, Any]:
    """``{id(variable): gradient or None}``, computed once for every group.

    Any group's optimizer will do: ``compute_gradients`` does not use the
    rate. Computing per group would run backprop once per group.
    """
    grads_and_vars = any_optimizer.compute_gradients(loss, var_list=trained)
    grads = {id(v): g for v, (g, _) in zip(trained, grads_and_vars)}
    if all(g is None for g in grads.values()):
        raise ValueError(
            "No gradients for any variable: the loss does not depend on "
            f"{[_GraphVariable(v).path for v in trained][:8]}. Check the loss and var_list."
        )
    return grads


def _apply_per_group(groups: dict, optimizers: dict, grads: dict) -> list:
    updates = []
    for mult, group in groups.items():
        pairs = [(grads[id(v)], v) for v in group if grads[id(v)] is not None]
        if pairs:  # a group the loss does not reach is left alone, as by minimize
            updates.append(optimizers[mult].apply_gradients(pairs))
    return updates


def _train_op(updates: list, global_step, name: str | None, tf):
    """The one op to run: every group's update, then the global step (once)."""
    if global_step is None:
        return tf.group(*updates, name=name or "train")
    with tf.control_dependencies(updates):
        train_op = global_step.assign_add(1, read_value=False, name=name or "train")
    # Graph-mode assign_add may hand back a tensor; callers expect an Operation.
    if isinstance(train_op, tf.Tensor):
        train_op = train_op.op
    return train_op


def _register_train_op(train_op, tf) -> None:
    # Optimizer.apply_gradients registers its own op in TRAIN_OP; the op to run
    # here is the one that groups them, so it goes there too.
    collection = tf.compat.v1.get_collection_ref(tf.compat.v1.GraphKeys.TRAIN_OP)
    if train_op not in collection:
        collection.append(train_op)
