"""Torch backend: optimizer step of LayerwiseOptimizer vs the plain fused optimizer.

On torch, Keras runs nine built-in optimizers as fused `torch._foreach` updates
with one learning rate. LayerwiseOptimizer keeps that path and runs the fused
update once per multiplier group. This benchmark measures what that costs with
50 groups (layer-wise decay over 50 Dense layers, AdamW with weight decay):
the time of one `optimizer.apply(grads)` call, both optimizers interleaved in
one process (random order each round, same shapes, fixed gradients), medians
over rounds. It prints the ratio and PASS/FAIL against the 1.10x target.

Run:  python benchmarks/torch_fused_groups.py [--width 256 32] [--threads 1]

Two sizes by default: Dense(256) layers (3.3M parameters), where the step is
memory-bound, and Dense(32) layers (0.1M), where it is bound by the fixed
per-call cost of Keras' fused step, paid once per group. Not a test: timings
depend on the machine and its load (on a shared machine, --threads 1 gives
much steadier numbers). For context it also times the same optimizer without
the fused path (a subclass, which Keras runs through the per-variable
`update_step` loop).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import layerlr  # noqa: E402

try:
    import torch
except ImportError:  # reported by main(): the benchmark needs the torch backend
    torch = None

TARGET = 1.10


class UnfusedAdamW(keras.optimizers.AdamW):
    """A subclass: Keras' torch backend only fuses the exact built-in classes."""


def make_variables(layers: int, width: int):
    model = keras.Sequential(
        [keras.Input((width,))]
        + [keras.layers.Dense(width, name=f"layer_{i:02d}") for i in range(layers)]
    )
    return model, list(model.trainable_variables)


def _layerwise(layers: int, kwargs):
    # Layer-wise decay: layer i gets 0.9 ** (layers - 1 - i), one group per layer.
    rules = [(f"layer_{i:02d}", 0.9 ** (layers - 1 - i)) for i in range(layers)]
    return layerlr.LayerwiseOptimizer(keras.optimizers.AdamW(**kwargs), lr_mult=rules)


def contenders(layers: int, width: int, kwargs):
    built = {}
    for name, make in [
        ("plain fused", lambda: keras.optimizers.AdamW(**kwargs)),
        ("layerwise, 50 groups", lambda: _layerwise(layers, kwargs)),
        ("unfused per-variable (context)", lambda: UnfusedAdamW(**kwargs)),
    ]:
        _, variables = make_variables(layers, width)
        opt = make()
        opt.build(variables)
        built[name] = (opt, variables)
    return built


def check_setup(built, layers, width, kwargs):
    """Fails loudly if the comparison is not the one this benchmark claims.

    Returns the number of variables in each fused call of one wrapped step,
    counted on a separate (untimed) copy instrumented before it was built.
    """
    plain, _ = built["plain fused"]
    wrapper, _ = built["layerwise, 50 groups"]
    for opt in (plain, wrapper.inner_optimizer):
        if not type(opt).__module__.startswith("keras.src.backend.torch.optimizers."):
            sys.exit(f"{type(opt)} is not Keras' fused torch optimizer.")
    groups = {(m.lr_mult, m.decay_mult) for m in wrapper.multipliers.values()}
    if len(groups) != layers:
        sys.exit(f"expected {layers} multiplier groups, got {len(groups)}")

    _, variables = make_variables(layers, width)
    probe = _layerwise(layers, kwargs)
    inner = probe.inner_optimizer
    calls = []
    fused = inner._parallel_update_step

    def counting(grads, group_vars, learning_rate):
        calls.append(len(group_vars))
        return fused(grads, group_vars, learning_rate)

    inner._parallel_update_step = counting  # before build: layerlr wraps it
    probe.build(variables)
    probe.apply([torch.zeros_like(v.value) for v in variables])
    if len(calls) != layers:
        sys.exit(f"expected {layers} fused calls per step, got {len(calls)}")
    return calls


def time_steps(opt, grads, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.apply(grads)
    return (time.perf_counter() - start) / steps


def run_config(layers, width, args) -> bool:
    keras.utils.set_random_seed(args.seed)
    kwargs = dict(learning_rate=1e-4, weight_decay=0.01)
    built = contenders(layers, width, kwargs)
    calls = check_setup(built, layers, width, kwargs)

    rng = np.random.default_rng(args.seed)
    _, variables = built["plain fused"]
    grads = [torch.from_numpy(rng.normal(size=tuple(v.shape)).astype("float32")) for v in variables]
    params = sum(int(np.prod(v.shape)) for v in variables)

    for opt, _ in built.values():  # warm-up
        time_steps(opt, grads, 3)

    times = {name: [] for name in built}
    order = list(built)
    shuffle = random.Random(args.seed)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            times[name].append(time_steps(built[name][0], grads, args.steps))

    plain = times["plain fused"]
    ours = times["layerwise, 50 groups"]
    paired = sorted(o / p for o, p in zip(ours, plain))
    ratio = statistics.median(ours) / statistics.median(plain)

    print(f"\nAdamW(weight_decay=0.01), {layers} Dense({width}) layers: "
          f"{len(variables)} variables, {params / 1e6:.2f}M parameters")
    print(f"layerwise: {len(calls)} fused calls per step (variables per call: {sorted(set(calls))})")
    for name, values in times.items():
        q = np.percentile(values, [25, 75]) * 1e3
        print(f"  {name:32s} median {statistics.median(values) * 1e3:8.3f} ms "
              f"(IQR {q[0]:.3f}-{q[1]:.3f})")
    print(f"ratio layerwise / plain fused: {ratio:.3f} "
          f"(paired per round: median {statistics.median(paired):.3f}, "
          f"range {paired[0]:.3f}-{paired[-1]:.3f})")
    passed = ratio <= TARGET
    print(f"{'PASS' if passed else 'FAIL'}: target <= {TARGET:.2f}x")
    return passed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--width", type=int, nargs="+", default=[256, 32],
                        help="Dense widths to run (each a separate comparison)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "torch":
        sys.exit("This benchmark is for the torch backend: run it with KERAS_BACKEND=torch.")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, keras {keras.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds x {args.steps} steps, interleaved in random order; "
          "optimizer.apply only (fixed gradients)")
    results = [run_config(args.layers, width, args) for width in args.width]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
