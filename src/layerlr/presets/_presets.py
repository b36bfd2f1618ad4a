"""Rule presets: layer-wise LR decay, discriminative spreads, no-weight-decay.

Each function returns an ordered list of ``(selector, multiplier)`` pairs, the
form `LayerwiseOptimizer` takes for ``lr_mult=`` and ``decay_mult=``. Put your
own rules first to override a preset (the first matching rule wins):
``lr_mult=[(embedding, 0.0), *layerlr.layer_decay(model, 0.8)]``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import keras

from layerlr.core import _keras, _rules
from layerlr.core._resolution import resolve_in_model
from layerlr.presets import _depth

Rules = list[tuple[Any, float]]


def layer_decay(
    model: keras.Layer,
    decay: float = 0.75,
    *,
    sample_input: Any = None,
    block_pattern: str | re.Pattern | None = None,
    stem_depth: int | None = None,
) -> Rules:
    """Layer-wise learning-rate decay: ``decay ** depth`` for every layer.

    The output head gets 1.0 and a layer ``k`` steps further from the output
    gets ``decay ** k``. Returns one ``(layer, multiplier)`` rule per layer with
    trainable weights, head first (the selectors are the layer objects, so the
    rules survive renames and path changes); a subclassed model's own weights
    (a class token, position embeddings) get ``(variable, multiplier)`` rules.

    How depth is counted:

    - Sequential models: one step per layer with weights, in order
      (``Dropout``, ``Flatten``... do not count).
    - Functional models: from the graph. The layers of a block closed by a
      join (the ``Add`` of a residual connection, the ``Concatenate`` of
      parallel branches, the ``Multiply`` of a gate) share one depth with the
      join, provided nothing inside the block feeds anything outside it; side
      inputs (attention masks, an encoder's output) do not break a block, and a
      block inside a block belongs to the outer one. So a transformer layer
      built from plain Keras layers is two steps: its attention and its MLP
      residual blocks. Where paths differ in length, the longest counts: two
      towers merging each count back from the merge; an encoder feeding every
      decoder layer sits below the whole decoder.
    - A normalization layer (``BatchNormalization``, ``LayerNormalization``,
      ``GroupNormalization``, ``RMSNormalization``) that is not inside a block
      shares the step of the layer whose output it normalizes: Conv + BN is
      one step, and so is a post-LN ``Add`` + ``LayerNormalization``.
    - A layer that is not a model (``MultiHeadAttention``, a KerasHub
      ``TransformerEncoder``, your own ``Block`` layer) is one step with all
      its sublayers. Nested models are expanded in place.
    - Subclassed models list their layers in attribute order, not execution
      order, so they are called once on ``sample_input`` (``training=False``)
      and each sublayer call counts as a step in the order it ran.
    - Only layers holding variables created trainable count, frozen ones
      included. A layer called at several depths gets its call nearest the
      output. Layers no call reaches keep the default 1.0 (with a warning).

    To count whole blocks, name them: with ``block_pattern`` (a regex searched
    in every layer name, nested layers included), the layers whose names match
    with the same captured groups form one block with every layer between
    them: ``r"transformer_layer_(\\d+)"`` makes each ``transformer_layer_i``
    one step, ``r"block(\\d+)_"`` groups ``block3_ln1``, ``block3_mha``...
    All layers before the first block are the stem (embeddings), one step
    deeper than the first block unless ``stem_depth`` sets its depth; every
    other layer (after the last block) is a step of its own, without automatic
    block detection.

    Args:
        model: A built Keras model (or one ``sample_input`` builds).
        decay: The factor per step, in (0, 1].
        sample_input: A batch to call the model on once; needed only for
            subclassed models (or an unbuilt model).
        block_pattern: A regex naming blocks, see above.
        stem_depth: The depth of the stem (its multiplier is
            ``decay ** stem_depth``); needs ``block_pattern``.

    Returns:
        ``[(layer_or_variable, multiplier), ...]`` for ``lr_mult=``.

    Example:

    >>> import keras, layerlr
    >>> inputs = keras.Input((8,))
    >>> h = keras.layers.Dense(8, name="stem")(inputs)
    >>> r = keras.layers.Dense(8, name="branch")(keras.layers.LayerNormalization(name="ln")(h))
    >>> h = keras.layers.Add(name="residual")([h, r])
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
    >>> rules = layerlr.layer_decay(model, 0.5)
    >>> [(layer.name, mult) for layer, mult in rules]
    [('head', 1.0), ('ln', 0.5), ('branch', 0.5), ('stem', 0.25)]
    >>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.AdamW(1e-3), lr_mult=rules)
    """
    decay = _check_decay(decay)
    depths = _depth.layer_depths(
        model, sample_input=sample_input, block_pattern=block_pattern, stem_depth=stem_depth
    )
    return [(selector, decay**depth) for selector, depth in depths]


def _check_decay(decay) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay must be a number in (0, 1], got {decay!r}.")
    decay = float(decay)
    if not 0.0 < decay <= 1.0:
        raise ValueError(
            f"decay must be in (0, 1] (1.0 means no decay), got {decay!r}. For "
            "rates that grow towards the input, use layerlr.spread(groups, low, high)."
        )
    return decay


def spread(groups: Sequence[Any], low: float, high: float) -> Rules:
    """Geometric multipliers from ``low`` (first group) to ``high`` (last group).

    fastai's ``lr=slice(low, high)``: group ``i`` of ``n`` gets
    ``low * (high / low) ** (i / (n - 1))``; a single group gets ``high``.
    Groups are selectors (layers, glob strings, layer types, ...) or tuples or
    lists of them, typically from the input side to the output side.

    Example:

    >>> import keras, layerlr
    >>> backbone = keras.Sequential([keras.layers.Dense(4, name="d")], name="backbone")
    >>> neck = keras.layers.Dense(4, name="neck")
    >>> head = keras.layers.Dense(2, name="head")
    >>> rules = layerlr.spread([backbone, neck, head], 1e-3, 1e-1)
    >>> [(group.name, round(mult, 6)) for group, mult in rules]
    [('backbone', 0.001), ('neck', 0.01), ('head', 0.1)]
    """
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise TypeError(
            "groups must be a list of selectors from the input side to the output "
            f"side, e.g. [backbone, neck, head], got {type(groups).__name__}: {groups!r}."
        )
    if not groups:
        raise ValueError("groups is empty: give at least one group of layers.")
    low = _positive(low, "low")
    high = _positive(high, "high")
    selectors = []
    for i, group in enumerate(groups):
        if isinstance(group, list):
            if not group:
                raise ValueError(f"groups[{i}] is an empty list: it selects nothing.")
            group = tuple(group)
        try:
            _rules.make_selector(group)
        except (TypeError, ValueError) as error:
            raise type(error)(f"groups[{i}]: {error}") from None
        selectors.append(group)
    n = len(selectors)
    if n == 1:
        return [(selectors[0], high)]
    ratio = high / low
    mults = [low * ratio ** (i / (n - 1)) for i in range(n)]
    mults[0], mults[-1] = low, high  # exact ends, whatever the rounding
    return list(zip(selectors, mults))


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a finite number > 0, got {value!r}.")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{what} must be a finite number > 0 (a geometric spread cannot reach 0), "
            f"got {value!r}. To freeze a group, add a rule (group, 0.0) before the spread."
        )
    return value


def no_decay(model: keras.Layer, *, embeddings: bool = False) -> Rules:
    """``decay_mult`` rules of 0.0 for biases and normalization parameters.

    Normalization layers are found by type (``BatchNormalization``,
    ``LayerNormalization``, ``GroupNormalization``, ``RMSNormalization`` and
    their subclasses), whatever their names; biases are the variables a layer
    stores as its ``bias`` attribute or names ``"bias"`` (``Dense``, ``Conv*``,
    ``EinsumDense`` inside attention, recurrent cells...). With
    ``embeddings=True``, embedding layers too: ``Embedding`` and subclasses,
    and any layer class named ``...Embedding`` (KerasHub's ``PositionEmbedding``).

    The selectors are the layers and variables themselves, one rule each, only
    for those that have weights; frozen ones are included, so the rules stay
    valid when they are unfrozen. Put your own rules first to override:
    ``decay_mult=[(special, 0.5), *layerlr.no_decay(model)]``.

    Example:

    >>> import keras, layerlr
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(8, name="dense"),
    ...     keras.layers.LayerNormalization(name="norm"),
    ...     keras.layers.Dense(2, use_bias=False, name="head"),
    ... ], name="net")
    >>> rules = layerlr.no_decay(model)
    >>> [(selector.path, mult) for selector, mult in rules]
    [('net/dense/bias', 0.0), ('net/norm', 0.0)]
    >>> opt = layerlr.LayerwiseOptimizer(
    ...     keras.optimizers.AdamW(1e-3, weight_decay=0.05), decay_mult=rules)
    """
    if not isinstance(model, keras.Layer):
        raise TypeError(
            f"Expected a Keras model or layer, got {model!r} of type {type(model).__name__}."
        )
    if not model.weights:
        raise ValueError(
            f"The model {model.name!r} has no weights yet. Build it first: call it on "
            "data, give it a keras.Input, or use model.build(input_shape)."
        )
    layers = _keras.sublayers(model)
    found: list[tuple[Any, list]] = []  # (selector, its variables)
    covered: set[int] = set()
    for layer in layers:
        if isinstance(layer, _depth.NORMALIZATION_TYPES) or (embeddings and _depth._is_embedding(layer)):
            variables = _depth.params(layer)
            if variables:
                found.append((layer, variables))
                covered.update(id(v) for v in variables)
    for layer in layers:
        for variable in _depth._own_params(layer):
            if id(variable) not in covered and _is_bias(layer, variable):
                found.append((variable, [variable]))
                covered.add(id(variable))
    # In the model's variable order, which is what summaries show.
    position = {id(v): i for i, v in enumerate(model.weights)}
    found.sort(key=lambda item: min(position.get(id(v), len(position)) for v in item[1]))
    return [(selector, 0.0) for selector, _ in found]


def _is_bias(layer, variable) -> bool:
    # vars(): a `bias` property could compute something; the stored attribute cannot.
    return variable.name == "bias" or vars(layer).get("bias") is variable


def lora_plus(model: keras.Layer, ratio: float = 16.0, *, base: Rules | None = None) -> Rules:
    """LoRA+ (Hayou et al., 2024): the B matrices of LoRA adapters at ``ratio`` x the rate of A.

    For layers after ``enable_lora(rank)`` (``Dense``, ``EinsumDense``,
    ``Embedding``, convolutions, or a KerasHub ``backbone.enable_lora(rank)``),
    which Keras gives two new variables, ``lora_kernel_a`` (A, initialised
    randomly) and ``lora_kernel_b`` (B, initialised to zero). LoRA+ trains B
    ``ratio`` times faster than A (the paper's default is 16).

    Without ``base``, returns ``[("lora_kernel_b", ratio)]``: B at ``ratio`` x
    the base rate, A (and everything else) at the base rate. With ``base``
    rules (e.g. ``layer_decay(model)``), each adapter's B gets ``ratio`` x the
    multiplier its A gets from them, followed by the base rules themselves, so
    the ratio holds at every depth.

    Args:
        model: A model with LoRA enabled on some layers.
        ratio: lr(B) / lr(A), a finite number > 0.
        base: Rules for everything else, as ``lr_mult=`` takes them.

    Returns:
        Rules for ``lr_mult=``.

    Example:

    >>> import keras, layerlr
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="proj"),
    ...                           keras.layers.Dense(2, name="head")])
    >>> model.get_layer("proj").enable_lora(2)
    >>> layerlr.lora_plus(model, 16.0)
    [('lora_kernel_b', 16.0)]
    >>> rules = layerlr.lora_plus(model, 16.0, base=[("proj", 0.5)])
    >>> [(getattr(s, "path", s), m) for s, m in rules]
    [('sequential/proj/lora_kernel_b', 8.0), ('proj', 0.5)]
    """
    if not isinstance(model, keras.Layer):
        raise TypeError(
            f"Expected a Keras model or layer, got {model!r} of type {type(model).__name__}."
        )
    ratio = _positive(ratio, "ratio")
    adapters = [
        (layer, getattr(layer, "lora_kernel_a", None), getattr(layer, "lora_kernel_b", None))
        for layer in _keras.sublayers(model)
        if getattr(layer, "lora_enabled", False)
    ]
    adapters = [(layer, a, b) for layer, a, b in adapters if a is not None and b is not None]
    if not adapters:
        raise ValueError(
            f"lora_plus: the model {model.name!r} has no LoRA adapters (no layer with "
            "lora_kernel_a / lora_kernel_b). Enable them first: layer.enable_lora(rank) "
            "on Dense, EinsumDense, Embedding or convolution layers, or "
            "backbone.enable_lora(rank) on a KerasHub backbone."
        )
    if base is None:
        return [("lora_kernel_b", ratio)]
    rules = _rules.parse_rules(base, "base")
    variables = [a for _, a, _ in adapters]
    found = resolve_in_model(rules, variables, "base", model, check_unused=False)
    result: Rules = []
    for (layer, _, b), (mult, _) in zip(adapters, found):
        if not isinstance(mult, float):
            raise TypeError(
                f"lora_plus: the base rules give the LoRA A matrix of {layer.name!r} a "
                f"schedule ({type(mult).__name__}); B's rate can only be a fixed ratio of a "
                "fixed multiplier. Give LoRA layers numeric multipliers in base."
            )
        result.append((b, ratio * mult))
    return result + list(base.items() if isinstance(base, dict) else base)
