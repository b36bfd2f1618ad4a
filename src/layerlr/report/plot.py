"""Pictures of the per-layer learning rates. Needs matplotlib: ``pip install "layerlr[plot]"``.

- `learning_rates`: the effective learning rate of every layer, in depth order.
- `schedule`: each group's effective learning rate over the training steps.
- `history`: the rates `layerlr.callbacks.LearningRateLogger` logged per epoch.
- `update_ratios`: how far each group moved per step, as
  `layerlr.callbacks.UpdateLogger` measured it.

Each function draws on ``ax`` when given, otherwise on a new figure made without
pyplot (so it works headless and never opens a window), saves the figure to
``path`` when given, and returns it. Colors are per learning-rate group (the
variables one ``lr_mult`` rule decided), the same groups the logger names.
"""

from __future__ import annotations

import os
from typing import Any

import keras
import numpy as np

from layerlr.core import _keras
from layerlr.report import _summary

__all__ = ["history", "learning_rates", "schedule", "update_ratios"]


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "layerlr.plot needs matplotlib, which is not installed. Install it with "
            "`pip install \"layerlr[plot]\"` (or `pip install matplotlib`)."
        ) from error
    return matplotlib, Figure


def _axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    _, Figure = _matplotlib()
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _finish(fig, path: str | os.PathLike | None):
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig


# What ``path``, ``ax`` and ``title`` mean is the same for every plot function:
# `_documents_figure_args` writes it into each docstring at this marker line.
_FIGURE_ARGS_MARKER = "        {path, ax, title}\n"
_FIGURE_ARGS = """\
        path: Where to save the figure (any format matplotlib knows).
        ax: A matplotlib Axes to draw on instead of a new figure.
        title: The plot title.
"""


def _documents_figure_args(function):
    if function.__doc__ is not None:  # None under python -OO
        assert _FIGURE_ARGS_MARKER in function.__doc__, function.__name__
        function.__doc__ = function.__doc__.replace(_FIGURE_ARGS_MARKER, _FIGURE_ARGS)
    return function


def _log_y_frame(ax, xlabel: str, ylabel: str) -> None:
    """Readable ticks on the log y axis (limits final), axis labels and the grid."""
    _readable_log_ticks(ax, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _readable_log_ticks(ax, axis: str = "x") -> None:
    """Labels on a log axis that never run into each other.

    Matplotlib labels minor ticks when the visible range holds at most one
    power of ten, and those labels overlap. Over a short range, label 1, 2 and
    5 times each power of ten instead; over a long one, the powers of ten only.
    Call it once the limits are final.
    """
    from matplotlib import ticker

    which = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    if not (lo > 0 and np.isfinite(hi)):
        return
    decades = np.log10(hi) - np.log10(lo)
    if decades < 2.5:
        which.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        which.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.0e}".replace("e-0", "e-")))
    else:
        which.set_major_locator(ticker.LogLocator(base=10, numticks=12))
        which.set_major_formatter(ticker.LogFormatterSciNotation())
    which.set_minor_locator(ticker.LogLocator(base=10, subs=np.arange(2, 10), numticks=12))
    which.set_minor_formatter(ticker.NullFormatter())


def _group_colors(names) -> dict[str, Any]:
    matplotlib, _ = _matplotlib()
    names = list(dict.fromkeys(names))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


@_documents_figure_args
def learning_rates(
    model: keras.Layer,
    optimizer=None,
    *,
    path: str | os.PathLike | None = None,
    ax=None,
    title: str | None = None,
):
    """Bar chart of each layer's effective learning rate now, on a log scale.

    One horizontal bar per layer from input (top) to output, colored by group;
    a layer whose variables fall in several groups (say, a bias rule) gets one
    bar per group. Frozen layers and ``lr_mult=0`` have no place on a log scale
    and are written as text instead.

    Args:
        model: The model (built).
        optimizer: A `layerlr.LayerwiseOptimizer`; defaults to ``model.optimizer``.
        {path, ax, title}

    Returns:
        The matplotlib Figure.

    Example:

    >>> import os, tempfile, keras, layerlr, layerlr.plot
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="body"),
    ...                           keras.layers.Dense(2, name="head")])
    >>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(1e-3), lr_mult={"body": 0.01})
    >>> out = os.path.join(tempfile.mkdtemp(), "rates.png")
    >>> fig = layerlr.plot.learning_rates(model, opt, path=out)
    >>> os.path.exists(out), [f"{p.get_width():.3g}" for p in fig.axes[0].patches]
    (True, ['1e-05', '0.001'])
    """
    records = _summary.summary_records(model, optimizer)
    bars: dict[tuple[str, str | None, str], list[dict]] = {}
    for r in records:
        bars.setdefault((r["layer"], r["group"], r["status"]), []).append(r)
    per_layer: dict[str, int] = {}
    for layer, _, _ in bars:
        per_layer[layer] = per_layer.get(layer, 0) + 1

    fig, ax = _axes(ax, figsize=(8, 1.2 + 0.32 * max(len(bars), 1)))
    colors = _group_colors(g for (_, g, s) in bars if s == _summary.TRAINED)
    positive = [
        rows[0]["learning_rate"]
        for (_, _, s), rows in bars.items()
        if s == _summary.TRAINED and rows[0]["learning_rate"] > 0
    ]
    floor = min(positive) / 10 if positive else 1e-8
    labelled: set[str] = set()
    labels = []
    for y, ((layer, group, status), rows) in enumerate(bars.items()):
        label = layer
        if per_layer[layer] > 1:
            label += " [" + ", ".join(r["path"].rsplit("/", 1)[-1] for r in rows) + "]"
        labels.append(label)
        first = rows[0]
        rate = first["learning_rate"]
        scheduled = first["lr_mult_schedule"] is not None
        if status != _summary.TRAINED or not rate:
            if status == _summary.FROZEN:
                text = "frozen"
            else:
                text = "lr_mult 0 now (scheduled)" if scheduled else "lr_mult 0: not updated"
            ax.text(floor, y, " " + text, va="center", color="0.4", style="italic")
            continue
        mult = f"x{first['lr_mult']:g}" + (" now, scheduled" if scheduled else "")
        legend = f"{group} ({mult})" if group not in labelled else None
        labelled.add(group)
        ax.barh(y, rate, color=colors[group], label=legend)
    ax.set_xscale("log")
    top = max(positive) * 1.5 if positive else floor * 100
    ax.set_xlim(floor, top)
    ax.set_yticks(range(len(labels)), labels)
    # Every row inside the frame, text-only rows (frozen, lr_mult 0) included;
    # input at the top.
    ax.set_ylim(len(labels) - 0.5, -0.5)
    _readable_log_ticks(ax, "x")
    ax.set_xlabel("effective learning rate")
    ax.grid(axis="x", which="major", alpha=0.3)
    if labelled:
        ax.legend(title="group (lr_mult)", fontsize="small", loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "Learning rate per layer (depth order)")
    return _finish(fig, path)


def _curve(value, steps: np.ndarray) -> np.ndarray:
    """A rate or multiplier at each step: schedules evaluated as in training."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return np.asarray([_summary._as_float(value(int(s))) for s in steps])
    return np.full(len(steps), float(value))


@_documents_figure_args
def schedule(
    model: keras.Layer,
    optimizer=None,
    *,
    steps: int = 1000,
    path: str | os.PathLike | None = None,
    ax=None,
    title: str | None = None,
):
    """Each group's effective learning rate over training steps 0..``steps``.

    The base learning rate times each group's ``lr_mult``, both evaluated at
    every step as in training (learning-rate schedules and multiplier schedules
    such as `layerlr.schedules.FreezeThenWarmup`), on a log scale, with the
    current step marked. Steps at rate 0 (a multiplier at 0) leave a gap. With
    ``gradient_accumulation_steps`` the x axis counts micro-steps for the base
    rate but updates for the multipliers, as Keras does.

    Args:
        model: The model (built).
        optimizer: A `layerlr.LayerwiseOptimizer`; defaults to ``model.optimizer``.
        steps: The last step to draw.
        {path, ax, title}

    Returns:
        The matplotlib Figure.

    Example:

    >>> import keras, layerlr, layerlr.plot
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="body"),
    ...                           keras.layers.Dense(2, name="head")])
    >>> decay = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps=100, decay_rate=0.5)
    >>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.Adam(decay), lr_mult={"body": 0.1})
    >>> fig = layerlr.plot.schedule(model, opt, steps=200)
    >>> [(line.get_label(), f"{line.get_ydata()[-1]:.3g}") for line in fig.axes[0].lines[:2]]
    [('body (x0.1)', '2.5e-05'), ('default (x1)', '0.00025')]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    opt = _summary.layerwise_optimizer_of(model, optimizer)
    report = _summary._collect(opt, model)
    grid = np.unique(np.linspace(0, steps, num=min(steps + 1, 200)).round().astype(int))
    inner = opt.inner_optimizer
    base_value = _keras.learning_rate_schedule(inner)
    if base_value is None:
        base_value = _summary._as_float(inner.learning_rate)
    base = _curve(base_value, grid)
    kind = type(base_value).__name__ if not isinstance(base_value, float) else "constant"

    fig, ax = _axes(ax, figsize=(8, 4.5))
    colors = _group_colors(report.group_multipliers)
    never = []
    for group, mult in report.group_multipliers.items():
        rates = base * _curve(mult, grid)
        if not np.any(rates > 0):
            never.append(group)
            continue
        label = f"{group} ({type(mult).__name__})" if _summary._is_schedule(mult) else f"{group} (x{mult:g})"
        ax.plot(grid, np.where(rates > 0, rates, np.nan), color=colors[group], label=label)
    if report.step <= steps:
        ax.axvline(report.step, color="0.5", linestyle=":", label=f"now (step {report.step})")
    ax.set_yscale("log")
    _log_y_frame(ax, "training step", "effective learning rate")
    ax.legend(fontsize="small", title="group (lr_mult)")
    note = f"; never updated: {', '.join(never)}" if never else ""
    ax.set_title(title or f"Learning rate per group, base rate {kind}{note}")
    return _finish(fig, path)


@_documents_figure_args
def history(
    history,
    *,
    prefix: str = "learning_rate/",
    path: str | os.PathLike | None = None,
    ax=None,
    title: str | None = None,
):
    """The per-group learning rates that `LearningRateLogger` logged, per epoch.

    This shows what training really used, including multipliers changed
    between epochs by other callbacks.

    Args:
        history: The ``History`` that ``model.fit`` returned, or its
            ``.history`` dict.
        prefix: The logger's prefix.
        {path, ax, title}

    Returns:
        The matplotlib Figure.

    Example:

    >>> import layerlr.plot
    >>> logged = {"loss": [0.9, 0.5], "learning_rate/backbone": [1e-5, 5e-6],
    ...           "learning_rate/default": [1e-3, 5e-4]}
    >>> fig = layerlr.plot.history(logged)
    >>> [line.get_label() for line in fig.axes[0].lines]
    ['backbone', 'default']
    """
    logged = getattr(history, "history", history)
    if not isinstance(logged, dict):
        raise TypeError(
            "history must be the History returned by model.fit or its .history "
            f"dict, got {type(history).__name__}."
        )
    series = {k[len(prefix):]: v for k, v in logged.items() if k.startswith(prefix)}
    if not series:
        raise ValueError(
            f"No {prefix!r} keys in the history (it has {sorted(logged)}). Add "
            "layerlr.callbacks.LearningRateLogger() to the callbacks of model.fit."
        )
    fig, ax = _axes(ax, figsize=(8, 4.5))
    colors = _group_colors(series)
    for group, values in series.items():
        values = np.asarray(values, dtype=float)
        epochs = np.arange(1, len(values) + 1)
        # Zero rates (frozen by rate) have no place on a log scale.
        shown = np.where(values > 0, values, np.nan)
        ax.plot(epochs, shown, marker="o", color=colors[group], label=group)
    ax.set_yscale("log")
    _log_y_frame(ax, "epoch", "effective learning rate (end of epoch)")
    ax.legend(fontsize="small", title="group")
    ax.set_title(title or "Logged learning rate per group")
    return _finish(fig, path)


# The rule of thumb: weights move by about 1e-3 of their norm per step.
REFERENCE_BAND = (3e-4, 3e-3)


def _update_series(source) -> tuple[dict, str]:
    """(the logged columns, "step" or "epoch") from whatever the user has."""
    from layerlr.report.callbacks import UpdateLogger

    if isinstance(source, UpdateLogger):
        return source.history, "step"
    steps = getattr(source, "layerlr_updates", None)  # the History of a fit with an UpdateLogger
    if isinstance(steps, dict) and steps.get("step"):
        return steps, "step"
    logged = getattr(source, "history", source)
    if not isinstance(logged, dict):
        raise TypeError(
            "update_ratios takes a layerlr.callbacks.UpdateLogger, the History that "
            "model.fit returned, or a dict of logged values, got "
            f"{type(source).__name__}."
        )
    if not any(k.startswith("update_ratio/") for k in logged):
        raise ValueError(
            f"No 'update_ratio/' values to draw (the logs have {sorted(logged)}). Add "
            "layerlr.callbacks.UpdateLogger(every=...) to the callbacks of model.fit."
        )
    return logged, ("step" if "step" in logged else "epoch")


def _runs(flags: np.ndarray):
    """(start, end) index pairs of the runs of True in ``flags``."""
    runs, start = [], None
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        if not flag and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(flags) - 1))
    return runs


@_documents_figure_args
def update_ratios(
    source,
    *,
    path: str | os.PathLike | None = None,
    ax=None,
    title: str | None = None,
    colors: dict | None = None,
    legend: bool = True,
):
    """Each group's update / weight ratio per step, on a log scale.

    ``||w_after - w_before|| / ||w_before||`` of the steps that
    `layerlr.callbacks.UpdateLogger` measured, one line per group, over the
    band around 1e-3 per step that is the usual rule of thumb (far below: the
    group barely learns; far above: it is being rewritten). Steps where a group
    was frozen or not updated (``lr_mult`` 0) have no place on a log scale:
    they are drawn as bars along the bottom, one row per such group.

    Args:
        source: The `UpdateLogger`, the ``History`` that ``model.fit``
            returned (with an ``UpdateLogger`` among its callbacks: per step;
            otherwise the per-epoch means), or a dict of logged values.
        {path, ax, title}
        colors: ``{group: color}`` for some or all groups.
        legend: Whether to draw the legend.

    Returns:
        The matplotlib Figure.

    Example:

    >>> import layerlr.plot
    >>> logged = {"step": [0, 10, 20], "update_ratio/backbone": [1e-5, 2e-5, 2e-5],
    ...           "update_ratio/default": [3e-3, 2e-3, 1e-3],
    ...           "status/backbone": ["trained"] * 3, "status/default": ["trained"] * 3}
    >>> fig = layerlr.plot.update_ratios(logged)
    >>> [line.get_label() for line in fig.axes[0].lines[:2]]
    ['backbone', 'default']
    """
    logged, unit = _update_series(source)
    groups = [k[len("update_ratio/"):] for k in logged if k.startswith("update_ratio/")]
    x = np.asarray(logged[unit], dtype=float) if unit in logged else None
    if x is None:  # epoch logs: epochs from 1
        x = np.arange(1, len(logged[f"update_ratio/{groups[0]}"]) + 1, dtype=float)
    fig, ax = _axes(ax, figsize=(9, 4.8))
    palette = {**_group_colors(groups), **(colors or {})}
    marker = "o" if len(x) <= 60 else None
    shown: list[float] = []
    idle: list[tuple[str, str, np.ndarray]] = []  # (group, status, flags)
    for group in groups:
        ratios = np.asarray(logged[f"update_ratio/{group}"], dtype=float)
        status = logged.get(f"status/{group}")
        status = np.asarray(status if status is not None else ["trained"] * len(ratios), dtype=object)
        drawn = np.where((status == "trained") & (ratios > 0), ratios, np.nan)
        ax.plot(x, drawn, marker=marker, markersize=3, color=palette[group], label=group)
        shown += [float(v) for v in drawn if np.isfinite(v)]
        for kind in ("frozen", "not updated"):
            flags = status == kind
            if flags.any():
                idle.append((group, kind, flags))

    lo = min([*shown, REFERENCE_BAND[0]])
    hi = max([*shown, REFERENCE_BAND[1]])
    # Room along the bottom for one row per idle group.
    reserved = min(0.5, 0.05 + 0.055 * len(idle)) if idle else 0.0
    decades = np.log10(hi * 2) - np.log10(lo / 2)
    bottom = 10 ** (np.log10(lo / 2) - decades * reserved / (1 - reserved))
    ax.set_yscale("log")
    ax.set_ylim(bottom, hi * 2)
    ax.axhspan(*REFERENCE_BAND, color="tab:green", alpha=0.12, lw=0,
               label="~1e-3 per step (rule of thumb)")
    ax.axhline(1e-3, color="tab:green", lw=0.8, ls="--", alpha=0.7)
    spacing = float(np.median(np.diff(x))) if len(x) > 1 else 1.0
    ax.set_xlim(x[0] - spacing / 2, x[-1] + spacing / 2)  # room for the idle bars
    transform = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for row, (group, kind, flags) in enumerate(idle):
        y = 0.03 + 0.055 * row
        for start, end in _runs(flags):
            x0, x1 = x[start] - spacing / 2, x[end] + spacing / 2
            ax.plot([x0, x1], [y, y], transform=transform, color=palette[group], lw=5,
                    alpha=0.55 if kind == "frozen" else 0.9, solid_capstyle="butt",
                    ls="-" if kind == "frozen" else (0, (2, 1)))
            ax.text(x0, y + 0.012, f"{group}: {kind}", transform=transform, fontsize=7,
                    color="0.25", va="bottom")
    _log_y_frame(ax, "training step" if unit == "step" else "epoch (mean of its measured steps)",
                 "||w_after - w_before|| / ||w_before||")
    if legend:
        ax.legend(title="group", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "How far each group moves per step")
    return _finish(fig, path)
