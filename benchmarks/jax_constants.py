"""JAX: what 54 distinct constant multipliers cost XLA:CPU to compile, and the fix.

Three parts, all interleaved (random order each round), medians and paired
ratios to plain:

``--part xla``: plain JAX, no Keras. An Adam step over the 54 variable shapes of
the `tfm_pv` model, written as Keras' ``Adam.update_step`` computes it, in six
ways: ``plain`` (one shared rate), ``folded`` (rate x a Python constant per
variable: what layerlr traced before), ``vector`` (all 54 step sizes in one
vector op over a constant vector of multipliers, each update reading its
element), ``barrier`` (the constants behind ``jax.lax.optimization_barrier``),
``cond`` (the constants returned by a ``jax.lax.cond`` whose predicate XLA
cannot decide: what layerlr does now, `layerlr.core._keras.opaque_constants`)
and ``cond_kept`` (the same, with the conditional's outputs read once more by
the last update so they stay alive to the end of the step, as layerlr does
since: `layerlr.core._keras.hold_until_updated`). Without that read XLA:CPU
puts each step size into the four bytes of the multiplier the previous one
has just read, and its thunk executor then orders the 54 step-size kernels
one after another (a false dependency through that memory), which costs on
two or more threads. Reports ``.lower().compile()`` time, the compiled
step's time (state donated) and the largest difference from ``folded``.

``--part keras``: the benchmark harness' full JAX training step of `tfm_pv`
(forward, gradients, optimizer), fresh ``jax.jit`` each time, split into trace
(``.lower()``) and XLA compile, for plain Adam, layerlr, layerlr without the
read at the end (``layerlr_unheld``), layerlr with the multipliers folded as
constants (the code before issue 13) and MultiOptimizer.

``--part step``: the harness' optimizer-only step (fixed gradients, state
donated), compiled once, timed in interleaved rounds: plain, layerlr,
layerlr without the read at the end (``layerlr_unheld``), layerlr with the
constants folded and MultiOptimizer.

Run:  python benchmarks/jax_constants.py [--part xla keras step] [--rounds 5]

Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(1000, 64), (32, 64)] + [
    (64,), (64,), (64, 4, 16), (64, 4, 16), (64, 4, 16), (4, 16, 64), (64,), (64,), (64, 256), (256,),
    (256, 64), (64,)] * 4 + [(64,), (64,), (64, 10), (10,)]
MULTS = [round(0.99 ** i, 6) for i in range(len(SHAPES))]  # as benchmarks._models' tfm_pv
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7


def _median_ratio(xs, ys):
    return statistics.median(x / y for x, y in zip(xs, ys))


def xla_part(rounds: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    def adam(g, v, m, u, lr, iterations, alpha=None):
        # keras.optimizers.Adam.update_step, operation for operation.
        local_step = (iterations + 1).astype(jnp.float32)
        beta_1_power = jnp.power(jnp.float32(BETA_1), local_step)
        beta_2_power = jnp.power(jnp.float32(BETA_2), local_step)
        if alpha is None:
            alpha = lr * jnp.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        m = m + (g - m) * (1 - BETA_1)
        u = u + (jnp.square(g) - u) * (1 - BETA_2)
        return v - (m * alpha) / (jnp.sqrt(u) + EPSILON), m, u

    def step(kind):
        def f(vs, ms, us, grads, lr, iterations):
            alphas = [None] * len(SHAPES)
            consts = tuple(jnp.float32(c) for c in MULTS)
            if kind == "plain":
                rates = [lr] * len(SHAPES)
            elif kind == "folded":
                rates = [lr * c for c in MULTS]
            elif kind == "barrier":
                rates = [lr * c for c in jax.lax.optimization_barrier(consts)]
            elif kind in ("cond", "cond_kept"):
                zeros = tuple(jnp.zeros((), jnp.float32) for _ in consts)
                kept = jax.lax.cond(lr == lr, lambda: consts, lambda: zeros)  # noqa: PLR0124
                rates = [lr * c for c in kept]
            elif kind == "vector":
                local_step = (iterations + 1).astype(jnp.float32)
                beta_1_power = jnp.power(jnp.float32(BETA_1), local_step)
                beta_2_power = jnp.power(jnp.float32(BETA_2), local_step)
                vector = (lr * jnp.asarray(MULTS, jnp.float32)) * jnp.sqrt(1 - beta_2_power) / (1 - beta_1_power)
                rates = [lr] * len(SHAPES)
                alphas = [vector[i] for i in range(len(SHAPES))]
            out = [adam(*args) for args in zip(grads, vs, ms, us, rates, [iterations] * len(SHAPES), alphas)]
            if kind == "cond_kept":  # x * (1 + 0 * finite) is x exactly
                out[-1] = (out[-1][0] * (1 + 0 * sum(kept)),) + out[-1][1:]
            return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]
        return f

    rng = np.random.default_rng(0)
    arrays = lambda: [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in SHAPES]
    grads, values, moments = arrays(), arrays(), arrays()
    velocities = [jnp.abs(x) for x in arrays()]
    lr, iterations = jnp.float32(1e-3), jnp.int32(3)
    kinds = ["plain", "folded", "vector", "barrier", "cond", "cond_kept"]
    compile_s = {k: [] for k in kinds}
    compiled, state, result = {}, {}, {}
    for _ in range(rounds):
        for kind in random.sample(kinds, len(kinds)):
            start = time.perf_counter()
            compiled[kind] = jax.jit(step(kind), donate_argnums=(0, 1, 2)).lower(
                values, moments, velocities, grads, lr, iterations).compile()
            compile_s[kind].append(time.perf_counter() - start)
    for kind in kinds:
        copies = [[jnp.array(x) for x in xs] for xs in (values, moments, velocities)]
        result[kind] = [np.asarray(x) for x in compiled[kind](*copies, grads, lr, iterations)[0]]
        state[kind] = [[jnp.array(x) for x in xs] for xs in (values, moments, velocities)]
    step_s = {k: [] for k in kinds}
    for _ in range(10 * rounds):
        for kind in random.sample(kinds, len(kinds)):
            times = []
            for _ in range(5):
                start = time.perf_counter()
                state[kind] = list(compiled[kind](*state[kind], grads, lr, iterations))
                jax.block_until_ready(state[kind][0][-1])
                times.append(time.perf_counter() - start)
            step_s[kind].append(statistics.median(times))
    print(f"plain JAX, Adam over {len(SHAPES)} variables, {rounds} compile rounds:")
    for kind in kinds:
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(result[kind], result["folded"]))
        print(f"  {kind:9s} compile {statistics.median(compile_s[kind]):.3f} s"
              f" ({_median_ratio(compile_s[kind], compile_s['plain']):.2f}x plain)"
              f"   step {statistics.median(step_s[kind]) * 1e3:.3f} ms"
              f" ({_median_ratio(step_s[kind], step_s['plain']):.2f}x plain)"
              f"   max |w - w_folded| {diff:.1e}")


# layerlr with one of its run-time-constant pieces switched off (the code before).
VARIANTS = {"layerlr_unheld": {"hold_until_updated": lambda *a: None},
            "layerlr_folded": {"opaque_constants": lambda *a: None}}


def _keras_runners(kinds):
    from benchmarks import _contenders, _harness, _models

    spec = _models.MODELS["tfm_pv"](2)
    variables = spec.model.trainable_variables
    initial = spec.model.get_weights()
    runners = {}
    for kind in kinds:
        contender = _contenders.CONTENDERS[kind.split("_")[0]](spec)
        contender.build(variables)
        runners[kind] = _harness.runner(spec, contender, True)
        runners[kind].reset(initial)
    return runners


@contextlib.contextmanager
def _variant(kind):
    from layerlr.core import _keras as _backend

    patches = VARIANTS.get(kind, {})
    saved = {name: getattr(_backend, name) for name in patches}
    for name, value in patches.items():
        setattr(_backend, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_backend, name, value)


def keras_part(rounds: int) -> None:
    import jax

    kinds = ["plain", "layerlr", "layerlr_unheld", "layerlr_folded", "multi"]
    runners = _keras_runners(kinds)

    def first_call(kind):
        run = runners[kind]

        def step(tv, ntv, ov, x, y):  # the harness' full step
            (loss, ntv), grads = run._loss_and_grads(tv, ntv, x, y)
            tv, ov = run._stateless_apply(ov, grads, tv)
            return (tv, ntv, ov), loss

        with _variant(kind):
            start = time.perf_counter()
            lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*run.state, run.x[0], run.y[0])
            traced = time.perf_counter()
            lowered.compile()
        return traced - start, time.perf_counter() - traced

    first_call("plain")  # one-time costs
    trace = {k: [] for k in kinds}
    compile_s = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind in random.sample(kinds, len(kinds)):
            a, b = first_call(kind)
            trace[kind].append(a)
            compile_s[kind].append(b)
    total = {k: [a + b for a, b in zip(trace[k], compile_s[k])] for k in kinds}
    print(f"Keras, tfm_pv full training step (54 distinct multipliers), {rounds} rounds:")
    for kind in kinds:
        print(f"  {kind:15s} trace {statistics.median(trace[kind]):.2f} s"
              f"  compile {statistics.median(compile_s[kind]):.2f} s"
              f" ({_median_ratio(compile_s[kind], compile_s['plain']):.2f}x plain)"
              f"  together {statistics.median(total[kind]):.2f} s"
              f" ({_median_ratio(total[kind], total['plain']):.2f}x plain,"
              f" {_median_ratio(total[kind], total['multi']):.2f}x MultiOptimizer)")


def step_part(rounds: int) -> None:
    kinds = ["plain", "layerlr", "layerlr_unheld", "layerlr_folded", "multi"]
    runners = _keras_runners(kinds)
    grads = runners["plain"].gradients()
    steps = {}
    for kind, run in runners.items():
        steps[kind] = run.new_opt_step(grads)  # the harness' optimizer-only step
        with _variant(kind):
            steps[kind]()  # traced and compiled here, with the variant's patches
    step_s = {k: [] for k in kinds}
    for _ in range(10 * rounds):
        for kind in random.sample(kinds, len(kinds)):
            times = []
            for _ in range(5):
                start = time.perf_counter()
                steps[kind]()
                times.append(time.perf_counter() - start)
            step_s[kind].append(statistics.median(times))
    print(f"Keras, tfm_pv optimizer step (54 distinct multipliers), {10 * rounds} rounds:")
    for kind in kinds:
        print(f"  {kind:15s} {statistics.median(step_s[kind]) * 1e3:.3f} ms"
              f" ({_median_ratio(step_s[kind], step_s['plain']):.2f}x plain)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", nargs="+", choices=["xla", "keras", "step"], default=["xla", "keras", "step"])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f}")
    if "xla" in args.part:
        xla_part(args.rounds)
    if "keras" in args.part:
        keras_part(args.rounds)
    if "step" in args.part:
        step_part(args.rounds)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
