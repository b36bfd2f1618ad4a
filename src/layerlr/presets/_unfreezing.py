"""Gradual unfreezing (ULMFiT style) that keeps the optimizer state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import keras

from layerlr.core import _keras
from layerlr.core._optimizer import LayerwiseOptimizer

LayerGroup = Union[keras.Layer, Sequence[keras.Layer]]


def _layerwise_optimizer(model) -> LayerwiseOptimizer:
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if not isinstance(optimizer, LayerwiseOptimizer):
        raise ValueError(
            "GradualUnfreezing needs the model compiled with a "
            f"layerlr.LayerwiseOptimizer, got {type(optimizer).__name__}: a plain "
            "Keras optimizer cannot add state for unfrozen variables (it raises "
            "'Unknown variable'). Wrap it: LayerwiseOptimizer(keras.optimizers.Adam(...))."
        )
    return optimizer


class GradualUnfreezing(keras.callbacks.Callback):
    """Unfreezes one group of layers every ``every`` epochs, keeping optimizer state.

    ``groups`` are given in unfreezing order, from the head down:
    ``groups[0]`` trains from the start, ``groups[k]`` from epoch ``k * every``.
    Frozen layers have ``trainable=False``, so they are left out of the
    gradient computation entirely. When a group is unfrozen the same
    `LayerwiseOptimizer` keeps the moments of the variables it already trains
    and creates fresh state for the new ones; the train function is rebuilt
    (once per unfreezing, not per step).

    Args:
        groups: Layers (or lists of layers), head first.
        every: Epochs between two unfreezings.
        unfreeze_batchnorm: If False (the default), BatchNormalization layers
            inside unfrozen groups stay frozen, i.e. in inference mode with
            their moving statistics fixed, as recommended for fine-tuning.

    Example:

    >>> import keras, layerlr
    >>> stem = keras.layers.Dense(8, name="stem")
    >>> block = keras.layers.Dense(8, name="block")
    >>> head = keras.layers.Dense(2, name="head")
    >>> model = keras.Sequential([keras.Input((4,)), stem, block, head])
    >>> model.compile(optimizer=layerlr.LayerwiseOptimizer(keras.optimizers.Adam()), loss="mse")
    >>> unfreeze = layerlr.GradualUnfreezing([head, block, stem], every=2)
    >>> # model.fit(x, y, epochs=6, callbacks=[unfreeze])
    """

    def __init__(self, groups: Sequence[LayerGroup], every: int = 1, unfreeze_batchnorm: bool = False):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be an int >= 1 (epochs), got {every!r}.")
        if isinstance(groups, keras.Layer) or not isinstance(groups, Sequence) or not groups:
            raise TypeError(
                "`groups` must be a non-empty list of layers or lists of layers, "
                f"head first, got {groups!r}."
            )
        self.groups = [self._as_group(g, i) for i, g in enumerate(groups)]
        self.every = every
        self.unfreeze_batchnorm = unfreeze_batchnorm
        self._unfrozen = None

    @staticmethod
    def _as_group(group, index) -> tuple[keras.Layer, ...]:
        layers = (group,) if isinstance(group, keras.Layer) else tuple(group)
        bad = [layer for layer in layers if not isinstance(layer, keras.Layer)]
        if not layers or bad:
            raise TypeError(
                f"groups[{index}] must be a keras.Layer or a non-empty list of layers, got {group!r}."
            )
        return layers

    def unfrozen_groups(self, epoch: int) -> int:
        """How many groups (from the head) train during ``epoch``."""
        return min(len(self.groups), 1 + epoch // self.every)

    def on_train_begin(self, logs=None):
        _layerwise_optimizer(self.model)
        self._unfrozen = None

    def on_epoch_begin(self, epoch, logs=None):
        count = self.unfrozen_groups(epoch)
        if count == self._unfrozen:
            return
        for i, group in enumerate(self.groups):
            for layer in group:
                layer.trainable = i < count
                if i < count and not self.unfreeze_batchnorm:
                    for sub in _keras.sublayers(layer):
                        if isinstance(sub, keras.layers.BatchNormalization):
                            sub.trainable = False
        self._unfrozen = count
        # Grow the optimizer state outside any compiled step, then rebuild the
        # train function so it differentiates exactly the trainable variables.
        _layerwise_optimizer(self.model).build(self.model.trainable_variables)
        self.model.make_train_function(force=True)
