"""The fine-tuning demo: its data, its rules, and a quick end-to-end run.

The run checks what must hold whatever the accuracies turn out to be: a frozen
backbone does not move and keeps the old head's accuracy exactly, a backbone at
1/100 of the rate moves far less, and every file the demo promises is written.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from layerlr import demo  # noqa: E402
from layerlr.cli import main  # noqa: E402


def test_tasks_are_disjoint_and_fixed():
    a = demo.digits_tasks(labelled_per_class=10, seed=0)
    b = demo.digits_tasks(labelled_per_class=10, seed=1)
    x, y = a["new_train"]
    assert x.shape == (50, 8, 8, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(y).tolist() == [10] * 5
    assert set(a["old_train"][1]) == set(range(5)) and set(a["new_test"][1]) == set(range(5))
    # The held-out sets do not depend on the seed; the labelled subset does.
    for name in ("old_train", "old_test", "new_test"):
        np.testing.assert_array_equal(a[name][0], b[name][0])
    assert not np.array_equal(a["new_train"][0], b["new_train"][0])
    # No labelled image is in the new-task test set (compared pixel by pixel).
    test_images = {img.tobytes() for img in a["new_test"][0]}
    assert not any(img.tobytes() in test_images for img in x)
    assert len(a["old_test"][0]) + len(a["old_train"][0]) == 901  # digits 0-4


def test_layer_decay_rules_by_hand():
    assert demo.layer_decay_rules(0.5) == {
        "conv5": 0.5, "conv4": 0.25, "conv3": 0.125, "conv2": 0.0625, "conv1": 0.03125,
    }


def test_quick_demo_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--out-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Epoch 1/" not in printed  # no progress bars unless --verbose
    assert len(printed.splitlines()) < 120
    assert "LayerwiseOptimizer(Adam) at step 0" in printed  # the summary before fit
    for method in demo.METHODS:
        assert any(line.startswith(method) for line in printed.splitlines()), method

    expected = {
        "comparison.png", "results.json", "per_layer_rates.keras",
        "per_layer_rates_learning_rates.png", "layer_wise_decay.keras",
        "layer_wise_decay_learning_rates.png", "update_ratios.png",
    }
    assert expected <= set(os.listdir(out_dir))
    summary = json.loads((out_dir / "results.json").read_text())
    methods = summary["methods"]
    assert list(methods) == list(demo.METHODS)
    for results in methods.values():
        for value in results["new_accuracy"] + results["old_accuracy"]:
            assert 0.0 <= value <= 1.0
    # Pretraining works even in the quick mode (5 classes: chance is 0.2).
    assert summary["pretrained_old_accuracy"] > 0.8

    frozen = methods["frozen backbone"]
    assert frozen["backbone_change"] == [0.0]
    assert frozen["old_accuracy"] == [summary["pretrained_old_accuracy"]]
    one_lr = methods["one learning rate"]["backbone_change"][0]
    per_layer = methods["per-layer rates"]["backbone_change"][0]
    assert 0.0 < per_layer < one_lr / 10  # 1e-5 vs 1e-3

    # The update ratios of seed 0, per layer: at 1/100 of the rate the
    # backbone moves far less per step than with one learning rate.
    updates = summary["updates_seed_0"]
    assert list(updates) == list(demo.METHODS)
    for method in ("one learning rate", "per-layer rates"):
        assert {k for k in updates[method] if k.startswith("update_ratio/")} == {
            f"update_ratio/{n}" for n in ("conv1", "conv2", "conv3", "conv4", "conv5", "new_conv", "new_head")
        }
    one = np.mean(updates["one learning rate"]["update_ratio/conv3"])
    slow = np.mean(updates["per-layer rates"]["update_ratio/conv3"])
    assert 0 < slow < one / 10
    assert set(updates["frozen backbone"]["status/conv1"]) == {"frozen"}

    # The saved per-layer model is inspectable and kept its multipliers.
    assert main(["inspect", str(out_dir / "per_layer_rates.keras"), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    backbone = [r for r in records if r["lr_rule"] == "layer 'backbone'"]
    assert len(backbone) == 10 and {r["lr_mult"] for r in backbone} == {0.01}
    assert {r["lr_mult"] for r in records if r not in backbone} == {1.0}


def test_verbose_and_quiet_are_exclusive():
    with pytest.raises(SystemExit, match="--quiet and --verbose"):
        main(["demo", "--quick", "--quiet", "--verbose"])
