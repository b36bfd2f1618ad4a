"""Fine-tune a pretrained conv net with per-layer learning rates.

A small 5-convolution network is pretrained on the digits 0-4 (scikit-learn's
8x8 digits, no download), then gets a new convolution layer and head for the
digits 5-9. The pretrained layers train at 1e-5 and the new ones at 1e-3 with
one Adam optimizer; at the end we print how far each group of weights moved.

    pip install "layerlr[demo]"
    python examples/finetune.py

For the full comparison with other strategies, run `layerlr demo`.
"""

import numpy as np
import keras
from sklearn.datasets import load_digits

import layerlr

keras.utils.set_random_seed(0)
images, labels = load_digits(return_X_y=True)
images = (images / 16.0).reshape(-1, 8, 8, 1).astype("float32")
old, new = labels < 5, labels >= 5


def conv(filters, name):
    return keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=name)


# 1. "Pretrained" backbone: 5 conv layers trained on digits 0-4.
backbone = keras.Sequential(
    [keras.Input((8, 8, 1)), conv(16, "conv1"), conv(16, "conv2"),
     keras.layers.MaxPooling2D(), conv(32, "conv3"), conv(32, "conv4"), conv(32, "conv5")],
    name="backbone",
)
pretrain = keras.Sequential(
    [backbone, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5, activation="softmax")]
)
pretrain.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
pretrain.fit(images[old], labels[old], epochs=8, batch_size=32, verbose=0)
print(f"pretrained on 0-4: training accuracy {pretrain.evaluate(images[old], labels[old], verbose=0)[1]:.3f}")

# 2. New conv layer and head on top, for digits 5-9.
model = keras.Sequential(
    [keras.Input((8, 8, 1)), backbone, conv(32, "new_conv"),
     keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5, activation="softmax", name="new_head")],
    name="finetune",
)
optimizer = layerlr.LayerwiseOptimizer(
    keras.optimizers.Adam(1e-3),  # the new layers' rate
    lr_mult={backbone: 0.01},  # pretrained layers: 1e-3 * 0.01 = 1e-5
)
model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
layerlr.summary(model)  # which variable gets which rate, before training

x, y = images[new], labels[new] - 5
split = len(x) // 2
before = {v.path: np.array(v.numpy()) for v in model.trainable_variables}
model.fit(x[:split], y[:split], epochs=10, batch_size=16, verbose=2)
print(f"new task (5-9) held-out accuracy: {model.evaluate(x[split:], y[split:], verbose=0)[1]:.3f}")

# 3. How far each group moved: ||W - W0|| / ||W0|| over the group's variables.
groups = {}
for v in model.trainable_variables:
    rate = 1e-3 * optimizer.multipliers[v.path].lr_mult
    delta, start = groups.setdefault(rate, [0.0, 0.0])
    groups[rate] = [delta + np.sum((np.array(v.numpy()) - before[v.path]) ** 2),
                    start + np.sum(before[v.path] ** 2)]
for rate, (delta, start) in sorted(groups.items()):
    print(f"variables at lr {rate:.0e}: moved {100 * np.sqrt(delta / start):.2f}% of their norm")
