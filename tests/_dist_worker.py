"""Subprocess side of the distribution and cross-backend tests.

Run as ``python tests/_dist_worker.py '<json job>'`` with KERAS_BACKEND (and,
per mode, XLA_FLAGS or TF_CONFIG) set by the test. Every mode trains the
`_scenarios` model from the initial weights in ``job["init"]`` and writes the
final weights to ``job["out"]`` (an .npz) plus facts about the run to
``job["out"] + ".json"``, which the test checks against a run in its own
process.

Device setup (logical TF devices, forced XLA host devices, TF_CONFIG) must
happen before the backend initializes, which is why these runs cannot share
the test process.
"""

from __future__ import annotations

import json
import os
import sys


def _two_cpu_mirrored_strategy():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices), devices


def _tf_mirrored(job):
    strategy, devices = _two_cpu_mirrored_strategy()
    return _train_under_tf_strategy(job, strategy, {"devices": devices})


def _tf_mirrored_late_start(job):
    """The late-start scenario of test_late_start.py (GradualUnfreezing) on 2 replicas."""
    strategy, devices = _two_cpu_mirrored_strategy()
    import layerlr
    import _scenarios as sc
    import test_late_start as late

    with strategy.scope():
        model = late.make_model()
        model.set_weights(sc.load_weights(job["init"]))
        backbone = model.get_layer("backbone")
        model.compile(optimizer=late.make_optimizer(job["optimizer"], "gradual", backbone=backbone), loss="mse")
    x, y = late.make_data()
    unfreeze = layerlr.GradualUnfreezing([model.get_layer("head"), backbone], every=late.FROZEN_EPOCHS)
    model.fit(x, y, batch_size=late.BATCH, epochs=late.EPOCHS, shuffle=False, verbose=0, callbacks=[unfreeze])
    return model.get_weights(), {"devices": devices, "replicas": strategy.num_replicas_in_sync}


def _tf_multi_worker(job):
    import numpy as np
    import tensorflow as tf

    # Must exist before any other TF op: it starts this worker's gRPC server.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras

    import _scenarios as sc
    from helpers import data

    task = json.loads(os.environ["TF_CONFIG"])["task"]
    # Keras 3.15's model.fit cannot run under MultiWorkerMirroredStrategy for
    # any optimizer (keras-team/keras#20585: `strategy.reduce` on nested
    # batches and scalar metrics); the custom loop below is the working path.
    with strategy.scope():
        model = sc.compiled_model(sc.load_weights(job["init"]), name=job["optimizer"])
        optimizer = model.optimizer
        # Layer-type rules need the model's layers; fit would pass them itself.
        optimizer.build(model)
    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(sc.BATCH_SIZE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = strategy.experimental_distribute_dataset(dataset.with_options(options))

    @tf.function
    def train_step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                per_example = keras.losses.mean_squared_error(yb, model(xb, training=True))
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=sc.BATCH_SIZE)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce("SUM", strategy.run(replica_step, args=batch), axis=None)

    losses = []
    for _ in range(job["epochs"]):
        for batch in dataset:
            losses.append(float(train_step(batch)))
    return [np.asarray(w) for w in model.get_weights()], {
        "task": task,
        "replicas": strategy.num_replicas_in_sync,
        "iterations": int(optimizer.iterations.numpy()),
        "losses": losses,
    }


def _train_under_tf_strategy(job, strategy, facts):
    import _scenarios as sc
    from helpers import data

    x, y = data()
    # The optimizer captures the strategy when it is created: build everything
    # inside the scope.
    with strategy.scope():
        model = sc.compiled_model(sc.load_weights(job["init"]), name=job["optimizer"])
    sc.fit(model, x, y, epochs=job["epochs"])
    facts.update(
        replicas=strategy.num_replicas_in_sync,
        iterations=int(model.optimizer.iterations.numpy()),
    )
    return model.get_weights(), facts


def _jax_distributed(job):
    import jax
    import keras

    import _scenarios as sc
    from helpers import data

    devices = jax.devices()
    if job["mode"] == "jax_data_parallel":
        distribution = keras.distribution.DataParallel(devices=devices)
    else:
        mesh = keras.distribution.DeviceMesh((1, len(devices)), ["batch", "model"], devices)
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map["d1/kernel"] = (None, "model")
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    keras.distribution.set_distribution(distribution)
    # Model and optimizer after set_distribution, so their variables get layouts.
    model = sc.compiled_model(sc.load_weights(job["init"]), name=job["optimizer"])
    x, y = data()
    sc.fit(model, x, y, epochs=job["epochs"])

    def shards(variable):
        sharding = variable.value.sharding
        return {
            "devices": len(sharding.device_set),
            "shard_shape": list(sharding.shard_shape(variable.value.shape)),
            "shape": list(variable.value.shape),
        }

    kernel = next(v for v in model.trainable_variables if v.path.endswith("d1/kernel"))
    opt = model.optimizer
    slots = [
        v for v in opt.variables
        if v.shape == kernel.shape and "d1_kernel" in v.path.replace("/", "_")
    ]
    return model.get_weights(), {
        "devices": len(devices),
        "d1_kernel": shards(kernel),
        "d1_kernel_slots": [shards(v) for v in slots],
        "iterations": int(opt.iterations.numpy()),
    }


def _resume(job):
    import keras

    import _scenarios as sc
    from helpers import data

    x, y = data()
    model = keras.saving.load_model(job["model"])
    opt = model.optimizer
    # A model compiled on JAX saves jit_compile=True, which on torch means
    # torch.compile: a minute of tracing on a CI core for 4 small steps.
    # Compilation is tested in test_torch_backend; here eager is the same math.
    if keras.backend.backend() == "torch":
        model.jit_compile = False
    facts = {
        "wrapper": type(opt).__name__,
        "inner": type(opt.inner_optimizer).__name__,
        "iterations_loaded": int(keras.ops.convert_to_numpy(opt.iterations)),
        "multipliers": {
            p: [m.lr_mult, m.decay_mult] for p, m in opt.multipliers.items()
        },
    }
    sc.fit(model, x, y, epochs=1)
    facts["iterations_after"] = int(keras.ops.convert_to_numpy(opt.iterations))
    return model.get_weights(), facts


MODES = {
    "tf_mirrored": _tf_mirrored,
    "tf_mirrored_late_start": _tf_mirrored_late_start,
    "tf_multi_worker": _tf_multi_worker,
    "jax_data_parallel": _jax_distributed,
    "jax_model_parallel": _jax_distributed,
    "resume": _resume,
}


def main(argv):
    job = json.loads(argv[1])
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Nothing here may touch a backend before the mode has set up its devices.
    weights, facts = MODES[job["mode"]](job)
    import keras

    import _scenarios as sc

    facts["backend"] = keras.backend.backend()
    sc.save_weights(job["out"], weights)
    with open(job["out"] + ".json", "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(sys.argv)
