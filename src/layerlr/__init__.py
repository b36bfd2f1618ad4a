"""layerlr: per-layer learning-rate and weight-decay multipliers for Keras 3.

>>> import keras, layerlr
>>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={"backbone": 0.01})

The core is `LayerwiseOptimizer`; the rest builds rules for it (`layer_decay`,
`spread`, `no_decay`, `lora_plus`, `schedules`, `from_caffe`), trains with it
(`GradualUnfreezing`, `callbacks`, `multi_optimizer`, `compat_v1_minimize`) or
shows what it does (`resolve`, `summary`, `summary_records`, `plot`, the `layerlr` command).
"""

import sys as _sys

from layerlr.core._optimizer import LayerwiseOptimizer, resolve
from layerlr.core._resolution import Assignment, VariableMultipliers
from layerlr.interop._caffe import from_caffe
from layerlr.interop._compat_v1 import compat_v1_minimize
from layerlr.interop._multi import multi_optimizer
from layerlr.presets import schedules
from layerlr.presets._presets import layer_decay, lora_plus, no_decay, spread
from layerlr.presets._unfreezing import GradualUnfreezing
from layerlr.report import callbacks, plot
from layerlr.report._summary import summary, summary_records

# The public module paths (`import layerlr.plot`, `from layerlr.callbacks
# import ...`) name the modules where they live.
for _module in (callbacks, plot, schedules):
    _sys.modules[f"layerlr.{_module.__name__.rsplit('.', 1)[-1]}"] = _module
del _module

__all__ = [
    "Assignment",
    "GradualUnfreezing",
    "LayerwiseOptimizer",
    "VariableMultipliers",
    "callbacks",
    "compat_v1_minimize",
    "from_caffe",
    "layer_decay",
    "lora_plus",
    "multi_optimizer",
    "no_decay",
    "plot",
    "resolve",
    "schedules",
    "spread",
    "summary",
    "summary_records",
]
__version__ = "0.1.0"
