"""One training scenario shared by the tests and the subprocesses they start.

Distributed and cross-backend tests compare a run in another process (another
backend, several devices, several workers) with a run in the test process.
Both sides build the same model, optimizer and data from this module; the
initial weights travel as an ``.npz`` file because initializers draw different
numbers on different backends.

Importing this module has no side effects (pytest imports it for doctests).
"""

from __future__ import annotations

import numpy as np
import keras

import layerlr
from helpers import DECAY_RULES, LR_RULES, hand_multipliers, make_model, reference_optimizer

BATCH_SIZE = 16
STEPS_PER_EPOCH = 4  # helpers.data() has 64 rows

# Nadam: its once-per-step `_u_product` is the state most easily lost or
# advanced twice; weight decay exercises the decay multipliers as well.
OPTIMIZERS = {
    "nadam": (keras.optimizers.Nadam, dict(learning_rate=0.01, weight_decay=0.02)),
    "adamw": (keras.optimizers.AdamW, dict(learning_rate=0.01, weight_decay=0.05)),
}


def optimizer(kind: str, name: str = "nadam"):
    """``kind``: "layerwise" (ours), "reference" (one optimizer per group) or "plain"."""
    opt_class, kwargs = OPTIMIZERS[name]
    if kind == "layerwise":
        return layerlr.LayerwiseOptimizer(
            opt_class(**kwargs), lr_mult=LR_RULES, decay_mult=DECAY_RULES
        )
    if kind == "reference":
        return reference_optimizer(opt_class, kwargs, hand_multipliers)
    if kind == "plain":
        return opt_class(**kwargs)
    raise ValueError(f"unknown optimizer kind {kind!r}")


def compiled_model(initial_weights, kind="layerwise", name="nadam", **compile_kwargs):
    model = make_model()
    model.set_weights(list(initial_weights))
    model.compile(optimizer=optimizer(kind, name), loss="mse", **compile_kwargs)
    return model


def fit(model, x, y, epochs=1):
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, shuffle=False, verbose=0)
    return model


def save_weights(path, weights):
    np.savez(path, *[np.asarray(w) for w in weights])


def load_weights(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def max_diff(weights_a, weights_b) -> float:
    assert len(weights_a) == len(weights_b)
    return max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(weights_a, weights_b)
    )
