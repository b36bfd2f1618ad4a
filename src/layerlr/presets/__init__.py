"""Presets: rules and schedules built for common recipes.

Layer-wise decay and depth (`_presets`, `_depth`), ``spread``, ``no_decay``,
LoRA+, multiplier schedules (`schedules`) and gradual unfreezing
(`_unfreezing`). Everything here produces input for `layerlr.core`.
"""
