"""The independent reference for variables that start training late: PyTorch.

A parameter added to a ``torch.optim`` optimizer with ``add_param_group`` at
step k gets fresh state and counts its own steps from k; that is the semantics
layerlr promises. The network is written in plain torch (``x @ W + b``, the
Keras Dense layout), trained on the same batches, and each parameter has its
own group (its own lr and weight decay). Lion and Lamb, which torch lacks, are
written here from their published updates, with per-parameter state.
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-12  # Keras and torch put epsilon in slightly different places: make it vanish

# name -> (keras class name, keras kwargs, torch factory(params, lr, wd))
KERAS_KWARGS = {
    "sgd": dict(momentum=0.9),
    "adam": dict(epsilon=EPS),
    "adamw": dict(epsilon=EPS, weight_decay=0.05),
    "nadam": dict(epsilon=EPS),
    "adamax": dict(epsilon=EPS),
    "rmsprop": dict(rho=0.9, epsilon=EPS),
    "adagrad": dict(initial_accumulator_value=0.1, epsilon=EPS),
    "lion": dict(),
    "lamb": dict(epsilon=EPS),
    "adafactor": dict(),
}
KERAS_CLASS = {
    "sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "nadam": "Nadam", "adamax": "Adamax",
    "rmsprop": "RMSprop", "adagrad": "Adagrad", "lion": "Lion", "lamb": "Lamb", "adafactor": "Adafactor",
}


class Lion(torch.optim.Optimizer):
    """Chen et al. 2023, with decoupled weight decay as Keras applies it."""

    def __init__(self, params, lr, beta_1=0.9, beta_2=0.99, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, beta_1=beta_1, beta_2=beta_2, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                m = state.setdefault("m", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.sub_(group["lr"] * torch.sign(group["beta_1"] * m + (1 - group["beta_1"]) * p.grad))
                m.mul_(group["beta_2"]).add_((1 - group["beta_2"]) * p.grad)


class Lamb(torch.optim.Optimizer):
    """You et al. 2020 (Adam moments, layer-wise trust ratio), per-parameter step."""

    def __init__(self, params, lr, beta_1=0.9, beta_2=0.999, eps=EPS, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, beta_1=beta_1, beta_2=beta_2, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["beta_1"], group["beta_2"]
            for p in group["params"]:
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                m = state.setdefault("m", torch.zeros_like(p))
                v = state.setdefault("v", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                m.mul_(b1).add_((1 - b1) * p.grad)
                v.mul_(b2).add_((1 - b2) * p.grad * p.grad)
                update = (m / (1 - b1 ** state["step"])) / (
                    torch.sqrt(v / (1 - b2 ** state["step"])) + group["eps"])
                w_norm, u_norm = torch.linalg.norm(p), torch.linalg.norm(update)
                ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
                p.sub_(group["lr"] * ratio * update)


class Adafactor(torch.optim.Optimizer):
    """Shazeer & Stern 2018 with relative step sizes, as Keras' defaults configure it."""

    def __init__(self, params, lr, beta_2_decay=-0.8, epsilon_1=1e-30, epsilon_2=1e-3, clip_threshold=1.0):
        super().__init__(params, dict(lr=lr, beta_2_decay=beta_2_decay, epsilon_1=epsilon_1,
                                      epsilon_2=epsilon_2, clip_threshold=clip_threshold))

    @staticmethod
    def _rms(x):
        return torch.sqrt(torch.mean(x * x))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = t = state.get("step", 0) + 1
                rho = min(group["lr"], 1 / t ** 0.5)
                alpha = max(group["epsilon_2"], float(self._rms(p))) * rho
                g2 = p.grad * p.grad + group["epsilon_1"]
                beta = 1 - t ** group["beta_2_decay"]
                if p.dim() >= 2:
                    r = state.setdefault("r", torch.zeros(p.shape[:-1]))
                    c = state.setdefault("c", torch.zeros(p.shape[:-2] + p.shape[-1:]))
                    r.mul_(beta).add_((1 - beta) * g2.mean(dim=-1))
                    c.mul_(beta).add_((1 - beta) * g2.mean(dim=-2))
                    v = (r / r.mean(dim=-1, keepdim=True)).unsqueeze(-1) * c.unsqueeze(-2)
                else:
                    v = state.setdefault("v", torch.zeros_like(p))
                    v.mul_(beta).add_((1 - beta) * g2)
                u = p.grad / torch.sqrt(v)
                u = u / max(1.0, float(self._rms(u)) / group["clip_threshold"])
                p.sub_(alpha * u)


def _group(name: str, param, lr: float, wd: float) -> dict:
    group = {"params": [param], "lr": lr}
    if name in ("adamw", "lion", "lamb"):
        group["weight_decay"] = wd
    return group


def make(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    kw = KERAS_KWARGS[name]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=kw["momentum"])
    if name == "adam":
        return torch.optim.Adam(groups, lr=0.0, eps=EPS)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, eps=EPS)
    if name == "nadam":
        # Keras' momentum schedule is 0.96 ** step, torch's 0.96 ** (step * momentum_decay).
        return torch.optim.NAdam(groups, lr=0.0, eps=EPS, momentum_decay=1.0)
    if name == "adamax":
        return torch.optim.Adamax(groups, lr=0.0, eps=EPS)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=0.0, alpha=kw["rho"], eps=EPS)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=0.0, initial_accumulator_value=0.1, eps=EPS)
    if name == "lion":
        return Lion(groups, lr=0.0)
    if name == "lamb":
        return Lamb(groups, lr=0.0)
    if name == "adafactor":
        return Adafactor(groups, lr=0.0)
    raise KeyError(name)


def train(
    name: str,
    weights: list[np.ndarray],
    batches: list[tuple[np.ndarray, np.ndarray]],
    rates: list[float],
    decays: list[float],
    starts: list[int],
    accumulate: int = 1,
    ema_momentum: float | None = None,
):
    """Trains ``tanh(x @ W1 + b1) @ W2 + b2`` on ``batches`` with MSE.

    ``weights`` are [W1, b1, W2, b2]; parameter i has lr ``rates[i]``, weight
    decay ``decays[i]`` and joins the optimizer (``add_param_group``) before
    step ``starts[i]``. ``accumulate`` micro-batches are averaged into one
    step. With ``ema_momentum``, also returns each parameter's moving average,
    starting at its value after its first step (as Keras does at step 0).
    Returns the final weights (and averages).
    """
    params = [torch.tensor(w, dtype=torch.float32, requires_grad=True) for w in weights]
    optimizer = None
    averages: list = [None] * len(params)
    for step in range(len(batches) // accumulate):
        joining = [i for i, s in enumerate(starts) if s == step]
        if joining:
            groups = [_group(name, params[i], rates[i], decays[i]) for i in joining]
            if optimizer is None:
                optimizer = make(name, groups)
            else:
                for group in groups:
                    optimizer.add_param_group(group)
        grads = [torch.zeros_like(p) for p in params]
        for x, y in batches[step * accumulate:(step + 1) * accumulate]:
            w1, b1, w2, b2 = params
            out = torch.tanh(torch.from_numpy(x) @ w1 + b1) @ w2 + b2
            loss = torch.mean((out - torch.from_numpy(y)) ** 2)
            for g, d in zip(grads, torch.autograd.grad(loss, params)):
                g += d / accumulate
        for p, g in zip(params, grads):
            p.grad = g
        if optimizer is not None:
            optimizer.step()
        if ema_momentum is not None:
            with torch.no_grad():
                for i, p in enumerate(params):
                    if step < starts[i]:
                        continue
                    if averages[i] is None:
                        averages[i] = p.detach().clone()
                    else:
                        averages[i] = ema_momentum * averages[i] + (1 - ema_momentum) * p.detach()
    final = [p.detach().numpy().copy() for p in params]
    if ema_momentum is None:
        return final
    return final, [None if a is None else a.numpy().copy() for a in averages]
