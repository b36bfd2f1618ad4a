"""layerlr: per-layer learning-rate and weight-decay multipliers for Keras 3.

>>> import keras, layerlr
>>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={"backbone": 0.01})
"""

from layerlr._optimizer import LayerwiseOptimizer, VariableMultipliers

__all__ = ["LayerwiseOptimizer", "VariableMultipliers"]
__version__ = "0.1.0"
