"""What `layerlr.callbacks.UpdateLogger` costs: ``model.fit`` time with and without it.

One model (the conv fine-tuning benchmark model, LayerwiseOptimizer with AdamW
and its rules), one compiled ``fit``; each round times the same number of
steps three ways in random order: ``fit`` without the logger, ``fit`` with
``UpdateLogger(every=...)``, and ``fit`` without it again (the A/A control,
which shows the noise floor). The ratio of each round is paired (with / without
in the same round), and the median and interquartile range of the rounds are
reported. Target: < 1.02 at ``every=100``.

    python -m benchmarks.update_logger                 # current KERAS_BACKEND
    python -m benchmarks.run --updates                 # every backend, results file
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import layerlr  # noqa: E402
from benchmarks import _models  # noqa: E402

TARGET = 1.02
_HOOKS = ("on_train_begin", "on_train_batch_begin", "on_test_begin", "on_epoch_end", "on_train_end")


class _TimedLogger(layerlr.callbacks.UpdateLogger):
    """UpdateLogger that adds up the time spent inside its own hooks.

    A direct measure of its cost, far steadier on a shared machine than the
    difference of two fit times (the paired ratio, reported too). The time
    its hooks spend waiting for the steps already dispatched (JAX runs
    ``fit``'s steps asynchronously, tens of steps ahead; `_updates.settle`)
    is counted apart, as ``wait``: the computation runs on meanwhile, and
    ``fit`` waits for the same steps at the end of the epoch without the
    logger. What the logger adds is the rest, its own work (``inside``),
    plus the idle gap while it reads (within ``inside``) and the step
    dispatched after it (the paired ratio shows it, within the noise).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = 0.0
        self.waited = 0.0
        for name in _HOOKS:
            method = getattr(self, name)

            def timed(*a, _method=method, **k):
                start = time.perf_counter()
                try:
                    return _method(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(self, name, timed)

    def _settle(self):
        start = time.perf_counter()
        try:
            super()._settle()
        finally:
            self.waited += time.perf_counter() - start


def _quartiles(xs):
    xs = sorted(xs)
    q = lambda p: float(np.quantile(xs, p))  # noqa: E731
    return {"median": q(0.5), "q25": q(0.25), "q75": q(0.75), "n": len(xs)}


def measure(rounds: int, steps: int, every: int, seed: int = 0, tiny: bool = False) -> dict:
    keras.utils.set_random_seed(seed)
    spec = _models.conv_finetune(batch=8 if tiny else 32, steps=1, size=8 if tiny else 32)
    model = spec.model
    model.compile(
        optimizer=layerlr.LayerwiseOptimizer(
            spec.optimizer(**spec.optimizer_kwargs), lr_mult=spec.lr_rules, decay_mult=spec.decay_rules
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = np.repeat(spec.x[0], steps, axis=0)
    y = np.repeat(spec.y[0], steps, axis=0)
    batch = spec.x[0].shape[0]

    def fit(callbacks):
        start = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        return time.perf_counter() - start

    fit([])  # trace and compile once: every later fit reuses the train function
    fit([layerlr.callbacks.UpdateLogger(every=every)])
    rng = random.Random(seed)
    times = {"without": [], "with": [], "without_again": []}
    measured_steps, inside, waited = [], [], []
    for _ in range(rounds):
        order = list(times)
        rng.shuffle(order)
        for kind in order:
            if kind == "with":
                logger = _TimedLogger(every=every)
                times[kind].append(fit([logger]))
                measured_steps.append(len(logger.history["step"]))
                # Own work: the hooks' time less the wait for steps already dispatched.
                inside.append((logger.seconds - logger.waited) / times[kind][-1])
                waited.append(logger.waited / times[kind][-1])
            else:
                times[kind].append(fit([]))
    ratio = [w / wo for w, wo in zip(times["with"], times["without"])]
    control = [a / b for a, b in zip(times["without_again"], times["without"])]
    return {
        "backend": keras.backend.backend(),
        "model": spec.title,
        "n_params": int(model.count_params()),
        "steps_per_fit": steps,
        "every": every,
        "measured_steps_per_fit": measured_steps[0] if measured_steps else 0,
        "rounds": rounds,
        "fit_s_without": float(np.median(times["without"])),
        "fit_s_with": float(np.median(times["with"])),
        "ratio": _quartiles(ratio),
        "control": _quartiles(control),
        # Fastest fit with / fastest without (and the A/A pair): on a shared
        # machine noise only adds time, so the minima are the steadiest pair.
        "best_ratio": min(times["with"]) / min(times["without"]),
        "best_control": min(times["without_again"]) / min(times["without"]),
        # Time inside the logger's hooks, less its wait for dispatched steps, / fit time, per round.
        "inside_fraction": _quartiles(inside),
        # Time its hooks waited for steps already dispatched (JAX) / fit time, per round.
        "wait_fraction": _quartiles(waited),
        "target": TARGET,
        # Judged on the direct measure; the paired ratio shows the same within the noise.
        "verdict": "PASS" if 1 + np.median(inside) < TARGET else "FAIL",
    }


def line(result: dict) -> str:
    r, c, i = result["ratio"], result["control"], result["inside_fraction"]
    w = result.get("wait_fraction")
    waited = (f"; waiting for steps already dispatched {100 * w['median']:.1f}% "
              f"[{100 * w['q25']:.1f}-{100 * w['q75']:.1f}%], not counted" if w and w["median"] >= 5e-4 else "")
    best = (f"; fastest with / fastest without = {result['best_ratio']:.3f}, "
            f"A/A {result['best_control']:.3f}" if "best_ratio" in result else "")
    return (
        f"{result['backend']}: time inside UpdateLogger(every={result['every']}) = "
        f"{100 * i['median']:.2f}% of fit [{100 * i['q25']:.2f}-{100 * i['q75']:.2f}%]{waited}; "
        f"fit with / without = {r['median']:.3f} [{r['q25']:.3f}-{r['q75']:.3f}] over "
        f"{r['n']} rounds, A/A control {c['median']:.3f} [{c['q25']:.3f}-{c['q75']:.3f}]{best} "
        f"({result['steps_per_fit']} steps per fit, {result['measured_steps_per_fit']} measured, "
        f"{result['fit_s_without']:.2f} s without); target < {result['target']}: {result['verdict']}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.update_logger", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=300, help="training steps per timed fit")
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="small tensors (smoke test; timings mean nothing)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    result = measure(args.rounds, args.steps, args.every, args.seed, args.tiny)
    print(line(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
