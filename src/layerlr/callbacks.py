"""Keras callbacks for training with a `layerlr.LayerwiseOptimizer`.

- `LearningRateLogger`: each learning-rate group's effective rate in the epoch
  logs (so ``History`` and ``CSVLogger`` get it) and in TensorBoard.
- `GradualUnfreezing`: unfreezes one group of layers every N epochs, keeping
  the optimizer state (also exported as ``layerlr.GradualUnfreezing``).
"""

from __future__ import annotations

import inspect

import keras

from layerlr import _summary
from layerlr._unfreezing import GradualUnfreezing

__all__ = ["GradualUnfreezing", "LearningRateLogger"]


def _callback_list_of(callback) -> keras.callbacks.CallbackList | None:
    """The CallbackList now calling ``callback``, found on the call stack.

    Keras does not tell a callback about its siblings; this is the only way to
    see whether a TensorBoard callback runs with it, and in which order.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(10):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList) and any(
                c is callback for c in owner.callbacks
            ):
                return owner
    finally:
        del frame
    return None


class LearningRateLogger(keras.callbacks.Callback):
    """Logs every learning-rate group's effective rate at the end of each epoch.

    A group is the variables whose multiplier the same ``lr_mult`` rule
    decided, named after the rule (``"default"`` for the unmatched ones, so a
    rule ``{"backbone": 0.01}`` gives ``learning_rate/backbone``). The value is
    the base learning rate at the optimizer's current step (schedules included)
    times the group's ``lr_mult``, the rate its next update uses. Callbacks that
    change the rate at the end of an epoch (``ReduceLROnPlateau``) do not shift
    it by an epoch: the values match Keras' own ``learning_rate`` column
    whichever callback comes first.

    The values go into the epoch logs, so ``History``, ``CSVLogger`` and the
    progress bar show them. When a ``keras.callbacks.TensorBoard`` callback is in
    the same ``fit`` call, they are also written as TensorBoard scalars
    (``epoch_learning_rate/<group>``, next to Keras' ``epoch_learning_rate``),
    whatever the order of the two callbacks.

    Args:
        prefix: Put before each group name to form the log key.

    Example:

    >>> import keras, layerlr, numpy as np
    >>> from layerlr.callbacks import LearningRateLogger
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")])
    >>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult={"*bias": 0.5})
    >>> model.compile(optimizer=opt, loss="mse")
    >>> history = model.fit(np.ones((4, 3)), np.ones((4, 2)), epochs=2, verbose=0,
    ...                     callbacks=[LearningRateLogger()])
    >>> {k: [round(v, 6) for v in vs] for k, vs in history.history.items() if "/" in k}
    {'learning_rate/default': [0.1, 0.1], 'learning_rate/bias': [0.05, 0.05]}
    """

    def __init__(self, prefix: str = "learning_rate/"):
        super().__init__()
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {prefix!r}.")
        self.prefix = prefix
        self._tensorboards: list[keras.callbacks.TensorBoard] = []

    def on_train_begin(self, logs=None):
        # Fail at the start of fit, not after the first epoch.
        _summary.layerwise_optimizer_of(self.model)
        callbacks = _callback_list_of(self)
        self._tensorboards = []
        if callbacks is not None:
            position = next(i for i, c in enumerate(callbacks.callbacks) if c is self)
            # TensorBoard callbacks after us write every epoch-log key themselves.
            self._tensorboards = [
                c
                for c in callbacks.callbacks[:position]
                if isinstance(c, keras.callbacks.TensorBoard)
            ]

    def on_epoch_end(self, epoch, logs=None):
        # Keras' own `learning_rate` column (written by ReduceLROnPlateau,
        # LearningRateScheduler or TensorBoard) is the base rate before any
        # callback changes it at this epoch's end. When one of them ran before
        # us and may have changed it since, that value is our base too, so the
        # two columns agree whatever the order of the callbacks.
        base = (logs or {}).get("learning_rate")
        if isinstance(base, bool) or not isinstance(base, (int, float)):
            base = None
        # Read the optimizer each time: compiling again replaces it.
        rates = _summary.group_learning_rates(self.model.optimizer, base)
        values = {f"{self.prefix}{name}": rate for name, rate in rates.items()}
        if logs is not None:
            logs.update(values)
        for tensorboard in self._tensorboards:
            with tensorboard._train_writer.as_default():
                for key, value in values.items():
                    # The tag TensorBoard itself gives an epoch-log key.
                    tensorboard.summary.scalar(f"epoch_{key}", value, step=epoch)
