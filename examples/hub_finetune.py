"""Fine-tune a KerasHub BERT classifier: layer-wise LR decay, no weight decay on
biases and norms, warmup, and (with --lora) LoRA adapters trained LoRA+ style.

The backbone is a small BertBackbone built from its config, with random
weights, so nothing is downloaded; with network access, use
``keras_hub.models.BertBackbone.from_preset("bert_tiny_en_uncased")`` instead
and the rest stays the same. The task is synthetic: does the sequence contain
token 7?

    pip install "layerlr[hub]"     # keras-hub (see the README for a lighter install)
    python examples/hub_finetune.py
    python examples/hub_finetune.py --lora
"""

from __future__ import annotations

import argparse

import keras
import keras_hub
import numpy as np

import layerlr

VOCAB, SEQ, TARGET = 64, 16, 7


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(8, VOCAB, size=(n, SEQ))
    labels = rng.integers(0, 2, size=n)
    # Positive examples get the target token somewhere.
    where = rng.integers(0, SEQ, size=n)
    tokens[labels == 1, where[labels == 1]] = TARGET
    x = {
        "token_ids": tokens.astype("int32"),
        "segment_ids": np.zeros((n, SEQ), "int32"),
        "padding_mask": np.ones((n, SEQ), "int32"),
    }
    return x, labels.astype("int32")


def build_classifier(num_layers: int = 3, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=num_layers, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=SEQ,
    )
    return keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)


def main(epochs: int = 10, lora: bool = False, n: int = 512, verbose: int = 1) -> dict:
    classifier = build_classifier()
    x, y = make_data(n)
    x_test, y_test = make_data(128, seed=1)
    steps = epochs * (n // 32)
    # Warmup over the first 20% of the steps, then cosine decay.
    warmup = max(1, steps // 5)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=steps - warmup, warmup_target=5e-3, warmup_steps=warmup
    )
    # Layer-wise decay: head 1.0, pooler 0.8, transformer_layer_2 0.64, ...,
    # embeddings (one step, below the first transformer layer) lowest.
    lr_mult = layerlr.layer_decay(classifier, 0.8)
    if lora:
        classifier.backbone.enable_lora(4)  # freezes the backbone, adds A and B
        # B at 16x the rate of A, at every depth.
        lr_mult = layerlr.lora_plus(classifier, 16.0, base=lr_mult)
    optimizer = layerlr.LayerwiseOptimizer(
        keras.optimizers.AdamW(schedule, weight_decay=0.01),
        lr_mult=lr_mult,
        decay_mult=layerlr.no_decay(classifier, embeddings=True),
    )
    classifier.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    if verbose and not lora:
        layerlr.summary(classifier, width=140)  # every variable's multipliers
    updates = layerlr.callbacks.UpdateLogger(every=max(1, steps // 12))
    history = classifier.fit(
        x, y, batch_size=32, epochs=epochs, verbose=0,
        callbacks=[layerlr.callbacks.LearningRateLogger(), updates],
    )
    accuracy = float(classifier.evaluate(x_test, y_test, verbose=0)[1])
    if verbose:
        print(f"training loss {history.history['loss'][0]:.3f} -> {history.history['loss'][-1]:.3f}; "
              f"held-out accuracy {accuracy:.3f}")
        print("update / weight ratio per step, at the start and the end:")
        for key in [k for k in updates.history if k.startswith("update_ratio/")]:
            values = [v for v in updates.history[key] if v > 0]  # NaN: frozen; 0: rate 0
            if values:
                print(f"  {key[len('update_ratio/'):]:22s} {values[0]:.2e} -> {values[-1]:.2e}")
    return {"model": classifier, "history": history.history, "updates": updates.history,
            "accuracy": accuracy, "steps": steps, "warmup": warmup}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", action="store_true", help="LoRA adapters with LoRA+ rates")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    main(epochs=args.epochs, lora=args.lora)
