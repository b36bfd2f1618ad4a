"""Measures every model x contender on ONE backend, in this process.

Run by ``benchmarks.run`` once per backend configuration (KERAS_BACKEND is fixed
per process); writes one JSON file. Not meant to be called by hand, but it can
be: ``KERAS_BACKEND=jax python -m benchmarks._worker --out /tmp/jax.json``.

Method (see docs/performance.md):
1. One model object and one set of initial weights per model; every contender
   trains that model through the same step code (``_harness``).
2. First-call time: fresh compiled step, trace + compile + one step; repeated
   ``--compile-rounds`` times, contenders in a new random order each round
   (after the first round only plain, layerlr and MultiOptimizer, which the
   compile targets compare: compiles are the slowest part of the run).
3. Weight check: in the first round every contender starts from the initial
   weights and a fresh optimizer and trains ``--check-steps`` steps on the same
   batches; the final weights are compared with the MultiOptimizer reference.
4. Timing: ``--rounds`` rounds; in each, every contender (random order) runs
   ``--steps`` full training steps and ``--opt-steps`` optimizer-only steps,
   each timed on its own. Ratios are paired per round (contender median /
   plain median in the same round), which cancels the machine's slow drifts.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _contenders, _harness, _models, _resolve_bench  # noqa: E402


def _median(xs):
    return statistics.median(xs) if xs else None


def _quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    pos = q * (len(xs) - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def paired(per_round_a, per_round_b) -> dict | None:
    """Median and spread of the per-round ratios a/b (rounds where both ran)."""
    ratios = [a / b for a, b in zip(per_round_a, per_round_b) if a is not None and b]
    if not ratios:
        return None
    return {
        "median": _median(ratios),
        "q25": _quantile(ratios, 0.25),
        "q75": _quantile(ratios, 0.75),
        "min": min(ratios),
        "max": max(ratios),
        "n": len(ratios),
    }


def _variable_bytes(variables) -> int:
    return int(sum(np.prod(v.shape, dtype=np.int64) * np.dtype(v.dtype).itemsize
                   for v in variables))


def _relative_error(weights, reference, initial) -> float:
    """Worst variable: max |w - w_ref| / max |w_ref - w_init| (how far off, in moves)."""
    worst = 0.0
    for w, r, i in zip(weights, reference, initial):
        moved = float(np.max(np.abs(r - i)))
        diff = float(np.max(np.abs(w - r)))
        if moved == 0.0:
            worst = max(worst, 0.0 if diff == 0.0 else float("inf"))
        else:
            worst = max(worst, diff / moved)
    return worst


CONTROL = "plain_aa"
COMPILE_TARGETS = ("plain", "layerlr", "multi")
AGREE = 1e-2  # relative error below which two trainings are the same training


def _seed(seed: int) -> None:
    # keras.utils.set_random_seed also imports TensorFlow whenever it is
    # installed (seconds, on every backend); Keras' default seeds come from
    # Python's `random`, so seeding that makes the initial weights repeatable.
    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)
    np.random.seed(seed)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(seed)


def bench_model(name, args, rng, warm_up: bool = True) -> dict:
    keras.utils.clear_session()
    _seed(args.seed)
    spec = _models.MODELS[name](steps=args.check_steps, tiny=args.tiny)
    variables = spec.model.trainable_variables
    initial = [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]
    all_initial = spec.model.get_weights()
    keys = [k for k in args.contenders if _contenders.CONTENDERS[k].available(spec)]
    contenders = {k: _contenders.CONTENDERS[k](spec) for k in keys}
    for c in contenders.values():
        c.build(variables)
    runners = {k: _harness.runner(spec, c, args.jit_compile) for k, c in contenders.items()}

    if warm_up:
        # A throwaway compile first, so no contender pays the process's one-time
        # costs (runtime start-up, kernel caches) in its first-call time.
        warm = _harness.runner(spec, _contenders.Plain(spec), args.jit_compile)
        warm.contender.build(variables)
        warm.reset(all_initial)
        warm.first_call(warm.new_full_step, 0)
        del warm

    first_call = {k: [] for k in keys}
    finals, full, opt = {}, {}, {}
    for r in range(args.compile_rounds):
        # Round 0 compiles everyone (and checks the weights); later rounds only
        # re-time the contenders the compile targets are about.
        order = keys[:] if r == 0 else [k for k in keys if k in COMPILE_TARGETS]
        rng.shuffle(order)
        for k in order:
            run = runners[k]
            if r == 0:
                run.reset(all_initial)
            seconds, fn = run.first_call(run.new_full_step, 0)
            first_call[k].append(seconds)
            full[k] = fn
            if r == 0:
                for i in range(1, args.check_steps):
                    fn(i)
                finals[k] = run.weights()
    # One set of gradients for every contender's optimizer-only step.
    grads = runners["plain"].gradients()
    opt_first_call = {}
    for k in keys:
        opt_first_call[k], opt[k] = runners[k].first_call(
            functools.partial(runners[k].new_opt_step, grads))
        for _ in range(2):
            full[k](0)
            opt[k]()

    timed = keys[:]
    if args.control:
        # Plain's own compiled steps in a second slot: any ratio it shows is noise.
        timed.append(CONTROL)
        full[CONTROL], opt[CONTROL] = full["plain"], opt["plain"]
    full_t = {k: [[] for _ in range(args.rounds)] for k in timed}
    opt_t = {k: [[] for _ in range(args.rounds)] for k in timed}
    gc.collect()
    gc.disable()  # a collection inside one contender's slot is noise, not cost
    try:
        for r in range(args.rounds):
            order = timed[:]
            rng.shuffle(order)
            for k in order:
                for _ in range(args.steps):
                    start = time.perf_counter()
                    full[k](0)
                    full_t[k][r].append(time.perf_counter() - start)
            rng.shuffle(order)
            for k in order:
                for _ in range(args.opt_steps):
                    start = time.perf_counter()
                    opt[k]()
                    opt_t[k][r].append(time.perf_counter() - start)
            gc.enable()
            gc.collect()
            gc.disable()
    finally:
        gc.enable()

    full_round = {k: [_median(x) for x in full_t[k]] for k in timed}
    opt_round = {k: [_median(x) for x in opt_t[k]] for k in timed}
    ref = finals.get(_contenders.REFERENCE)
    plain_bytes = _variable_bytes(contenders["plain"].variables) if "plain" in keys else None
    result = {
        "name": spec.name,
        "title": spec.title,
        "n_variables": len(variables),
        "n_groups": spec.n_groups,
        "n_params": int(spec.model.count_params()),
        "contenders": {},
        "pairs": {},
    }
    for k in keys:
        c = contenders[k]
        nbytes = _variable_bytes(c.variables)
        error = None
        if ref is not None and c.has_rates:
            error = _relative_error(finals[k], ref, initial)
        result["contenders"][k] = {
            "label": c.label,
            "note": c.note,
            "n_optimizers": c.n_optimizers,
            "full_step_ms": 1e3 * _median([t for ts in full_t[k] for t in ts]),
            "opt_step_ms": 1e3 * _median([t for ts in opt_t[k] for t in ts]),
            "first_call_s": _median(first_call[k]),
            "first_call_runs_s": first_call[k],
            "opt_step_first_call_s": opt_first_call[k],
            "full_step_ratio": paired(full_round[k], full_round.get("plain", [])),
            "opt_step_ratio": paired(opt_round[k], opt_round.get("plain", [])),
            "first_call_ratio": paired(first_call[k], first_call.get("plain", [])),
            "optimizer_bytes": nbytes,
            "optimizer_bytes_vs_plain": None if plain_bytes is None else nbytes - plain_bytes,
            "error_vs_reference": error,
            "agrees_with_reference": None if error is None else bool(error <= AGREE),
        }
    if CONTROL in timed:
        plain = result["contenders"]["plain"]
        result["contenders"][CONTROL] = {
            **plain,
            "label": "plain again (A/A control)",
            "note": "",
            "first_call_s": None,
            "first_call_runs_s": [],
            "opt_step_first_call_s": None,
            "first_call_ratio": None,
            "full_step_ms": 1e3 * _median([t for ts in full_t[CONTROL] for t in ts]),
            "opt_step_ms": 1e3 * _median([t for ts in opt_t[CONTROL] for t in ts]),
            "full_step_ratio": paired(full_round[CONTROL], full_round["plain"]),
            "opt_step_ratio": paired(opt_round[CONTROL], opt_round["plain"]),
        }
    if "layerlr" in keys and "multi" in keys:
        result["pairs"]["layerlr_vs_multi"] = {
            "full_step": paired(full_round["layerlr"], full_round["multi"]),
            "opt_step": paired(opt_round["layerlr"], opt_round["multi"]),
            "first_call": paired(first_call["layerlr"], first_call["multi"]),
        }
    if "layerlr" in keys and "torch_native" in keys:
        result["pairs"]["layerlr_vs_torch_native"] = {
            "full_step": paired(full_round["layerlr"], full_round["torch_native"]),
            "opt_step": paired(opt_round["layerlr"], opt_round["torch_native"]),
        }
    return result


def versions() -> dict:
    out = {"python": platform.python_version(), "keras": keras.__version__,
           "numpy": np.__version__}
    import layerlr

    out["layerlr"] = layerlr.__version__
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        out["tensorflow"] = tf.__version__
    elif backend == "jax":
        import jax
        import jaxlib

        out["jax"] = jax.__version__
        out["jaxlib"] = jaxlib.__version__
    elif backend == "torch":
        import torch

        out["torch"] = torch.__version__
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--jit-compile", action="store_true")
    p.add_argument("--models", nargs="+", default=list(_models.MODELS))
    p.add_argument("--contenders", nargs="+", default=list(_contenders.CONTENDERS))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--opt-steps", type=int, default=10)
    p.add_argument("--compile-rounds", type=int, default=2)
    p.add_argument("--check-steps", type=int, default=3)
    p.add_argument("--resolve-variables", type=int, default=10_000)
    p.add_argument("--resolve-rules", type=int, default=100)
    p.add_argument("--resolve-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help="same models and groups, small tensors: for tests, timings meaningless")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the A/A slot (plain timed twice) that shows the noise floor")
    args = p.parse_args(argv)
    unknown = set(args.models) - set(_models.MODELS)
    if unknown:
        p.error(f"unknown model(s) {sorted(unknown)}; choose from {list(_models.MODELS)}")
    unknown = set(args.contenders) - set(_contenders.CONTENDERS)
    if unknown:
        p.error(f"unknown contender(s) {sorted(unknown)}; "
                f"choose from {list(_contenders.CONTENDERS)}")
    if "plain" not in args.contenders:
        p.error("the contenders must include 'plain': every ratio is against it")
    backend = keras.backend.backend()
    if args.jit_compile and backend == "torch":
        p.error("--jit-compile is not measured on torch (eager steps only)")

    rng = random.Random(args.seed)
    started = time.time()
    result = {
        "config": args.config or backend + ("-xla" if args.jit_compile else ""),
        "backend": backend,
        "jit_compile": bool(args.jit_compile or backend == "jax"),
        "devices": _harness.devices(),
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "load_average_start": os.getloadavg(),
        "models": [],
    }
    for i, name in enumerate(args.models):
        t0 = time.time()
        # (--tiny timings mean nothing: skip the warm-up compile.)
        result["models"].append(bench_model(name, args, rng, warm_up=i == 0 and not args.tiny))
        print(f"[{result['config']}] {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    if args.resolve_repeats > 0:
        result["rule_resolution"] = _resolve_bench.measure(
            args.resolve_variables, args.resolve_rules, args.resolve_repeats)
    result["load_average_end"] = os.getloadavg()
    result["seconds"] = time.time() - started
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
