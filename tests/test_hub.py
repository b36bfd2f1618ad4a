"""KerasHub backbones (built from configs, random weights: nothing is downloaded).

layer_decay gives every transformer layer its own depth and the embeddings the
lowest, with or without block_pattern; lora_plus trains LoRA's B matrices at
``ratio`` x the rate of A; examples/hub_finetune.py runs. Skipped without
keras-hub (``pip install "layerlr[hub]"``).
"""

import importlib.util
import pathlib

import numpy as np
import pytest
import keras

import layerlr

keras_hub = pytest.importorskip("keras_hub")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "hub_finetune.py"


def bert(num_layers=3):
    return keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=num_layers, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=16,
    )


EMBEDDINGS = {"token_embedding", "position_embedding", "segment_embedding", "embeddings_layer_norm"}


@pytest.mark.parametrize("block_pattern", [None, r"transformer_layer_(\d+)"])
def test_layer_decay_on_a_bert_classifier(block_pattern):
    classifier = keras_hub.models.BertTextClassifier(bert(), num_classes=2, preprocessor=None)
    rules = {layer.name: mult for layer, mult in
             layerlr.layer_decay(classifier, 0.5, block_pattern=block_pattern)}
    expected = {"logits": 1.0, "pooled_dense": 0.5, "transformer_layer_2": 0.25,
                "transformer_layer_1": 0.125, "transformer_layer_0": 0.0625}
    expected.update({name: 0.03125 for name in EMBEDDINGS})  # one step, the lowest
    assert rules == expected


@pytest.mark.parametrize("block_pattern", [None, r"transformer_layer_(\d+)"])
def test_layer_decay_on_a_gpt2_backbone(block_pattern):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=16,
        max_sequence_length=16,
    )
    rules = {layer.name: mult for layer, mult in
             layerlr.layer_decay(backbone, 0.5, block_pattern=block_pattern)}
    # The final layer_norm normalizes the last transformer layer's output: the same step.
    assert rules == {"transformer_layer_1": 1.0, "layer_norm": 1.0, "transformer_layer_0": 0.5,
                     "token_embedding": 0.25, "position_embedding": 0.25}


def one_sgd_step(model, opt):
    before = {v.path: np.array(keras.ops.convert_to_numpy(v.value)) for v in model.trainable_variables}
    opt.apply([keras.ops.ones(v.shape) for v in model.trainable_variables], model.trainable_variables)
    return {v.path: float(np.mean(before[v.path] - keras.ops.convert_to_numpy(v.value)))
            for v in model.trainable_variables}


def test_lora_plus_trains_b_at_ratio_times_a():
    backbone = bert(2)
    backbone.enable_lora(2)
    trainable = [v.path for v in backbone.trainable_variables]
    assert any(p.endswith("lora_kernel_b") for p in trainable)
    opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1), lr_mult=layerlr.lora_plus(backbone, 16.0))
    opt.build(backbone)
    moved = one_sgd_step(backbone, opt)  # SGD moves each variable by lr * gradient
    for path, step in moved.items():
        expected = 1.6 if path.endswith("lora_kernel_b") else 0.1
        assert step == pytest.approx(expected, rel=1e-5), path


def test_lora_plus_keeps_the_ratio_under_layer_decay():
    classifier = keras_hub.models.BertTextClassifier(bert(2), num_classes=2, preprocessor=None)
    base = layerlr.layer_decay(classifier, 0.5)
    classifier.backbone.enable_lora(2)
    opt = layerlr.LayerwiseOptimizer(
        keras.optimizers.SGD(0.1), lr_mult=layerlr.lora_plus(classifier, 4.0, base=base)
    )
    opt.build(classifier)
    moved = one_sgd_step(classifier, opt)
    depth = {"logits": 0, "transformer_layer_1": 2, "transformer_layer_0": 3}
    for path, step in moved.items():
        layer = path.split("/")[0]
        expected = 0.1 * 0.5 ** depth[layer] * (4.0 if path.endswith("lora_kernel_b") else 1.0)
        assert step == pytest.approx(expected, rel=1e-5), path


def test_lora_plus_refuses_a_model_without_adapters_and_bad_ratios():
    backbone = bert(1)
    with pytest.raises(ValueError, match="no LoRA adapters.*enable_lora"):
        layerlr.lora_plus(backbone)
    backbone.enable_lora(2)
    with pytest.raises(ValueError, match="ratio must be a finite number > 0"):
        layerlr.lora_plus(backbone, 0.0)
    with pytest.raises(TypeError, match="ratio must be a finite number"):
        layerlr.lora_plus(backbone, "16")


def load_example():
    spec = importlib.util.spec_from_file_location("hub_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_fine_tunes_with_layer_decay_no_decay_and_warmup():
    example = load_example()
    result = example.main(epochs=3, n=128, verbose=0)
    history, model = result["history"], result["model"]
    assert history["loss"][-1] < history["loss"][0]
    # Layer-wise decay 0.8: each transformer layer its own rate, the embeddings lowest.
    rates = {k[len("learning_rate/"):]: v[0] for k, v in history.items() if k.startswith("learning_rate/")}
    head = rates["logits"]
    for name, depth in (("pooled_dense", 1), ("transformer_layer_2", 2), ("transformer_layer_1", 3),
                        ("transformer_layer_0", 4), ("token_embedding", 5), ("embeddings_layer_norm", 5)):
        assert rates[name] == pytest.approx(head * 0.8 ** depth, rel=1e-5), name
    # Warmup: the head's rate after epoch 1 (4 of 12 steps, warmup over 2) is past the
    # warmup and on the cosine, below the 5e-3 target.
    schedule = model.optimizer.inner_optimizer._learning_rate
    assert float(schedule(0)) == 0.0 and float(schedule(result["warmup"])) == pytest.approx(5e-3)
    assert head == pytest.approx(float(schedule(4)), rel=1e-5)
    # No weight decay on biases, norms and embeddings.
    records = layerlr.summary_records(model)
    for r in records:
        no_decay = r["path"].endswith(("bias", "gamma", "beta", "embeddings")) or "norm" in r["layer"]
        assert (r["decay_mult"] == 0.0) == no_decay, r["path"]


def test_example_with_lora_trains_only_adapters_and_head():
    example = load_example()
    result = example.main(epochs=1, n=64, lora=True, verbose=0)
    rates = {k[len("learning_rate/"):]: v[-1] for k, v in result["history"].items()
             if k.startswith("learning_rate/")}
    b = "transformer_layer_0/self_attention_layer/query/lora_kernel_b"
    assert rates[b] == pytest.approx(16.0 * rates["transformer_layer_0"], rel=1e-5)
    statuses = {k[len("status/"):]: v[-1] for k, v in result["updates"].items() if k.startswith("status/")}
    assert statuses["token_embedding"] == "frozen" and statuses[b] == "trained"
