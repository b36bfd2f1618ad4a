"""The fine-tuning demo: per-layer learning rates on a real, offline task.

The scenario: a pretrained 5-convolution network gets a new convolution layer
and head, and is fine-tuned for another task with the pretrained layers at
1e-5 and the new layers at 1e-3. Here the "pretraining" is on the handwritten
digits 0-4 that ship with scikit-learn (no download), and the new task is the
digits 5-9 with only a few labelled images per class. On the same data, seeds
and starting weights, it compares:

- one learning rate (1e-3) for everything,
- the backbone frozen (new layers at 1e-3),
- per-layer rates: backbone at 1e-5 (``lr_mult=0.01``), new layers at 1e-3,
- layer-wise decay: each backbone layer at half the rate of the one above it.

and reports accuracy on the new task, how much the old task was disturbed
(the old head's accuracy on held-out 0-4 after fine-tuning, and the relative
change of the backbone weights) and the time per epoch. The numbers are what
they are; nothing here is tuned for the per-layer methods.

Run it with ``layerlr demo`` or ``python -m layerlr.demo`` (``--quick`` for a
short run, ``--out-dir`` for where the plots go). It needs scikit-learn and
matplotlib: ``pip install "layerlr[demo]"``.

Example (the data alone):

>>> from layerlr.demo import digits_tasks
>>> tasks = digits_tasks(labelled_per_class=10, seed=0)
>>> x, y = tasks["new_train"]
>>> x.shape, sorted(set(y.tolist()))
((50, 8, 8, 1), [0, 1, 2, 3, 4])
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

import layerlr
import layerlr.plot

BASE_LR = 1e-3
BACKBONE_MULT = 0.01  # 1e-3 * 0.01 = 1e-5
LAYER_DECAY = 0.5  # a common choice, fixed before running the demo
UPDATE_EVERY = 5  # steps between two UpdateLogger measurements (one per epoch here)
METHODS = (
    "one learning rate",
    "frozen backbone",
    "per-layer rates",
    "layer-wise decay",
)
_DESCRIPTIONS = {
    "one learning rate": "every layer at 1e-3",
    "frozen backbone": "backbone trainable=False, new layers at 1e-3",
    "per-layer rates": "backbone at 1e-5 (lr_mult 0.01), new layers at 1e-3",
    "layer-wise decay": f"conv5 at 1e-3*{LAYER_DECAY}, conv4 *{LAYER_DECAY}^2, ..., new at 1e-3",
}


@dataclass(frozen=True)
class Config:
    pretrain_epochs: int = 20
    finetune_epochs: int = 30
    labelled_per_class: int = 10
    seeds: int = 3
    batch_size: int = 10


FULL = Config()
QUICK = Config(pretrain_epochs=6, finetune_epochs=8, seeds=1)


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SystemExit(
            f"The layerlr demo needs {module.split('.')[0]}, which is not installed. "
            'Install the demo extra: pip install "layerlr[demo]".'
        ) from error


# --- data ---------------------------------------------------------------------------


def digits_tasks(labelled_per_class: int = 10, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The two tasks from scikit-learn's 8x8 digits, as ``{name: (x, y)}``.

    ``old_train`` / ``old_test``: digits 0-4 (70/30 split, fixed). ``new_test``:
    30% of the digits 5-9 (fixed); ``new_train``: ``labelled_per_class`` images
    per class from the rest, drawn with ``seed``. New-task labels are 0-4
    (digit minus 5). Images are scaled to [0, 1], shape (8, 8, 1).
    """
    datasets = _require("sklearn.datasets")
    images, labels = datasets.load_digits(return_X_y=True)
    images = (images / 16.0).reshape(-1, 8, 8, 1).astype("float32")
    split_rng = np.random.default_rng(12345)  # the test sets never change
    tasks = {}
    old = np.flatnonzero(labels < 5)
    new = np.flatnonzero(labels >= 5)
    old = split_rng.permutation(old)
    new = split_rng.permutation(new)
    n_old_test, n_new_test = int(0.3 * len(old)), int(0.3 * len(new))
    tasks["old_train"] = images[old[n_old_test:]], labels[old[n_old_test:]]
    tasks["old_test"] = images[old[:n_old_test]], labels[old[:n_old_test]]
    tasks["new_test"] = images[new[:n_new_test]], labels[new[:n_new_test]] - 5
    pool = new[n_new_test:]
    pick_rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [pick_rng.permutation(pool[labels[pool] == c])[:labelled_per_class] for c in range(5, 10)]
    )
    chosen = pick_rng.permutation(chosen)
    tasks["new_train"] = images[chosen], labels[chosen] - 5
    return tasks


# --- models -------------------------------------------------------------------------


def _backbone() -> keras.Sequential:
    conv = lambda filters, name: keras.layers.Conv2D(  # noqa: E731
        filters, 3, padding="same", activation="relu", name=name
    )
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            conv(16, "conv1"),
            conv(16, "conv2"),
            keras.layers.MaxPooling2D(name="pool"),
            conv(32, "conv3"),
            conv(32, "conv4"),
            conv(32, "conv5"),
        ],
        name="backbone",
    )


def _with_head(backbone, head_name: str, new_conv: bool) -> keras.Sequential:
    layers = [keras.Input((8, 8, 1)), backbone]
    if new_conv:
        layers.append(
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="new_conv")
        )
    layers += [
        keras.layers.GlobalAveragePooling2D(name=f"{head_name}_pool"),
        keras.layers.Dense(5, activation="softmax", name=head_name),
    ]
    return keras.Sequential(layers, name="finetune" if new_conv else "pretrain")


def _accuracy(model, data) -> float:
    x, y = data
    predicted = np.argmax(model.predict(x, verbose=0), axis=-1)
    return float(np.mean(predicted == y))


def _flat_weights(layer) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(w)) for w in layer.get_weights()])


class _EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def layer_decay_rules(decay: float = LAYER_DECAY) -> dict[str, float]:
    """conv5 (the top of the backbone) at ``decay``, conv4 at ``decay**2``, ...

    Written out by hand: glob rules on the layer names, first match wins.
    """
    return {f"conv{i}": decay ** (6 - i) for i in range(5, 0, -1)}


def _optimizer(method: str, backbone):
    adam = keras.optimizers.Adam(BASE_LR)
    if method in ("one learning rate", "frozen backbone"):
        return adam
    if method == "per-layer rates":
        return layerlr.LayerwiseOptimizer(adam, lr_mult={backbone: BACKBONE_MULT})
    if method == "layer-wise decay":
        return layerlr.LayerwiseOptimizer(adam, lr_mult=layer_decay_rules())
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")


# --- the experiment -------------------------------------------------------------------


def _pretrain(tasks, config: Config, verbose: int):
    keras.utils.set_random_seed(0)
    backbone = _backbone()
    model = _with_head(backbone, "old_head", new_conv=False)
    model.compile(keras.optimizers.Adam(BASE_LR), "sparse_categorical_crossentropy")
    model.fit(
        *tasks["old_train"], epochs=config.pretrain_epochs, batch_size=32, verbose=verbose
    )
    return {
        "backbone": backbone.get_weights(),
        "old_head": model.get_layer("old_head").get_weights(),
        "old_accuracy": _accuracy(model, tasks["old_test"]),
    }


def _finetune(method, tasks, pretrained, config: Config, seed: int, verbose: int, show=False,
              log_updates: bool = False):
    keras.utils.set_random_seed(seed)
    backbone = _backbone()
    backbone.set_weights(pretrained["backbone"])
    model = _with_head(backbone, "new_head", new_conv=True)
    old_model = _with_head(backbone, "old_head", new_conv=False)
    old_model.get_layer("old_head").set_weights(pretrained["old_head"])
    if method == "frozen backbone":
        backbone.trainable = False
    optimizer = _optimizer(method, backbone)
    model.compile(optimizer, "sparse_categorical_crossentropy")
    if show and isinstance(optimizer, layerlr.LayerwiseOptimizer):
        layerlr.summary(model)
    before = _flat_weights(backbone)
    timer = _EpochTimer()
    callbacks = [timer]
    updates = None
    if log_updates:
        # One point per epoch (5 steps); every layer on its own line.
        updates = layerlr.callbacks.UpdateLogger(every=UPDATE_EVERY, groups="layers")
        callbacks.append(updates)
    model.fit(
        *tasks["new_train"],
        epochs=config.finetune_epochs,
        batch_size=config.batch_size,
        verbose=verbose,
        callbacks=callbacks,
    )
    after = _flat_weights(backbone)
    # The first epoch includes tracing and compiling the step.
    steady = timer.seconds[1:] or timer.seconds
    return {
        "new_accuracy": _accuracy(model, tasks["new_test"]),
        "old_accuracy": _accuracy(old_model, tasks["old_test"]),
        "backbone_change": float(np.linalg.norm(after - before) / np.linalg.norm(before)),
        "seconds_per_epoch": statistics.median(steady),
        "model": model,
        "updates": None if updates is None else updates.history,
    }


def run(config: Config = FULL, out_dir: str | os.PathLike = "layerlr-demo", verbose: int = 1) -> dict:
    """Runs the whole comparison, prints the table, writes plots and results to ``out_dir``.

    ``verbose``: 0 prints the results table only; 1 (the default) also the
    multiplier tables of the two layerlr models and one line per run; 2 also
    Keras' progress bars for the first seed.

    Returns ``{"pretrained_old_accuracy": float, "methods": {method: {metric:
    [value per seed]}}, "files": [paths written]}``.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    bars = 1 if verbose >= 2 else 0
    tasks = digits_tasks(config.labelled_per_class, seed=0)
    if verbose:
        print(f"Pretraining the 5-conv backbone on digits 0-4 ({config.pretrain_epochs} epochs)...")
    pretrained = _pretrain(tasks, config, bars)
    if verbose:
        print(f"Pretrained old-task accuracy (digits 0-4, held out): {pretrained['old_accuracy']:.3f}")
    results: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    updates: dict[str, dict] = {}
    files = []
    for seed in range(config.seeds):
        tasks = digits_tasks(config.labelled_per_class, seed=seed)
        for method in METHODS:
            first = seed == 0
            if verbose and first:
                print(
                    f"\n== Fine-tuning on digits 5-9 ({config.labelled_per_class} labelled "
                    f"per class), seed {seed}: {method} ({_DESCRIPTIONS[method]})"
                )
            outcome = _finetune(method, tasks, pretrained, config, seed, bars if first else 0,
                                show=bool(verbose) and first, log_updates=first)
            model = outcome.pop("model")
            logged = outcome.pop("updates")
            if logged is not None:
                updates[method] = logged
            for key, value in outcome.items():
                results[method].setdefault(key, []).append(value)
            if verbose:
                print(
                    f"seed {seed}, {method}: new task {outcome['new_accuracy']:.3f}, "
                    f"old head {outcome['old_accuracy']:.3f}, backbone change "
                    f"{100 * outcome['backbone_change']:.2f}%"
                )
            if first:
                files += _save_artifacts(method, model, out_dir)
    summary = {
        "config": config.__dict__,
        "pretrained_old_accuracy": pretrained["old_accuracy"],
        "methods": results,
    }
    files.append(_plot_comparison(summary, out_dir))
    files.append(_plot_updates(updates, out_dir))
    results_path = os.path.join(out_dir, "results.json")
    with open(results_path, "w") as f:
        json.dump({**summary, "updates_seed_0": updates}, f, indent=2)
    files.append(results_path)
    print()
    for line in format_table(summary):
        print(line)
    print(f"\nWrote {', '.join(files)}")
    inspect_path = os.path.join(out_dir, "per_layer_rates.keras")
    print(f"Inspect the saved per-layer model with: layerlr inspect {inspect_path}")
    print(f"Total time: {time.perf_counter() - started:.0f} s on {keras.backend.backend()}")
    summary["files"] = files
    return summary


def _save_artifacts(method: str, model, out_dir: str) -> list[str]:
    if not isinstance(model.optimizer, layerlr.LayerwiseOptimizer):
        return []
    stem = method.replace(" ", "_").replace("-", "_")
    plot_path = os.path.join(out_dir, f"{stem}_learning_rates.png")
    layerlr.plot.learning_rates(model, path=plot_path, title=f"{method}: learning rate per layer")
    model_path = os.path.join(out_dir, f"{stem}.keras")
    model.save(model_path)
    return [plot_path, model_path]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def format_table(summary: dict) -> list[str]:
    """The results table as lines: mean (and std over seeds when more than one)."""
    methods = summary["methods"]
    seeds = len(next(iter(methods.values()))["new_accuracy"])
    spread = seeds > 1

    def cell(values, fmt):
        mean, std = _mean_std(values)
        return f"{fmt(mean)} ± {fmt(std)}" if spread else fmt(mean)

    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    rows = [
        (
            method,
            cell(m["new_accuracy"], pct),
            cell(m["old_accuracy"], pct),
            cell(m["backbone_change"], lambda v: f"{100 * v:.2f}%"),
            cell(m["seconds_per_epoch"], lambda v: f"{1000 * v:.0f} ms"),
        )
        for method, m in methods.items()
    ]
    headers = (
        "method",
        "new task acc (5-9)",
        "old head acc (0-4)",
        "backbone change",
        "time / epoch",
    )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    lines = [
        f"Results over {seeds} seed{'s' if spread else ''}"
        + (" (mean ± std)" if spread else "")
        + f"; old head before fine-tuning: {100 * summary['pretrained_old_accuracy']:.1f}%",
        fmt(headers),
        "-" * (sum(widths) + 2 * (len(widths) - 1)),
    ]
    lines += [fmt(r) for r in rows]
    lines.append(
        "backbone change = ||W_after - W_before|| / ||W_before|| over the 5 pretrained "
        "conv layers; time / epoch = median, first epoch (tracing) excluded."
    )
    return lines


# Two-line tick labels: rotated ones ran off the right edge of the figure.
_SHORT = {
    "one learning rate": "one\nlearning rate",
    "frozen backbone": "frozen\nbackbone",
    "per-layer rates": "per-layer\nrates",
    "layer-wise decay": "layer-wise\ndecay",
}


def _plot_comparison(summary: dict, out_dir: str) -> str:
    _, Figure = layerlr.plot._matplotlib()
    methods = list(summary["methods"])
    ticks = [_SHORT.get(m, m) for m in methods]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    acc_ax, change_ax = fig.subplots(1, 2)
    x = np.arange(len(methods))
    for offset, key, label in (
        (-0.2, "new_accuracy", "new task (5-9)"),
        (0.2, "old_accuracy", "old head on 0-4"),
    ):
        means, stds = zip(*(_mean_std(summary["methods"][m][key]) for m in methods))
        acc_ax.bar(x + offset, means, 0.4, yerr=stds, label=label, capsize=3)
    acc_ax.axhline(summary["pretrained_old_accuracy"], color="0.4", linestyle=":",
                   label="old head before fine-tuning")
    acc_ax.set_xticks(x, ticks)
    acc_ax.set_ylim(0, 1.25)
    acc_ax.set_ylabel("accuracy (held out)")
    acc_ax.legend(fontsize="small", loc="upper center", ncols=2)
    acc_ax.set_title("Accuracy after fine-tuning")
    means, stds = zip(*(_mean_std(summary["methods"][m]["backbone_change"]) for m in methods))
    bars = change_ax.bar(x, [100 * m for m in means], 0.6, yerr=[100 * s for s in stds],
                         capsize=3, color="tab:gray")
    change_ax.bar_label(bars, labels=[f"{100 * m:.2f}%" for m in means], padding=3, fontsize="small")
    change_ax.set_ylim(0, max(100 * m for m in means) * 1.2 or 1.0)
    change_ax.set_xticks(x, ticks)
    change_ax.set_ylabel("backbone weights moved, ||dW|| / ||W|| (%)")
    change_ax.set_title("How far the pretrained layers moved")
    path = os.path.join(out_dir, "comparison.png")
    fig.savefig(path, dpi=120)
    return path


def _layer_colors(groups) -> dict:
    """Backbone layers in blues (light = near the input), new layers in reds."""
    matplotlib, _ = layerlr.plot._matplotlib()
    old = [g for g in groups if g.startswith("conv")]
    new = [g for g in groups if g not in old]
    blues, reds = matplotlib.colormaps["Blues"], matplotlib.colormaps["Reds"]
    colors = {g: blues(0.35 + 0.6 * i / max(len(old) - 1, 1)) for i, g in enumerate(old)}
    colors.update({g: reds(0.55 + 0.35 * i / max(len(new) - 1, 1)) for i, g in enumerate(new)})
    return colors


def _plot_updates(updates: dict[str, dict], out_dir: str) -> str:
    """The update / weight ratio of every layer per step, one panel per method."""
    _, Figure = layerlr.plot._matplotlib()
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, method in zip(axes, METHODS):
        logged = updates[method]
        groups = [k[len("update_ratio/"):] for k in logged if k.startswith("update_ratio/")]
        layerlr.plot.update_ratios(logged, ax=ax, title=f"{method}\n{_DESCRIPTIONS[method]}",
                                   colors=_layer_colors(groups), legend=False)
        ax.title.set_fontsize("medium")
    # One scale for all four, so that they compare at a glance.
    lows, highs = zip(*(ax.get_ylim() for ax in axes))
    for ax in axes:
        ax.set_ylim(min(lows), max(highs))
        layerlr.plot._readable_log_ticks(ax, "y")
    for ax in axes[1::2]:
        ax.set_ylabel("")
    for ax in axes[:2]:
        ax.set_xlabel("")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", title="layer", fontsize="small")
    fig.suptitle("How far each layer moves per step: ||W_after - W_before|| / ||W_before||")
    path = os.path.join(out_dir, "update_ratios.png")
    fig.savefig(path, dpi=110)
    return path


# --- command line ---------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a short run (1 seed, fewer epochs), for a first look or a test")
    parser.add_argument("--out-dir", default="layerlr-demo",
                        help="where to write the plots, results.json and the saved models "
                        "(default: ./layerlr-demo)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"number of seeds (default: {FULL.seeds}, or {QUICK.seeds} with --quick)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Keras' progress bars (first seed)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the results table")


def run_from_args(args: argparse.Namespace) -> int:
    config = QUICK if args.quick else FULL
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds must be at least 1, got {args.seeds}.")
        config = Config(**{**config.__dict__, "seeds": args.seeds})
    _require("sklearn.datasets")
    _require("matplotlib")
    if args.quiet and args.verbose:
        raise SystemExit("--quiet and --verbose contradict each other: choose one.")
    run(config, args.out_dir, verbose=0 if args.quiet else (2 if args.verbose else 1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m layerlr.demo [--quick] [--out-dir DIR] [--seeds N] [--verbose | --quiet]``."""
    parser = argparse.ArgumentParser(
        prog="python -m layerlr.demo",
        description="Fine-tune a pretrained 5-conv net on a new digits task and compare "
        "one learning rate, a frozen backbone, per-layer rates and layer-wise decay.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
