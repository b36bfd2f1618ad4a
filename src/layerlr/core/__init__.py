"""Core: what gets which multiplier, and how the optimizer applies it.

- `_rules`: selectors and rules, and resolving them over variables.
- `_resolution`: what each variable of a model gets (`VariableMultipliers`,
  `Assignment`), and matching saved settings back to a model after loading.
- `_optimizer`: `LayerwiseOptimizer`, the wrapper users compile with; its
  ``resolve()`` is the public view of the per-variable assignment.
- `_hooks`, `_torch_fused`: the hook installed on the inner optimizer.
- `_state`: growing the inner optimizer's state for variables that join late.
- `_keras`: every access to private Keras and backend internals;
  `_keras_internals` checks each of them against the installed Keras.

Nothing here imports from `presets`, `interop` or `report`.
"""
