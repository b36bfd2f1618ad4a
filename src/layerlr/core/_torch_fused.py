"""Keras' nine fused torch optimizers, with a learning rate per tensor.

Each function mirrors ``keras/src/backend/torch/optimizers/torch_<name>.py``
(checked: Keras 3.15.1) operation for operation, except that every scalar that
depends on the learning rate or on the step count is a list with one Python
float per tensor (``torch._foreach_*`` "ScalarList" overloads, reached through
`_keras.torch_foreach`). That lets one fused call per operation update variables with different multipliers and
different start steps, where Keras' own step takes one rate and one step count.

The per-tensor scalars are computed on the host in float32, once per distinct
(rate, start step), never per variable: products and quotients with
``numpy.float32`` (IEEE-rounded, like torch's), powers and square roots with
torch's own ops on 0-d tensors, as Keras does (numpy's can differ by an ulp). Where Keras passes its rate as
``alpha=`` (one scalar per call, no ScalarList overload), the product is taken
first: the same value up to one rounding.

Arguments of every step: ``inner`` the optimizer, ``grads``, ``values`` (the
variables' torch tensors), ``indices`` (their slot indices), ``rates`` (one
float32 rate per tensor: ``lr * lr_mult``), ``starts`` (each tensor's start
step), ``iterations`` (the optimizer's step, a Python int), ``late_state``
(per start step copies of once-per-step state) and ``dtype``.
"""

from __future__ import annotations

import numpy as np
import torch
from keras import ops

from layerlr.core import _keras

foreach = _keras.torch_foreach()

ONE = np.float32(1.0)


def _per_start(starts, compute):
    """``compute(start)`` once per distinct start step, listed per tensor."""
    cache: dict = {}
    for start in starts:
        if start not in cache:
            cache[start] = compute(start)
    return [cache[s] for s in starts]


def _floats(values):
    return [float(v) for v in values]


def _single(rates):
    """The one rate all tensors share, or None.

    Keras passes its rate as ``alpha=`` to ``_foreach_add_``, which has no
    per-tensor form; with one rate that call is kept, so that multipliers of 1
    stay bit-identical to the plain optimizer.
    """
    first = rates[0]
    return float(first) if all(rate == first for rate in rates) else None


def _slots(inner, name, indices):
    slots = getattr(inner, name)
    return [slots[i].value for i in indices]



def _adam_moments(inner, indices, grads):
    """Adam's and Nadam's moment updates, as Keras' fused steps write them."""
    m_list = _slots(inner, "_momentums", indices)
    v_list = _slots(inner, "_velocities", indices)
    foreach.mul_(m_list, inner.beta_1)
    foreach.add_(m_list, grads, alpha=1 - inner.beta_1)
    foreach.mul_(v_list, inner.beta_2)
    foreach.add_(v_list, foreach.mul(grads, grads), alpha=1 - inner.beta_2)
    return m_list, v_list

def _scalar(value, dtype):
    return torch.tensor(value, dtype=dtype)


def _host(tensor) -> np.float32:
    return np.float32(ops.convert_to_numpy(tensor))


def adam(inner, grads, values, indices, rates, starts, iterations, late_state, dtype):
    if not values:
        return

    def powers(start):
        # In torch: its pow and sqrt round differently from numpy's. Raw CPU
        # ops (what Keras' ops.power/ops.sqrt call), without Keras' dispatch.
        local_step = _scalar(iterations - start + 1, dtype)
        beta_1_power = torch.pow(_scalar(inner.beta_1, dtype), local_step)
        beta_2_power = torch.pow(_scalar(inner.beta_2, dtype), local_step)
        return np.float32(torch.sqrt(1 - beta_2_power).item()), np.float32((1 - beta_1_power).item())

    bias = _per_start(starts, powers)
    # Keras: alpha = lr * sqrt(1 - beta_2_power) / (1 - beta_1_power)
    alphas = _floats((rate * root) / denominator for rate, (root, denominator) in zip(rates, bias))

    m_list, v_list = _adam_moments(inner, indices, grads)
    if inner.amsgrad:
        v_hat_list = _slots(inner, "_velocity_hats", indices)
        foreach.maximum_(v_hat_list, v_list)
        v_list = v_hat_list
    foreach.add_(
        values,
        foreach.div(
            foreach.mul(m_list, alphas),
            foreach.add(foreach.sqrt(v_list), inner.epsilon),
        ),
        alpha=-1,
    )


def adamax(inner, grads, values, indices, rates, starts, iterations, late_state, dtype):
    if not values:
        return

    def correction(start):
        local_step = _scalar(iterations - start + 1, dtype)
        return float(ONE - np.float32(torch.pow(_scalar(inner.beta_1, dtype), local_step).item()))

    m_list = _slots(inner, "_m", indices)
    u_list = _slots(inner, "_u", indices)
    foreach.mul_(m_list, inner.beta_1)
    foreach.add_(m_list, grads, alpha=1 - inner.beta_1)
    foreach.mul_(u_list, inner.beta_2)
    foreach.maximum_(u_list, foreach.abs(grads))
    foreach.add_(
        values,
        foreach.div(
            foreach.mul(m_list, _floats(rates)),
            foreach.mul(foreach.add(u_list, inner.epsilon), _per_start(starts, correction)),
        ),
        alpha=-1,
    )


def nadam(inner, grads, values, indices, rates, starts, iterations, late_state, dtype):
    # The momentum product advances once per step for every start step
    # (trained this step or not), from the start step's own count.
    products = {0: _keras.nadam_product(inner), **{s: _keras.nadam_product(state) for s, state in late_state.items()}}
    scalars = {}
    for start, product in products.items():
        local = iterations - start
        if local < 0:
            continue  # not started: its product holds (as advance_late_state does)
        local_step = ops.cast(local + 1, dtype)
        next_step = ops.cast(local + 2, dtype)
        decay = ops.cast(0.96, dtype)
        beta_1 = ops.cast(inner.beta_1, dtype)
        beta_2 = ops.cast(inner.beta_2, dtype)
        u_t = beta_1 * (1.0 - 0.5 * (ops.power(decay, local_step)))
        u_t_1 = beta_1 * (1.0 - 0.5 * (ops.power(decay, next_step)))
        u_product_t = product.value * u_t
        u_product_t_1 = u_product_t * u_t_1
        beta_2_power = ops.power(beta_2, local_step)
        product.assign(u_product_t)
        scalars[start] = (
            float(_host(u_t_1)),
            float(ONE - _host(u_product_t_1)),
            float(_host(1 - u_t)),
            float(ONE - _host(u_product_t)),
            float(_host(1 - beta_2_power)),
        )
    if not values:
        return
    u_t_1, one_minus_product_1, one_minus_u_t, one_minus_product, one_minus_beta_2_power = (
        list(column) for column in zip(*(scalars[s] for s in starts))
    )

    m_list, v_list = _adam_moments(inner, indices, grads)
    m_hat_list = foreach.add(
        foreach.div(foreach.mul(m_list, u_t_1), one_minus_product_1),
        foreach.div(foreach.mul(grads, one_minus_u_t), one_minus_product),
    )
    v_hat_list = foreach.div(v_list, one_minus_beta_2_power)
    foreach.add_(
        values,
        foreach.div(
            foreach.mul(m_hat_list, _floats(rates)),
            foreach.add(foreach.sqrt(v_hat_list), inner.epsilon),
        ),
        alpha=-1,
    )


def adadelta(inner, grads, values, indices, rates, starts, iterations, late_state, dtype):
    if not values:
        return
    rho = inner.rho
    accumulated_grads = _slots(inner, "_accumulated_grads", indices)
    accumulated_delta_vars = _slots(inner, "_accumulated_delta_vars", indices)
    foreach.mul_(accumulated_grads, rho)
    foreach.add_(accumulated_grads, foreach.mul(grads, grads), alpha=1 - rho)

    def rms(x):
        return foreach.sqrt(foreach.add(x, inner.epsilon))

    delta_vars = foreach.mul(
        foreach.div(foreach.mul(rms(accumulated_delta_vars), grads), rms(accumulated_grads)),
        -1,
    )
    foreach.mul_(accumulated_delta_vars, rho)
    foreach.add_(accumulated_delta_vars, foreach.mul(delta_vars, delta_vars), alpha=1 - rho)
    # Keras: _foreach_add_(variables, delta_vars, alpha=lr)
    single = _single(rates)
    if single is not None:
        foreach.add_(values, delta_vars, alpha=single)
    else:
        foreach.add_(values, foreach.mul(delta_vars, _floats(rates)))


def adagrad(inner, grads, values, indices, rates, starts, iterations, late_state, dtype):
    if not values:
        return
    accumulators = _slots(inner, "_accumulators", indices)
    foreach.add_(accumulators, foreach.mul(grads, grads))
    foreach.add_(
        values,
        foreach.div(
            foreach.mul(grads, _floats(rates)),
            foreach.sqrt(foreach.add(accumulators, inner.epsilon)),
        ),
        alpha=-1,
    )


def lion(inner, grads, values, indices, rates, starts, iterations, late_state, dtype):
    if not values:
        return
    m_list = _slots(inner, "_momentums", indices)
    c_t = foreach.mul(m_list, inner.beta_1)
    foreach.add_(c_t, grads, alpha=1 - inner.beta_1)
    c_t = [c.sign() for c in c_t]
    foreach.add_(values, foreach.mul(c_t, _floats(rates)), alpha=-1)
    foreach.mul_(m_list, inner.beta_2)
    foreach.add_(m_list, grads, alpha=1 - inner.beta_2)


def rmsprop(inner, grads, values, indices, rates, starts, iterations, late_state, dtype):
    if not values:
        return
    rho = inner.rho
    velocities = _slots(inner, "_velocities", indices)
    foreach.mul_(velocities, rho)
    foreach.add_(velocities, foreach.mul(grads, grads), alpha=1 - rho)
    denominators = foreach.add(velocities, inner.epsilon)
    if inner.centered:
        average_grads = _slots(inner, "_average_gradients", indices)
        foreach.mul_(average_grads, rho)
        foreach.add_(average_grads, grads, alpha=1 - rho)
        foreach.add_(denominators, foreach.mul(average_grads, average_grads), alpha=-1)
    foreach.sqrt_(denominators)
    increments = foreach.div(foreach.mul(grads, _floats(rates)), denominators)
    if inner.momentum > 0:
        momentum_list = _slots(inner, "_momentums", indices)
        foreach.mul_(momentum_list, inner.momentum)
        foreach.add_(momentum_list, increments)
        foreach.add_(values, momentum_list, alpha=-1)
    else:
        foreach.add_(values, increments, alpha=-1)


def sgd(inner, grads, values, indices, rates, starts, iterations, late_state, dtype):
    if not values:
        return
    single = _single(rates)
    if single is not None:
        def add_step(targets):  # Keras: alpha=-learning_rate
            foreach.add_(targets, grads, alpha=-single)
    else:
        steps = foreach.mul(grads, _floats(-rate for rate in rates))

        def add_step(targets):
            foreach.add_(targets, steps)

    if inner.momentum != 0:
        bufs = [inner.momentums[i].value for i in indices]
        for i in range(len(bufs)):
            if bufs[i] is None:
                bufs[i] = torch.clone(grads[i]).detach()
        foreach.mul_(bufs, inner.momentum)
        add_step(bufs)
        if inner.nesterov:
            add_step(values)
            foreach.add_(values, bufs, alpha=inner.momentum)
        else:
            foreach.add_(values, bufs)
    else:
        add_step(values)


def _steps_by_class_name() -> dict:
    return {
        "Adadelta": adadelta, "Adagrad": adagrad, "Adam": adam, "AdamW": adam, "Adamax": adamax,
        "Lion": lion, "Nadam": nadam, "RMSprop": rmsprop, "SGD": sgd,
    }


def step_for(inner, fused_step):
    """The per-tensor step for ``inner``, or None (a subclass, an overridden fused step).

    Only the exact classes Keras swaps in, running their own ``fused_step``: a
    subclass may change the update, and an instance whose
    ``_parallel_update_step`` was replaced asked for that one.
    """
    classes = _keras.torch_fused_optimizer_classes()
    step = next((_steps_by_class_name()[name] for name, cls in classes.items() if type(inner) is cls), None)
    if step is None or not _keras.is_the_class_fused_step(inner, fused_step):
        return None
    return step
