"""Keras callbacks for training with a `layerlr.LayerwiseOptimizer`.

- `LearningRateLogger`: each learning-rate group's effective rate in the epoch
  logs (so ``History`` and ``CSVLogger`` get it) and in TensorBoard.
- `UpdateLogger`: how far each group of weights moves in a training step
  (``||w_after - w_before|| / ||w_before||``), with its weight and gradient
  norms, every N steps.
- `GradualUnfreezing`: unfreezes one group of layers every N epochs, keeping
  the optimizer state (also exported as ``layerlr.GradualUnfreezing``).
"""

from __future__ import annotations

import math
import numbers

import keras

from layerlr.core import _keras
from layerlr.report import _summary, _updates
from layerlr.presets._unfreezing import GradualUnfreezing

__all__ = ["GradualUnfreezing", "LearningRateLogger", "UpdateLogger"]


def _callback_list_of(callback) -> keras.callbacks.CallbackList | None:
    """The CallbackList now calling ``callback``, found on the call stack.

    Keras does not tell a callback about its siblings; this is the only way to
    see whether a TensorBoard callback runs with it, and in which order.
    """
    return _keras.caller_self(
        lambda owner: isinstance(owner, keras.callbacks.CallbackList)
        and any(c is callback for c in owner.callbacks),
        depth=10,
    )


def _tensorboards(callback) -> tuple[list, list]:
    """(TensorBoard callbacks before ``callback`` in its fit call, all of them)."""
    callbacks = _callback_list_of(callback)
    if callbacks is None:
        return [], []
    position = next(i for i, c in enumerate(callbacks.callbacks) if c is callback)
    boards = [c for c in callbacks.callbacks if isinstance(c, keras.callbacks.TensorBoard)]
    return [c for c in callbacks.callbacks[:position] if isinstance(c, keras.callbacks.TensorBoard)], boards


def _write_scalars(tensorboards, values: dict, step: int, tag_prefix: str = "") -> None:
    for tensorboard in tensorboards:
        with _keras.tensorboard_writer(tensorboard).as_default():
            for key, value in values.items():
                if math.isfinite(value):
                    tensorboard.summary.scalar(f"{tag_prefix}{key}", value, step=step)


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
        # TensorBoard callbacks after us write every epoch-log key themselves.
        self._tensorboards, _ = _tensorboards(self)

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
        # The tag TensorBoard itself gives an epoch-log key.
        _write_scalars(self._tensorboards, values, epoch, "epoch_")


class UpdateLogger(keras.callbacks.Callback):
    """How far each group of weights moves per training step, every ``every`` steps.

    On a measured step it copies every trained weight before the step and
    again after it, and records per group:

    - ``update_ratio/<group>``: ``||w_after - w_before|| / ||w_before||`` over
      the group's trained variables (about 1e-3 per step is the usual rule of
      thumb; far below, the group barely learns; far above, it is being
      rewritten);
    - ``weight_norm/<group>``: ``||w_before||``;
    - ``grad_norm/<group>``: the norm of the gradient that step used (after
      clipping and loss-scale unscaling), read back exactly from the
      optimizer's first moment for Adam, AdamW, Nadam, Lamb, Adamax and Lion
      (``g = (m_after - beta * m_before) / (1 - beta)``); NaN, with a warning,
      for optimizers that keep no first moment.

    Groups are the learning-rate groups (one per ``lr_mult`` rule, as in
    `LearningRateLogger`, `layerlr.summary` and the plots; ``default`` for a
    plain optimizer; one per sub-optimizer of a ``MultiOptimizer``), or one
    per layer with ``groups="layers"``. A group whose layers are frozen
    (``trainable=False``) is recorded as ``frozen``; one whose weights did not
    change (``lr_mult`` 0, a step skipped by loss scaling) as ``not updated``.

    Nothing runs inside the training step, so training is unchanged; the cost is
    two copies of the weights on measured steps only (well under 2% of ``fit``
    at ``every=100``: ``python -m benchmarks.run --updates``). On JAX a
    measured step first waits for the steps ``fit`` has dispatched ahead,
    which ``fit`` would wait for at the end of the epoch anyway.

    Where it goes:

    - ``logger.history``: one entry per measured step, ``{"step": [...],
      "update_ratio/<group>": [...], ..., "status/<group>": [...]}``
      (``step`` counts optimizer updates from 0); ``pandas.DataFrame`` reads it.
    - The epoch logs, so ``History``, ``CSVLogger`` and the progress bar: the
      mean over the epoch's measured steps (NaN for an epoch without one).
    - TensorBoard, when a ``keras.callbacks.TensorBoard`` callback is in the
      same ``fit`` call: each measured step as ``update_ratio/<group>`` (and
      the norms) at its step, and the epoch means as ``epoch_update_ratio/<group>``.
    - `layerlr.plot.update_ratios` draws it, from the logger or from the
      ``History`` that ``fit`` returned.

    Args:
        every: Measure one step in every ``every`` optimizer updates (the first
            update included).
        groups: None for the optimizer's groups, ``"layers"`` for one per layer.

    Example:

    >>> import keras, layerlr, numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="body"),
    ...                           keras.layers.Dense(2, name="head")])
    >>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={"body": 0.01})
    >>> model.compile(optimizer=opt, loss="mse")
    >>> logger = layerlr.callbacks.UpdateLogger(every=2)
    >>> _ = model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=2, epochs=1, verbose=0,
    ...               callbacks=[logger])
    >>> logger.history["step"]
    [0, 2]
    >>> sorted(k for k in logger.history if k.startswith("update_ratio/"))
    ['update_ratio/body', 'update_ratio/default']
    """

    def __init__(self, every: int = 100, groups: str | None = None):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}.")
        if groups not in (None, "layers"):
            raise ValueError(
                f"groups must be None (the optimizer's learning-rate groups) or "
                f"'layers' (one group per layer), got {groups!r}."
            )
        self.every = int(every)
        self.groups = groups
        self.history: dict[str, list] = {"step": []}
        self._pending = None
        self._layout = None

    # --- bookkeeping ---------------------------------------------------------

    def on_train_begin(self, logs=None):
        model = self.model
        if getattr(model, "optimizer", None) is None:
            raise ValueError("UpdateLogger needs a compiled model (model.compile(optimizer=...)).")
        steps = getattr(model, "steps_per_execution", 1) or 1
        if int(steps) != 1:
            raise ValueError(
                f"UpdateLogger measures one training step at a time, but the model was "
                f"compiled with steps_per_execution={steps}: Keras then runs {steps} steps "
                "between two callback calls. Compile with steps_per_execution=1 to log updates."
            )
        self._before_us, self._all_boards = _tensorboards(self)
        counter, self._accumulation = _updates.step_counter(model.optimizer)
        self._raw = int(keras.ops.convert_to_numpy(counter.value))
        self._pending = None
        self._layout = None
        self._warned = False
        self._epoch: dict[str, list] = {}
        history = getattr(model, "history", None)
        if isinstance(history, keras.callbacks.History):
            # So that layerlr.plot.update_ratios(model.fit(...)) finds the steps.
            history.layerlr_updates = self.history

    def _due(self, raw: int) -> bool:
        k = self._accumulation
        if (raw + 1) % k:
            return False  # the optimizer only accumulates at this batch
        return ((raw + 1) // k - 1) % self.every == 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._pending is not None:
            self._finish()
        if self._due(self._raw):
            self._start()
        self._raw += 1

    def on_test_begin(self, logs=None):
        # Validation comes after the epoch's last step (and may swap in EMA weights).
        if self._pending is not None:
            self._finish()

    def on_epoch_end(self, epoch, logs=None):
        if self._pending is not None:
            self._finish()
        values = {
            key: (sum(v) / len(v) if v else math.nan) for key, v in self._epoch.items()
        }
        self._epoch = {key: [] for key in self._epoch}
        if logs is not None:
            logs.update(values)
        _write_scalars(self._before_us, values, epoch, "epoch_")

    def on_train_end(self, logs=None):
        if self._pending is not None:
            self._finish()

    # --- measuring -----------------------------------------------------------

    def _bare_model(self):
        # On JAX `self.model` writes the training state back into every
        # variable; the measurements read the state itself (`_updates._values`).
        return _keras.callback_model(self)

    def _settle(self):
        # JAX: wait for the steps dispatched so far, once, before the reads.
        _updates.settle(self._bare_model())

    def _start(self):
        self._settle()
        model = self._bare_model()
        key = tuple(id(v) for v in model.trainable_variables)
        layout = self._layout
        if layout is None or layout.trainable_key != key or layout.optimizer is not _updates._unwrap(model.optimizer):
            model = self.model  # resolving the groups reads the optimizer's values
            layout = self._layout = _updates.build_layout(model, self.groups)
            if not self._warned:
                _updates.warn_without_gradients(layout)
                self._warned = True
        self._pending = _updates.snapshot(layout, self._bare_model(), self._accumulation)
        self._raw = self._pending.raw_step  # in step with the optimizer (skipped steps)

    def _finish(self):
        before, self._pending = self._pending, None
        self._settle()
        results = _updates.measure(before, self._bare_model())
        row = {"step": before.step}
        for group, result in results.items():
            for metric in _updates.METRICS:
                row[f"{metric}/{group}"] = result[metric]
            row[f"status/{group}"] = result["status"]
        length = len(self.history["step"])
        for key, value in row.items():
            # A group new to this fit (the optimizer was replaced) starts with gaps.
            column = self.history.setdefault(key, [math.nan] * length)
            column.append(value)
        for key, column in self.history.items():
            if len(column) == length:
                column.append(math.nan)
        numbers_ = {k: v for k, v in row.items() if k != "step" and not k.startswith("status/")}
        for key, value in numbers_.items():
            bucket = self._epoch.setdefault(key, [])
            if math.isfinite(value):
                bucket.append(value)
        _write_scalars(self._all_boards, numbers_, before.step)
