"""Multiplier schedules: a multiplier that changes with the optimizer step.

Any ``keras.optimizers.schedules.LearningRateSchedule`` can be a multiplier
value; it is called with the optimizer's step inside the compiled train step,
so changing phase never retraces. The base learning rate (and its own schedule)
still multiplies it. A schedule that is 0 at step 0 says when it leaves 0 with
a ``start_step`` attribute: from there its variables count their own steps
(Adam's bias correction...), like a parameter group added at that step.

>>> import keras, layerlr
>>> warm = layerlr.schedules.FreezeThenWarmup(freeze_steps=100, warmup_steps=50, value=0.1)
>>> [round(float(warm(s)), 4) for s in (0, 99, 100, 124, 149, 1000)]
[0.0, 0.0, 0.002, 0.05, 0.1, 0.1]
>>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={"backbone": warm})
"""

from __future__ import annotations

import math

import keras
from keras import ops

__all__ = ["FreezeThenWarmup"]


@keras.saving.register_keras_serializable(package="layerlr")
class FreezeThenWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """0 for ``freeze_steps`` steps, then a linear ramp reaching ``value`` after ``warmup_steps``.

    While the multiplier is 0 the variables and their optimizer slots are left
    untouched, exactly as with a constant ``lr_mult`` of 0 (the optimizer's own
    step counter still advances, as it is shared by all variables).

    Args:
        freeze_steps: Optimizer steps at multiplier 0.
        warmup_steps: Steps of the linear ramp from 0 to ``value`` (0: jump).
        value: The multiplier after the ramp.
    """

    def __init__(self, freeze_steps: int, warmup_steps: int = 0, value: float = 1.0):
        for name, steps in (("freeze_steps", freeze_steps), ("warmup_steps", warmup_steps)):
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"{name} must be an int >= 0, got {steps!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"value must be a finite number >= 0, got {value!r}.")
        self.freeze_steps = freeze_steps
        self.warmup_steps = warmup_steps
        self.value = float(value)

    @property
    def start_step(self) -> int:
        """The first step at which the multiplier is nonzero.

        The variables it applies to count their own optimizer steps from here
        (Adam's bias correction...), like a parameter group added at this step.
        """
        return self.freeze_steps

    def __call__(self, step):
        step = ops.cast(step, "float32")
        since = step - float(self.freeze_steps)
        # Step `freeze_steps` is the ramp's first, already at 1/warmup_steps:
        # "frozen for N steps" means exactly N steps at 0.
        ramp = 1.0 if self.warmup_steps == 0 else ops.clip((since + 1.0) / self.warmup_steps, 0.0, 1.0)
        return ops.where(since < 0, 0.0, ramp * self.value)

    def get_config(self):
        return {
            "freeze_steps": self.freeze_steps,
            "warmup_steps": self.warmup_steps,
            "value": self.value,
        }
