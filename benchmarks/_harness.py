"""One training step per backend, the same code for every contender.

The steps mirror Keras' own ``train_step`` on each backend (forward, loss,
gradients of the trainable variables, optimizer apply), compiled the way
``model.fit`` compiles them: ``tf.function`` (optionally ``jit_compile``),
``jax.jit`` with the state donated, eager torch. ``Runner`` is the only
backend-specific object the worker touches.

Synchronisation: every timed call returns only when its result is on the host
(TF ``.numpy()``, JAX ``block_until_ready``, torch ``cuda.synchronize`` when on
GPU), so the timings stay honest on asynchronous devices.
"""

from __future__ import annotations

import gc
import time

import keras
import numpy as np

BACKEND = keras.backend.backend()
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class Runner:
    """Trains ``spec.model`` with one contender; all runners share the model."""

    def __init__(self, spec, contender, jit_compile: bool):
        self.spec = spec
        self.contender = contender
        self.jit_compile = jit_compile
        self.model = spec.model
        self.tvars = list(self.model.trainable_variables)
        self.x = [keras.ops.convert_to_tensor(b) for b in spec.x]
        self.y = [keras.ops.convert_to_tensor(b) for b in spec.y]

    # The subclasses implement these.
    def new_full_step(self):  # -> callable(batch_index) -> python float loss
        raise NotImplementedError

    def gradients(self):  # -> gradients at the current weights, batch 0
        raise NotImplementedError

    def new_opt_step(self, grads):  # -> callable() applying these fixed gradients
        raise NotImplementedError

    def reset(self, initial_weights):
        self.model.set_weights(initial_weights)

    def weights(self) -> list[np.ndarray]:
        return [np.array(keras.ops.convert_to_numpy(v.value)) for v in self.tvars]

    def first_call(self, factory, *args) -> tuple[float, object]:
        """Seconds from a fresh function to its first result (trace + compile + run)."""
        # Every contender starts with the same garbage collector state: the
        # process holds every earlier compiled step, and a full collection
        # falling inside one contender's trace is not that contender's cost.
        gc.collect()
        start = time.perf_counter()
        fn = factory()
        fn(*args)
        return time.perf_counter() - start, fn


class TFRunner(Runner):
    def new_full_step(self):
        import tensorflow as tf

        model, tvars, contender = self.model, self.tvars, self.contender

        @tf.function(jit_compile=self.jit_compile)
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = LOSS(y, model(x, training=True))
            grads = tape.gradient(loss, tvars)
            contender.apply(grads, tvars)
            # Also read back an updated value: on GPU the loss alone can be
            # ready before the optimizer's kernels have run.
            return loss, tf.reshape(tvars[-1], [-1])[0]

        return lambda i: float(step(self.x[i], self.y[i])[0].numpy())

    def gradients(self):
        import tensorflow as tf

        # Eagerly: one call does not need a compile (the slowest thing here).
        with tf.GradientTape() as tape:
            loss = LOSS(self.y[0], self.model(self.x[0], training=True))
        return tape.gradient(loss, self.tvars)

    def new_opt_step(self, grads):
        import tensorflow as tf

        tvars, contender = self.tvars, self.contender

        @tf.function(jit_compile=self.jit_compile)
        def step(grads):
            contender.apply(grads, tvars)
            # Read back an updated value so the call cannot return early on GPU.
            return tf.reshape(tvars[-1], [-1])[0]

        return lambda: float(step(grads).numpy())


class JaxRunner(Runner):
    """Stateless: each runner carries its own copy of the values (donated)."""

    def __init__(self, spec, contender, jit_compile):
        super().__init__(spec, contender, jit_compile)
        self.opt_vars = list(contender.variables)
        self.state = None

    def reset(self, initial_weights):
        import jax.numpy as jnp

        # `initial_weights` is `model.get_weights()`: in `model.weights` order.
        value = {id(v): w for v, w in zip(self.model.weights, initial_weights)}
        self.state = (
            [jnp.array(value[id(v)]) for v in self.tvars],
            [jnp.array(value[id(v)]) for v in self.model.non_trainable_variables],
            [jnp.array(v.value) for v in self.opt_vars],
        )

    def weights(self):
        return [np.array(w) for w in self.state[0]]

    def _stateless_apply(self, opt_values, grads, train_values):
        # What BaseOptimizer.stateless_apply does, over all the contender's
        # optimizers at once (the split-list contender has several).
        mapping = list(zip(self.tvars, train_values)) + list(zip(self.opt_vars, opt_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.contender.apply(grads, self.tvars)
        return (
            [scope.get_current_value(v) for v in self.tvars],
            [scope.get_current_value(v) for v in self.opt_vars],
        )

    def _loss_and_grads(self, tv, ntv, x, y):
        import jax

        def compute(tv):
            pred, ntv2 = self.model.stateless_call(tv, ntv, x, training=True)
            return LOSS(y, pred), ntv2

        return jax.value_and_grad(compute, has_aux=True)(tv)

    def new_full_step(self):
        import jax

        def step(tv, ntv, ov, x, y):
            (loss, ntv), grads = self._loss_and_grads(tv, ntv, x, y)
            tv, ov = self._stateless_apply(ov, grads, tv)
            return (tv, ntv, ov), loss  # outputs in the donated inputs' order

        jitted = jax.jit(step, donate_argnums=(0, 1, 2))

        def run(i):
            self.state, loss = jitted(*self.state, self.x[i], self.y[i])
            return float(loss)  # blocks until the step's outputs exist

        return run

    def gradients(self):
        tv, ntv, _ = self.state
        # Op by op, not jitted: one call does not need a whole-graph compile.
        _, grads = self._loss_and_grads(tv, ntv, self.x[0], self.y[0])
        return grads

    def new_opt_step(self, grads):
        import jax

        # grads go in as an argument, not a closure: no baked-in constants.
        # Outputs in the order of the donated inputs: JAX pairs donated buffers
        # with outputs of the same shape in order, and a crossed pairing (an
        # Adam moment aliased to its weight) costs copies of every large array.
        def step(tv, ov, grads):
            return self._stateless_apply(ov, grads, tv)

        jitted = jax.jit(step, donate_argnums=(0, 1))

        def run():
            tv, ntv, ov = self.state
            tv, ov = jitted(tv, ov, grads)
            jax.block_until_ready(tv[-1])
            self.state = (tv, ntv, ov)

        return run



class TorchRunner(Runner):
    def _sync(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _loss_and_grads(self, i):
        self.model.zero_grad()
        loss = LOSS(self.y[i], self.model(self.x[i], training=True))
        loss.backward()
        return loss, [v.value.grad for v in self.tvars]

    def new_full_step(self):
        import torch

        def run(i):
            loss, grads = self._loss_and_grads(i)
            with torch.no_grad():
                self.contender.apply(grads, self.tvars)
            self._sync()
            return float(loss.detach())

        return run

    def gradients(self):
        _, grads = self._loss_and_grads(0)
        grads = [g.detach().clone() for g in grads]
        self.model.zero_grad()
        return grads

    def new_opt_step(self, grads):
        import torch

        def run():
            with torch.no_grad():
                self.contender.apply(grads, self.tvars)
            self._sync()

        return run


RUNNERS = {"tensorflow": TFRunner, "jax": JaxRunner, "torch": TorchRunner}


def runner(spec, contender, jit_compile: bool) -> Runner:
    if BACKEND not in RUNNERS:
        raise ValueError(
            f"No benchmark harness for the {BACKEND!r} backend; set KERAS_BACKEND "
            f"to one of {sorted(RUNNERS)}."
        )
    return RUNNERS[BACKEND](spec, contender, jit_compile)


def devices() -> list[str]:
    """The accelerator the backend computes on (CPU when none is visible)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return [d.name for d in gpus] or ["CPU"]
    if BACKEND == "jax":
        import jax

        return [f"{d.platform}:{getattr(d, 'device_kind', '')}" for d in jax.devices()]
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return ["CPU"]
