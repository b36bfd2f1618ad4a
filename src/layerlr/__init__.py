"""layerlr: per-layer learning-rate and weight-decay multipliers for Keras 3.

>>> import keras, layerlr
>>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={"backbone": 0.01})

The core is `LayerwiseOptimizer`; the rest builds rules for it (`layer_decay`,
`spread`, `no_decay`, `lora_plus`, `schedules`, `from_caffe`), trains with it
(`GradualUnfreezing`, `callbacks`, `multi_optimizer`, `compat_v1_minimize`) or
shows what it does (`summary`, `summary_records`, `plot`, the `layerlr` command).
"""

from layerlr import callbacks, plot, schedules
from layerlr._caffe import from_caffe
from layerlr._compat_v1 import compat_v1_minimize
from layerlr._multi import multi_optimizer
from layerlr._optimizer import LayerwiseOptimizer, VariableMultipliers
from layerlr._presets import layer_decay, lora_plus, no_decay, spread
from layerlr._summary import summary, summary_records
from layerlr._unfreezing import GradualUnfreezing

__all__ = [
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
    "schedules",
    "spread",
    "summary",
    "summary_records",
]
__version__ = "0.1.0"
