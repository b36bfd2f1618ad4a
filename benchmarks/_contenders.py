"""The ways to train with per-layer rates that the benchmark compares.

Each contender owns its optimizer(s) and exposes one ``apply(grads, variables)``
that the backend harness calls inside its compiled training step, so every
contender runs through exactly the same step code; only the optimizer part
differs. All are built from the same ``Spec`` (same optimizer class and
hyperparameters, same groups).
"""

from __future__ import annotations

import numpy as np
import keras

import layerlr

from benchmarks._models import Spec


def _group_optimizer(spec: Spec, lr_mult: float, decay_mult: float):
    """The spec's optimizer at lr * lr_mult and wd * decay_mult (a param group)."""
    kwargs = dict(spec.optimizer_kwargs)
    # Round as float32 does inside the hook (lr tensor * python float), so the
    # reference and layerlr see the same effective rate.
    kwargs["learning_rate"] = float(np.float32(kwargs["learning_rate"]) * np.float32(lr_mult))
    if kwargs.get("weight_decay") is not None:
        kwargs["weight_decay"] = kwargs["weight_decay"] * decay_mult
    return spec.optimizer(**kwargs)


class Contender:
    @staticmethod
    def available(spec) -> bool:
        """Whether this contender runs on the current backend for this spec."""
        return True

    key: str = ""
    label: str = ""
    note: str = ""
    has_rates = True  # False for the plain optimizer: nothing to check

    def __init__(self, spec: Spec):
        self.spec = spec

    def build(self, variables) -> None:
        raise NotImplementedError

    def apply(self, grads, variables) -> None:
        raise NotImplementedError

    @property
    def optimizers(self) -> list:
        raise NotImplementedError

    @property
    def variables(self) -> list:
        return [v for opt in self.optimizers for v in opt.variables]

    @property
    def n_optimizers(self) -> int:
        """Keras optimizer instances doing the updates (each with its own state)."""
        return len(self.optimizers)


class Plain(Contender):
    key = "plain"
    label = "plain optimizer (no per-layer rates)"
    has_rates = False

    def __init__(self, spec):
        super().__init__(spec)
        self.optimizer = spec.optimizer(**spec.optimizer_kwargs)

    def build(self, variables):
        self.optimizer.build(variables)

    def apply(self, grads, variables):
        self.optimizer.apply(grads, variables)

    @property
    def optimizers(self):
        return [self.optimizer]


class Layerwise(Plain):
    key = "layerlr"
    label = "layerlr.LayerwiseOptimizer"
    has_rates = True

    def __init__(self, spec):
        Contender.__init__(self, spec)
        self.optimizer = layerlr.LayerwiseOptimizer(
            spec.optimizer(**spec.optimizer_kwargs),
            lr_mult=spec.lr_rules,
            decay_mult=spec.decay_rules,
        )

    def build(self, variables):
        self.optimizer.build(variables)
        # The rules and the hand-written groups must agree, or the weight check
        # below would compare two different trainings.
        for v in variables:
            m = self.optimizer.multipliers[v.path]
            if (m.lr_mult, m.decay_mult) != self.spec.group_of(v.path):
                raise AssertionError(
                    f"{self.spec.name}: rules give {v.path} "
                    f"{(m.lr_mult, m.decay_mult)}, the hand-written groups "
                    f"{self.spec.group_of(v.path)}"
                )


class Multi(Plain):
    key = "multi"
    label = "keras MultiOptimizer (1 optimizer/group)"

    def __init__(self, spec):
        Contender.__init__(self, spec)
        groups = {spec.group_of(v.path) for v in spec.model.trainable_variables}
        opts = {g: _group_optimizer(spec, *g) for g in sorted(groups)}
        default = opts.pop((1.0, 1.0), None) or spec.optimizer(**spec.optimizer_kwargs)
        mapping = keras.optimizers.OptimizerMap(default)
        for group, opt in opts.items():
            mapping[spec.group_regex[group]] = opt
        self.optimizer = keras.optimizers.MultiOptimizer(mapping)

    @property
    def n_optimizers(self):
        return len(self.optimizer.optimizers)


class Split(Contender):
    key = "split"
    label = "split variable list, 1 optimizer/group"

    def __init__(self, spec):
        super().__init__(spec)
        self.groups: dict[tuple[float, float], tuple] = {}

    def build(self, variables):
        indices: dict[tuple[float, float], list[int]] = {}
        for i, v in enumerate(variables):
            indices.setdefault(self.spec.group_of(v.path), []).append(i)
        for group, idx in indices.items():
            opt = _group_optimizer(self.spec, *group)
            opt.build([variables[i] for i in idx])
            self.groups[group] = (opt, tuple(idx))

    def apply(self, grads, variables):
        for opt, idx in self.groups.values():
            opt.apply([grads[i] for i in idx], [variables[i] for i in idx])

    @property
    def optimizers(self):
        return [opt for opt, _ in self.groups.values()]


def _scaled(grad, factor: float):
    if type(grad).__name__ == "IndexedSlices":  # TF embedding gradients
        import tensorflow as tf

        return tf.IndexedSlices(grad.values * factor, grad.indices, grad.dense_shape)
    return grad * factor


class GradientScaling(Plain):
    key = "gradscale"
    label = "gradient scaling (grad x lr_mult)"
    note = "incorrect for adaptive optimizers"
    has_rates = True

    def __init__(self, spec):
        super().__init__(spec)
        self.factors: tuple[float, ...] = ()

    def build(self, variables):
        self.optimizer.build(variables)
        # decay_mult cannot be expressed by scaling gradients: only lr_mult is used.
        self.factors = tuple(self.spec.group_of(v.path)[0] for v in variables)

    def apply(self, grads, variables):
        grads = [g if f == 1.0 else _scaled(g, f) for g, f in zip(grads, self.factors)]
        self.optimizer.apply(grads, variables)


class _StateBytes:
    """What `_variable_bytes` reads from a torch state tensor."""

    def __init__(self, tensor):
        self.shape = tuple(tensor.shape)
        self.dtype = str(tensor.dtype).replace("torch.", "")


class TorchNative(Contender):
    """torch.optim.AdamW(foreach=True), one param group per (lr_mult, decay_mult).

    What a PyTorch user writes; torch backend only, Adam/AdamW specs only.
    Its arithmetic is torch's (bias-corrected epsilon), not Keras', so its
    weights differ from the reference by about epsilon's effect.
    """

    key = "torch_native"
    label = "torch.optim.AdamW(foreach=True), param groups"
    note = "torch's own Adam arithmetic"
    # Not weight-checked: torch adds epsilon after the bias correction, so
    # early steps move differently from Keras' Adam by design.
    has_rates = False

    @staticmethod
    def available(spec) -> bool:
        return keras.backend.backend() == "torch" and spec.optimizer in (
            keras.optimizers.Adam, keras.optimizers.AdamW)

    def build(self, variables):
        import torch

        kwargs = self.spec.optimizer_kwargs
        weight_decay = kwargs.get("weight_decay") or 0.0
        groups: dict[tuple[float, float], list] = {}
        for v in variables:
            groups.setdefault(self.spec.group_of(v.path), []).append(v.value)
        lr = kwargs["learning_rate"]
        param_groups = [
            dict(params=params, lr=float(np.float32(lr) * np.float32(m)), weight_decay=weight_decay * d)
            for (m, d), params in groups.items()
        ]
        probe = self.spec.optimizer(**kwargs)
        self.params = [v.value for v in variables]
        self.optimizer = torch.optim.AdamW(
            param_groups, lr=lr, betas=(probe.beta_1, probe.beta_2), eps=probe.epsilon, foreach=True,
        )

    def apply(self, grads, variables):
        for p, g in zip(self.params, grads):
            if p.grad is not g:
                p.grad = g
        self.optimizer.step()

    @property
    def optimizers(self):
        return []

    @property
    def variables(self):
        return [_StateBytes(t) for state in self.optimizer.state.values() for t in state.values()
                if hasattr(t, "shape")]

    @property
    def n_optimizers(self):
        return 1


CONTENDERS = {c.key: c for c in (Plain, Layerwise, Multi, Split, GradientScaling, TorchNative)}
REFERENCE = "multi"  # what the trained weights are compared against
