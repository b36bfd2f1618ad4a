"""layerlr.plot: what is drawn is checked against rates written out by hand."""

import sys

import numpy as np
import pytest
import keras

import layerlr
import layerlr.plot

pytest.importorskip("matplotlib")


def model_and_optimizer(lr=1e-3, **kwargs):
    backbone = keras.Sequential(
        [keras.layers.Dense(8, name="b1"), keras.layers.Dense(8, name="b2")], name="backbone"
    )
    inputs = keras.Input((6,))
    h = backbone(inputs)
    h = keras.layers.Dense(4, name="neck")(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    model = keras.Model(inputs, outputs, name="net")
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.Adam(lr), lr_mult=[(backbone, 0.01), ("head/bias", 0.5)], **kwargs
    )
    return model, backbone, opt


def test_learning_rates_bar_chart(tmp_path):
    model, _, opt = model_and_optimizer()
    path = tmp_path / "rates.png"
    fig = layerlr.plot.learning_rates(model, opt, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # Depth order; head is split because its bias has its own rule.
    assert labels == ["b1", "b2", "neck", "head [kernel]", "head [bias]"]
    widths = [p.get_width() for p in ax.patches]
    assert widths == pytest.approx([1e-5, 1e-5, 1e-3, 1e-3, 5e-4], rel=1e-6)
    colors = [p.get_facecolor() for p in ax.patches]
    assert colors[0] == colors[1]  # both backbone
    assert colors[2] == colors[3]  # default
    assert len({colors[0], colors[2], colors[4]}) == 3
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["backbone (x0.01)", "default (x1)", "head/bias (x0.5)"]


def test_frozen_layers_are_written_not_drawn():
    model, backbone, opt = model_and_optimizer()
    backbone.trainable = False
    fig = layerlr.plot.learning_rates(model, opt)
    ax = fig.axes[0]
    assert [p.get_width() for p in ax.patches] == pytest.approx([1e-3, 1e-3, 5e-4], rel=1e-6)
    assert [t.get_text().strip() for t in ax.texts] == ["frozen", "frozen"]


def test_draws_on_a_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    model, _, opt = model_and_optimizer()
    assert layerlr.plot.learning_rates(model, opt, ax=ax) is fig
    assert len(ax.patches) == 5


def test_schedule_plot_follows_base_schedule_and_multiplier_schedules(tmp_path):
    base = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=50, decay_rate=0.5)
    warm = layerlr.schedules.FreezeThenWarmup(freeze_steps=20, warmup_steps=10, value=0.1)
    model, backbone, _ = model_and_optimizer()
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.Adam(base), lr_mult=[(backbone, warm), ("head/bias", 0.5)]
    )
    fig = layerlr.plot.schedule(model, opt, steps=100, path=tmp_path / "schedule.svg")
    assert (tmp_path / "schedule.svg").exists()
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {
        "backbone (FreezeThenWarmup)", "default (x1)", "head/bias (x0.5)", "now (step 0)"
    }
    steps = lines["default (x1)"].get_xdata()
    assert steps[0] == 0 and steps[-1] == 100
    by_hand = 0.1 * 0.5 ** (steps / 50)
    np.testing.assert_allclose(lines["default (x1)"].get_ydata(), by_hand, rtol=1e-5)
    np.testing.assert_allclose(lines["head/bias (x0.5)"].get_ydata(), by_hand * 0.5, rtol=1e-5)
    ramp = np.where(steps < 20, np.nan, 0.1 * np.clip((steps - 20 + 1) / 10, 0, 1))
    np.testing.assert_allclose(
        lines["backbone (FreezeThenWarmup)"].get_ydata(), by_hand * ramp, rtol=1e-5
    )
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        layerlr.plot.schedule(model, opt, steps=0)


def test_history_plot():
    logged = {
        "loss": [1.0, 0.5, 0.2],
        "learning_rate/backbone": [0.0, 1e-5, 2e-5],
        "learning_rate/default": [1e-3, 1e-3, 1e-3],
    }
    fig = layerlr.plot.history(logged)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert set(lines) == {"backbone", "default"}
    assert list(lines["default"].get_xdata()) == [1, 2, 3]
    backbone = lines["backbone"].get_ydata()
    assert np.isnan(backbone[0])  # zero has no place on a log scale
    assert list(backbone[1:]) == [1e-5, 2e-5]

    class FakeHistory:
        history = logged

    assert len(layerlr.plot.history(FakeHistory()).axes[0].lines) == 2
    with pytest.raises(ValueError, match="LearningRateLogger"):
        layerlr.plot.history({"loss": [1.0]})
    with pytest.raises(TypeError, match="History returned by model.fit"):
        layerlr.plot.history([1.0, 2.0])


def test_clear_error_without_matplotlib(monkeypatch):
    model, _, opt = model_and_optimizer()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "layerlr\[plot\]"'):
        layerlr.plot.learning_rates(model, opt)


def _visible_labels(fig, axis):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()  # lays out the text, so that extents are real
    renderer = fig.canvas.get_renderer()
    labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in labels], renderer


def _overlapping(boxes):
    return [(a, b) for i, (a, ea) in enumerate(boxes) for b, eb in boxes[i + 1:] if ea.overlaps(eb)]


@pytest.mark.parametrize("lr, mult", [(5e-4, 0.3), (1e-3, 0.01), (1e-2, 1e-5)])
def test_rate_labels_never_overlap_and_every_row_is_inside_the_frame(lr, mult):
    model, backbone, _ = model_and_optimizer()
    model.get_layer("neck").trainable = False  # a text row in the middle
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.Adam(lr), lr_mult=[(backbone.get_layer("b1"), 0.0), ("head", mult)]
    )
    fig = layerlr.plot.learning_rates(model, opt)
    ax = fig.axes[0]
    labels, renderer = _visible_labels(fig, ax.xaxis)
    assert len(labels) >= 2, labels  # the scale can be read
    assert _overlapping(labels) == []
    # Text-only rows sit at the top (b1: lr_mult 0) and in the middle (neck): inside the frame.
    assert [t.get_text().strip() for t in ax.texts] == ["lr_mult 0: not updated", "frozen"]
    frame = ax.get_window_extent(renderer)
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1, text.get_text()


UPDATES = {
    "step": [0, 10, 20, 30],
    "update_ratio/backbone": [np.nan, np.nan, 2e-5, 1e-5],
    "status/backbone": ["frozen", "frozen", "trained", "trained"],
    "update_ratio/embeddings": [0.0, 0.0, 0.0, 4e-4],
    "status/embeddings": ["not updated"] * 3 + ["trained"],
    "update_ratio/default": [3e-3, 2e-3, 1e-3, 1e-3],
    "status/default": ["trained"] * 4,
    "grad_norm/default": [1.0, 1.0, 1.0, 1.0],
}


def test_update_ratios_lines_band_and_idle_phases(tmp_path):
    fig = layerlr.plot.update_ratios(UPDATES, path=tmp_path / "updates.png")
    assert (tmp_path / "updates.png").read_bytes()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "training step"
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert set(lines) == {"backbone", "embeddings", "default"}
    assert list(lines["default"].get_xdata()) == [0, 10, 20, 30]
    np.testing.assert_array_equal(lines["default"].get_ydata(), [3e-3, 2e-3, 1e-3, 1e-3])
    # Frozen and not-updated steps are not on the log scale...
    np.testing.assert_array_equal(lines["backbone"].get_ydata(), [np.nan, np.nan, 2e-5, 1e-5])
    np.testing.assert_array_equal(lines["embeddings"].get_ydata(), [np.nan] * 3 + [4e-4])
    # ... but drawn along the bottom, labelled, in the group's color.
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["backbone: frozen", "embeddings: not updated"]
    bars = [line for line in ax.lines if line.get_label().startswith("_")
            and line.get_color() == lines["backbone"].get_color() and line.get_linewidth() == 5]
    assert len(bars) == 1 and list(bars[0].get_xdata()) == [-5.0, 15.0]  # steps 0-10, half a step around
    # The reference band around 1e-3 per step, inside the visible range with every value.
    (band,) = [p for p in ax.patches if p.get_label().startswith("~1e-3")]
    lo, hi = ax.get_ylim()
    assert lo < 1e-5 and hi > 3e-3
    assert layerlr.plot.REFERENCE_BAND == (3e-4, 3e-3)
    labels_on_y, renderer = _visible_labels(fig, ax.yaxis)
    assert _overlapping(labels_on_y) == []
    frame = ax.get_window_extent(renderer)
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0, text.get_text()


def test_update_ratios_from_a_history_or_epoch_logs_and_bad_input():
    class FakeHistory:
        history = {"loss": [1.0, 0.5], "update_ratio/default": [2e-3, 1e-3]}
        layerlr_updates = UPDATES

    fig = layerlr.plot.update_ratios(FakeHistory())
    assert fig.axes[0].get_xlabel() == "training step"
    del FakeHistory.layerlr_updates
    fig = layerlr.plot.update_ratios(FakeHistory())  # per epoch, from 1
    (line,) = [line for line in fig.axes[0].lines if line.get_label() == "default"]
    assert list(line.get_xdata()) == [1, 2]
    assert fig.axes[0].get_xlabel().startswith("epoch")
    with pytest.raises(ValueError, match="UpdateLogger"):
        layerlr.plot.update_ratios({"loss": [1.0]})
    with pytest.raises(TypeError, match="UpdateLogger, the History"):
        layerlr.plot.update_ratios([1e-3])
