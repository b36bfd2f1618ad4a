"""Multi-worker training with per-layer learning rates (TensorFlow backend).

Each worker runs this same script with its own ``TF_CONFIG``; the optimizer,
its per-layer multipliers and its state are mirrored on every worker, and the
gradients are all-reduced every step, so the result equals training on one
machine with the global batch.

Try it on one machine (two local worker processes on free ports):

    python examples/multi_worker.py

On a real cluster, start one copy per machine with that machine's TF_CONFIG:

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' \\
        python examples/multi_worker.py --worker

Keras 3 `model.fit` does not run under MultiWorkerMirroredStrategy (for any
optimizer: keras-team/keras#20585), so the training step is a short custom
loop; `tf.distribute.MirroredStrategy` (one machine, several devices) works
with `model.fit` directly.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

GLOBAL_BATCH = 64
EPOCHS = 3


def train(model_path: str | None) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    # Create the strategy first: it starts this worker's server.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    import numpy as np

    import layerlr

    rng = np.random.default_rng(0)  # same data on every worker; tf.data shards it
    x = rng.normal(size=(1024, 16)).astype("float32")
    y = (x[:, :4].sum(axis=1) > 0).astype("int32")

    with strategy.scope():
        keras.utils.set_random_seed(0)  # same initial weights on every worker
        backbone = keras.Sequential(
            [keras.layers.Dense(64, activation="relu", name="b1"),
             keras.layers.Dense(64, activation="relu", name="b2")],
            name="backbone",
        )
        model = keras.Sequential(
            [keras.Input((16,)), backbone, keras.layers.Dense(2, name="head")],
            name="classifier",
        )
        optimizer = layerlr.LayerwiseOptimizer(
            keras.optimizers.AdamW(1e-3, weight_decay=0.01),
            lr_mult={backbone: 0.1},  # the backbone trains 10x slower
            decay_mult={"*bias": 0.0},  # no weight decay on biases
        )
        loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None
        )
        # compile() attaches the optimizer, so model.save() stores it, its
        # state and the resolved multipliers. Build it inside the scope, from
        # the model (layer selectors need the model's layers).
        model.compile(optimizer=optimizer, loss=loss_fn)
        optimizer.build(model)

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = strategy.experimental_distribute_dataset(dataset.with_options(options))

    @tf.function
    def train_step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                per_example = loss_fn(yb, model(xb, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce("SUM", strategy.run(replica_step, args=batch), axis=None)

    task = json.loads(os.environ["TF_CONFIG"])["task"]
    is_chief = task["index"] == 0
    for epoch in range(EPOCHS):
        losses = [float(train_step(batch)) for batch in dataset]
        if is_chief:
            print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}", flush=True)

    if is_chief:
        for path, m in optimizer.multipliers.items():
            print(f"  {path:30s} lr x{m.lr_mult:<4} decay x{m.decay_mult}")
        if model_path:
            model.save(model_path)  # the optimizer and its multipliers come along
            print(f"saved {model_path}")


def launch_local_workers(n: int, model_path: str | None, timeout: float) -> int:
    """Starts n workers on 127.0.0.1 (free ports) and waits for all of them."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for index in range(n):
            env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
                       TF_CONFIG=json.dumps({"cluster": cluster,
                                             "task": {"type": "worker", "index": index}}))
            args = [sys.executable, __file__, "--worker"]
            if model_path:
                args += ["--save", model_path]
            procs.append(subprocess.Popen(
                args, env=env, stdout=None if index == 0 else subprocess.DEVNULL
            ))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):  # one failed: the rest would hang
                return next(c for c in codes if c not in (None, 0))
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
        print(f"workers did not finish within {timeout} s", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true",
                        help="run as one worker of the cluster in TF_CONFIG")
    parser.add_argument("--workers", type=int, default=2,
                        help="local workers to start (without --worker)")
    parser.add_argument("--save", default=None, help="the chief saves the model here (.keras)")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    if args.worker:
        train(args.save)
    else:
        sys.exit(launch_local_workers(args.workers, args.save, args.timeout))
