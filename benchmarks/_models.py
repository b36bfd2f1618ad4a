"""The benchmark models and, for each, its per-layer rates written two ways.

Every model comes with
- ``lr_rules`` / ``decay_rules``: what a layerlr user writes;
- ``group_of(path) -> (lr_mult, decay_mult)``: the same assignment written by
  hand from the variable path, which the contenders that need explicit groups
  (MultiOptimizer, split list, gradient scaling) are built from. Keeping the two
  independent is what lets the weight check catch a resolution bug;
- ``group_regex``: for MultiOptimizer's OptimizerMap, one ``re.fullmatch``
  pattern per group, as a user of Keras' own tool would write it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import keras
import numpy as np


@dataclass
class Spec:
    name: str
    title: str
    model: keras.Model
    optimizer: Callable[..., keras.optimizers.Optimizer]
    optimizer_kwargs: dict
    lr_rules: list
    decay_rules: list
    group_of: Callable[[str], tuple[float, float]]
    group_regex: dict = field(default_factory=dict)  # (lr, decay) -> fullmatch pattern
    x: np.ndarray | None = None  # one batch per check step; timing reuses batch 0
    y: np.ndarray | None = None

    @property
    def n_groups(self) -> int:
        return len({self.group_of(v.path) for v in self.model.trainable_variables})


# --- 1. fine-tuning a 5-conv backbone with a new conv + head ------------------

def conv_finetune(batch: int, steps: int, size: int = 32, seed: int = 0) -> Spec:
    inputs = keras.Input((size, size, 3), name="image")
    h = inputs
    for i, (filters, stride) in enumerate([(16, 1), (16, 2), (32, 1), (32, 2), (64, 1)]):
        h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same",
                                activation="relu", name=f"backbone_conv{i + 1}")(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="new_conv")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    outputs = keras.layers.Dense(10, name="head")(h)
    model = keras.Model(inputs, outputs, name="conv_finetune")

    def group_of(path):
        layer, name = path.split("/")[-2:]
        lr = 0.01 if layer.startswith("backbone_conv") else 1.0
        return lr, (0.0 if name == "bias" else 1.0)

    rng = np.random.default_rng(seed)
    return Spec(
        name="conv",
        title="5-conv backbone (lr x0.01) + new conv + head, AdamW, bias decay x0",
        model=model,
        optimizer=keras.optimizers.AdamW,
        optimizer_kwargs=dict(learning_rate=1e-3, weight_decay=0.05),
        lr_rules=[("backbone_conv*", 0.01)],
        decay_rules=[("*bias", 0.0)],
        group_of=group_of,
        group_regex={
            (0.01, 1.0): r"backbone_conv\d/kernel",
            (0.01, 0.0): r"backbone_conv\d/bias",
            (1.0, 1.0): r"(new_conv|head)/kernel",
            (1.0, 0.0): r"(new_conv|head)/bias",
        },
        x=rng.normal(size=(steps, batch, size, size, 3)).astype("float32"),
        y=rng.integers(0, 10, size=(steps, batch)).astype("int32"),
    )


# --- 2. a 4-block pre-LN transformer encoder ----------------------------------

BLOCKS = 4


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned (seq, dim) table; one trainable variable."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=tuple(input_shape[1:]), name="table",
                                     initializer=keras.initializers.RandomNormal(stddev=0.02))

    def call(self, x):
        return x + self.table


def _encoder(vocab: int, seq: int, dim: int, heads: int) -> keras.Model:
    tokens = keras.Input((seq,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(vocab, dim, name="embed")(tokens)
    h = PositionEmbedding(name="pos_embed")(h)
    for b in range(BLOCKS):
        a = keras.layers.LayerNormalization(name=f"b{b}_ln1")(h)
        # use_bias=False as in most current encoders; keeps ~50 variables.
        a = keras.layers.MultiHeadAttention(heads, dim // heads, use_bias=False,
                                            name=f"b{b}_attn")(a, a)
        h = h + a
        f = keras.layers.LayerNormalization(name=f"b{b}_ln2")(h)
        f = keras.layers.Dense(4 * dim, activation="gelu", name=f"b{b}_ffn1")(f)
        f = keras.layers.Dense(dim, name=f"b{b}_ffn2")(f)
        h = h + f
    h = keras.layers.LayerNormalization(name="final_ln")(h)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    outputs = keras.layers.Dense(10, name="head")(h)
    return keras.Model(tokens, outputs, name="encoder")


def _depth(path: str) -> int:
    """Layer-wise decay depth 0..9: embeddings, (attention, ffn) x 4 blocks, top."""
    layer = path.split("/")[0]
    if layer in ("embed", "pos_embed"):
        return 0
    m = re.fullmatch(r"b(\d)_(ln1|attn|ln2|ffn1|ffn2)", layer)
    if m:
        block, part = int(m.group(1)), m.group(2)
        return 1 + 2 * block + (0 if part in ("ln1", "attn") else 1)
    return 9  # final_ln, head


DECAY = 0.8


def transformer_lld(batch: int, steps: int, seq: int = 32, dim: int = 64,
                    vocab: int = 1000, seed: int = 0) -> Spec:
    model = _encoder(vocab, seq, dim, heads=4)
    lr_rules = [(("embed", "pos_embed"), DECAY ** 9)]
    for b in range(BLOCKS):
        lr_rules.append(((f"b{b}_ln1", f"b{b}_attn"), DECAY ** (9 - (1 + 2 * b))))
        lr_rules.append(((f"b{b}_ln2", f"b{b}_ffn1", f"b{b}_ffn2"), DECAY ** (9 - (2 + 2 * b))))
    # final_ln and head are unmatched: lr_mult 1.0 = DECAY ** 0.

    def group_of(path):
        return DECAY ** (9 - _depth(path)), 1.0

    regex = {(DECAY ** 9, 1.0): r"(embed|pos_embed)/.*", (1.0, 1.0): r"(final_ln|head)/.*"}
    for b in range(BLOCKS):
        regex[(DECAY ** (9 - (1 + 2 * b)), 1.0)] = rf"b{b}_(ln1|attn)/.*"
        regex[(DECAY ** (9 - (2 + 2 * b)), 1.0)] = rf"b{b}_(ln2|ffn1|ffn2)/.*"
    rng = np.random.default_rng(seed)
    return Spec(
        name="tfm10",
        title=f"4-block encoder, layer-wise decay {DECAY}^depth (10 groups), Adam",
        model=model,
        optimizer=keras.optimizers.Adam,
        optimizer_kwargs=dict(learning_rate=1e-3),
        lr_rules=lr_rules,
        decay_rules=[],
        group_of=group_of,
        group_regex=regex,
        x=rng.integers(0, vocab, size=(steps, batch, seq)).astype("int32"),
        y=rng.integers(0, 10, size=(steps, batch)).astype("int32"),
    )


def transformer_per_variable(batch: int, steps: int, seed: int = 0, **kwargs) -> Spec:
    spec = transformer_lld(batch, steps, seed=seed, **kwargs)
    variables = spec.model.trainable_variables
    # A distinct rate for every variable: the worst case for anything that
    # keeps one optimizer (or one fused kernel) per group.
    mult = {v.path: round(0.99 ** i, 6) for i, v in enumerate(variables)}
    spec.name = "tfm_pv"
    spec.title = f"same encoder, one group per variable ({len(variables)} groups), Adam"
    spec.lr_rules = [(v, mult[v.path]) for v in variables]
    spec.group_of = lambda path: (mult[path], 1.0)
    spec.group_regex = {(mult[v.path], 1.0): re.escape(v.path) for v in variables}
    return spec


# --- 3. optimizer-bound: big embedding, small dense stack, tiny batch -----------

def embedding_bound(batch: int, steps: int, vocab: int = 50_000, dim: int = 64,
                    seq: int = 8, seed: int = 0) -> Spec:
    tokens = keras.Input((seq,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(vocab, dim, name="embedding")(tokens)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    h = keras.layers.Dense(256, activation="relu", name="dense1")(h)
    h = keras.layers.Dense(256, activation="relu", name="dense2")(h)
    outputs = keras.layers.Dense(10, name="head")(h)
    model = keras.Model(tokens, outputs, name="embedding_bound")

    def group_of(path):
        layer = path.split("/")[0]
        return {"embedding": 0.1, "dense1": 0.5, "dense2": 0.5}.get(layer, 1.0), 1.0

    rng = np.random.default_rng(seed)
    return Spec(
        name="embed",
        title=f"optimizer-bound: Embedding({vocab}x{dim}) + 3 dense, batch {batch}, 3 groups, Adam",
        model=model,
        optimizer=keras.optimizers.Adam,
        optimizer_kwargs=dict(learning_rate=1e-3),
        lr_rules=[("embedding", 0.1), ("dense[12]", 0.5)],
        decay_rules=[],
        group_of=group_of,
        group_regex={(0.1, 1.0): r"embedding/.*", (0.5, 1.0): r"dense[12]/.*",
                     (1.0, 1.0): r"head/.*"},
        x=rng.integers(0, vocab, size=(steps, batch, seq)).astype("int32"),
        y=rng.integers(0, 10, size=(steps, batch)).astype("int32"),
    )


MODELS = {  # name -> factory(steps, tiny): tiny keeps the structure and groups, shrinks tensors
    "conv": lambda steps, tiny=False: conv_finetune(batch=8 if tiny else 32, steps=steps,
                                                    size=8 if tiny else 32),
    "tfm10": lambda steps, tiny=False: transformer_lld(batch=4 if tiny else 16, steps=steps,
                                                      seq=8 if tiny else 32),
    "tfm_pv": lambda steps, tiny=False: transformer_per_variable(
        batch=4 if tiny else 16, steps=steps, seq=8 if tiny else 32),
    "embed": lambda steps, tiny=False: embedding_bound(batch=8, steps=steps,
                                                       vocab=1000 if tiny else 50_000),
}
