"""A training process for tests/test_crash_resume.py: trains, crashes, resumes.

    python _crash_worker.py '{"out": PREFIX, "backup_dir": DIR, "init": NPZ,
                              "hang_at": [EPOCH, BATCH] | null, "marker": PATH}'

Trains the model of `make_model` with the optimizer of `make_optimizer` on
`make_data`, with `keras.callbacks.BackupAndRestore(DIR)` first among the
callbacks. With ``hang_at`` it writes ``marker`` after that batch and then
hangs, so the test can kill it with SIGKILL in the middle of an epoch. At the
end it writes PREFIX.npz (model weights, then optimizer variables) and
PREFIX.json (what it saw: the epochs it ran, the step it started at, the
multipliers).

Importing this module has no side effects: the test builds the same model,
optimizer and data from it for the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

EPOCHS = 4
BATCH_SIZE = 16
ROWS = 96  # 6 steps per epoch


def make_data():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(ROWS, 6)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(6, 3))).astype("float32")
    return x, y


def make_model():
    import keras

    backbone = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="pre1"),
         keras.layers.LayerNormalization(name="norm"),
         keras.layers.Dense(8, activation="tanh", name="pre2")],
        name="backbone",
    )
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3, name="head")(backbone(inputs))
    return keras.Model(inputs, outputs, name="net")


def make_optimizer(model):
    """Nadam (whose step-product state is easily lost), a schedule, weight decay,
    and a rule of every kind that survives a restart."""
    import keras

    import layerlr

    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=5, decay_rate=0.7)
    return layerlr.LayerwiseOptimizer(
        keras.optimizers.Nadam(schedule, weight_decay=0.05),
        lr_mult=[(model.get_layer("backbone"), 0.1), ("head/kernel", 3.0)],
        decay_mult=[(keras.layers.LayerNormalization, 0.0), ("*bias", 0.0)],
    )


def expected_multipliers():
    """By hand, from the rules above."""
    return {
        "pre1/kernel": [0.1, 1.0], "pre1/bias": [0.1, 0.0],
        "norm/gamma": [0.1, 0.0], "norm/beta": [0.1, 0.0],
        "pre2/kernel": [0.1, 1.0], "pre2/bias": [0.1, 0.0],
        "head/kernel": [3.0, 1.0], "head/bias": [1.0, 0.0],
    }


def compiled_model(init_path):

    model = make_model()
    model.set_weights(list(np.load(init_path).values()))
    model.compile(optimizer=make_optimizer(model), loss="mse")
    return model


def multipliers_of(optimizer):
    # Paths of a nested block carry the outer model's name: compare by the tail.
    return {"/".join(path.split("/")[-2:]): [m.lr_mult, m.decay_mult]
            for path, m in optimizer.multipliers.items()}


def state_arrays(model):
    return [np.asarray(w) for w in model.get_weights()] + [
        np.asarray(v.numpy()) for v in model.optimizer.variables]


def _callbacks(job, facts):
    import keras

    class Watch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            # After BackupAndRestore restored the weights and optimizer state.
            facts["start_iterations"] = int(self.model.optimizer.iterations)

        def on_epoch_begin(self, epoch, logs=None):
            facts["epochs"].append(epoch)
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if job.get("hang_at") == [self.epoch, batch]:
                with open(job["marker"] + ".tmp", "w") as f:
                    f.write(json.dumps({"iterations": int(self.model.optimizer.iterations)}))
                os.replace(job["marker"] + ".tmp", job["marker"])
                while True:  # until the test kills us
                    time.sleep(1)

    return [keras.callbacks.BackupAndRestore(job["backup_dir"]), Watch()]


def main(job):
    model = compiled_model(job["init"])
    x, y = make_data()
    facts = {"epochs": []}
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False, verbose=0,
              callbacks=_callbacks(job, facts))
    facts["multipliers"] = multipliers_of(model.optimizer)
    facts["iterations"] = int(model.optimizer.iterations)
    np.savez(job["out"] + ".npz", *state_arrays(model))
    with open(job["out"] + ".json", "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
