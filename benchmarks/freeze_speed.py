"""Step time of a fine-tune with the backbone frozen vs the same model fully trainable.

Freezing (``trainable=False``, what ``layerlr.GradualUnfreezing`` does for the
groups it has not reached yet) removes the backbone from the gradient
computation; ``lr_mult=0`` does not (its gradients are computed, then unused).
All three are timed interleaved in one process; medians and the spread of
paired ratios are printed.

    KERAS_BACKEND=tensorflow python benchmarks/freeze_speed.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import keras

import layerlr


def build(batch):
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [keras.Input((32, 32, 3))]
        + [keras.layers.Conv2D(32, 3, padding="same", activation="relu", name=f"conv{i}") for i in range(5)],
        name="backbone",
    )
    model = keras.Sequential([
        keras.Input((32, 32, 3)), backbone,
        keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="new_conv"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, name="head"),
    ])
    return model, backbone


def configure(kind, batch):
    model, backbone = build(batch)
    head = [model.get_layer("new_conv"), model.get_layer("head")]
    if kind == "frozen":
        callback = layerlr.GradualUnfreezing([head, backbone], every=10**6)
        opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={backbone: 0.01})
    elif kind == "lr_mult_0":
        callback, opt = None, layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={backbone: 0.0})
    else:
        callback, opt = None, layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={backbone: 0.01})
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(batch,))
    if callback is not None:  # apply the freezing exactly as fit would
        callback.set_model(model)
        callback.on_train_begin()
        callback.on_epoch_begin(0)
    model.train_on_batch(x, y)  # trace / compile outside the timing
    return lambda: model.train_on_batch(x, y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    kinds = ["trainable", "frozen", "lr_mult_0"]
    steps = {k: configure(k, args.batch) for k in kinds}
    times = {k: [] for k in kinds}
    rng = np.random.default_rng(1)
    for _ in range(args.rounds):
        for k in rng.permutation(kinds):
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[k]()
            times[k].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["trainable"])
    print(f"backend={keras.backend.backend()} batch={args.batch} rounds={args.rounds}")
    print(f"{'configuration':<12} {'median ms':>10} {'ratio':>7}  paired-ratio range")
    for k in kinds:
        ratios = [a / b for a, b in zip(times[k], times["trainable"])]
        print(f"{k:<12} {1e3 * statistics.median(times[k]):>10.2f} {statistics.median(times[k]) / base:>7.2f}"
              f"  {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
