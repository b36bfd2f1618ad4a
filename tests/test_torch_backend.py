"""Torch backend: the fused `torch._foreach` optimizers stay fused.

On torch, Keras swaps nine built-in optimizers for fused versions whose
`_parallel_update_step` updates all variables with one learning rate and never
calls `update_step`. layerlr must run the same fused arithmetic once per step
with a rate per tensor (`_torch_fused`), whatever the groups; where it cannot
(an instance whose fused step was replaced, as `FusedCallLog` does), once per
multiplier group, never once per variable. It must keep Nadam's once-per-step state advancing once per
step, and compile under `jit_compile=True` without recompiling per group or
per step.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import keras

import layerlr
from conftest import only_on
from helpers import data, reference_optimizer

pytestmark = only_on("torch")

FUSED = {
    "adadelta": (keras.optimizers.Adadelta, dict(learning_rate=1.0)),
    "adagrad": (keras.optimizers.Adagrad, dict(learning_rate=0.05)),
    "adam": (keras.optimizers.Adam, dict(learning_rate=0.01)),
    "adamw": (keras.optimizers.AdamW, dict(learning_rate=0.01)),
    "adamax": (keras.optimizers.Adamax, dict(learning_rate=0.01)),
    "lion": (keras.optimizers.Lion, dict(learning_rate=0.002)),
    "nadam": (keras.optimizers.Nadam, dict(learning_rate=0.01)),
    "rmsprop": (keras.optimizers.RMSprop, dict(learning_rate=0.01, momentum=0.5)),
    "sgd": (keras.optimizers.SGD, dict(learning_rate=0.05, momentum=0.9)),
}
WD = 0.02
EPOCHS = 2
STEPS = EPOCHS * 4  # 64 rows, batch 16

# Four blocks + a head: 10 variables in 6 groups.
LR_RULES = [("blk[0-1]", 0.1), ("blk[2-3]", 0.5)]
DECAY_RULES = [("*bias", 0.0)]


def blocks_model():
    inputs = keras.Input((6,), name="x")
    h = inputs
    for i in range(4):
        h = keras.layers.Dense(8, activation="tanh", name=f"blk{i}")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name="blocks")


def hand_multipliers(path, lr_of_block=None):
    layer, name = path.split("/")[-2:]
    lr_of_block = lr_of_block or {0: 0.1, 1: 0.1, 2: 0.5, 3: 0.5}
    lr = lr_of_block[int(layer[3:])] if layer.startswith("blk") else 1.0
    return lr, 0.0 if name == "bias" else 1.0


def hand_groups(paths, multipliers=hand_multipliers):
    """Expected fused groups: paths with equal (lr_mult, decayed?) and lr_mult > 0."""
    groups = {}
    for path in paths:
        lr, decay = multipliers(path)
        if lr > 0:
            groups.setdefault((lr, decay > 0), set()).add(path)
    return {lr_decayed: frozenset(p) for lr_decayed, p in groups.items()}


def twin_blocks():
    a, b = blocks_model(), blocks_model()
    b.set_weights(a.get_weights())
    return a, b


class FusedCallLog:
    """Instruments an inner optimizer before build, so layerlr wraps the counters."""

    def __init__(self, inner):
        self.inner = inner
        self.parallel_calls = []  # (step, frozenset(paths), learning rate)
        self.update_step_calls = 0
        fused = inner._parallel_update_step
        update_step = inner.update_step

        @functools.wraps(fused)
        def counting_fused(grads, variables, learning_rate):
            step = int(keras.ops.convert_to_numpy(inner.iterations))
            paths = frozenset(v.path for v in variables)
            assert len(paths) == len(variables), "a variable was passed twice"
            self.parallel_calls.append((step, paths, float(learning_rate)))
            return fused(grads, variables, learning_rate)

        def counting_update_step(gradient, variable, learning_rate):
            self.update_step_calls += 1
            return update_step(gradient, variable, learning_rate)

        inner._parallel_update_step = counting_fused
        inner.update_step = counting_update_step

    def calls_by_step(self):
        steps = {}
        for step, paths, rate in self.parallel_calls:
            steps.setdefault(step, []).append((paths, rate))
        return steps


def fit(model, optimizer, epochs=EPOCHS, **compile_kwargs):
    x, y = data()
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model


def max_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a.get_weights(), b.get_weights()))


@pytest.mark.parametrize("name", sorted(FUSED))
def test_replaced_fused_step_runs_once_per_group_per_step(name):
    opt_class, kwargs = FUSED[name]
    kwargs = dict(kwargs, weight_decay=WD)
    inner = opt_class(**kwargs)
    # The fused class Keras swaps in on torch: otherwise this test proves nothing.
    assert type(inner).__module__.startswith("keras.src.backend.torch.optimizers.")
    log = FusedCallLog(inner)
    model, reference = twin_blocks()
    fit(model, layerlr.LayerwiseOptimizer(inner, lr_mult=LR_RULES, decay_mult=DECAY_RULES))

    paths = [v.path for v in model.trainable_variables]
    expected = hand_groups(paths)
    assert len(expected) == 6 and len(paths) == 10
    by_step = log.calls_by_step()
    assert sorted(by_step) == list(range(STEPS))
    for step, calls in by_step.items():
        # One fused call per group: the groups partition the variables ...
        assert sorted(map(sorted, (p for p, _ in calls))) == sorted(map(sorted, expected.values()))
        # ... and each call gets its group's learning rate.
        for group_paths, rate in calls:
            lr_mult = hand_multipliers(next(iter(group_paths)))[0]
            assert rate == pytest.approx(kwargs["learning_rate"] * lr_mult, rel=1e-6)
    assert log.update_step_calls == 0

    # And the grouped fused updates are the param-group semantics.
    fit(reference, reference_optimizer(opt_class, kwargs, hand_multipliers))
    assert max_diff(model, reference) < 1e-6


@pytest.mark.parametrize("replaced", [True, False], ids=["grouped", "per_tensor"])
def test_lr_mult_zero_group_is_left_out_of_the_fused_calls(replaced, monkeypatch):
    from layerlr.core import _torch_fused

    lr_of_block = {0: 0.0, 1: 0.1, 2: 0.5, 3: 0.5}
    multipliers = functools.partial(hand_multipliers, lr_of_block=lr_of_block)
    inner = keras.optimizers.Adam(0.01, weight_decay=WD)
    if replaced:
        log = FusedCallLog(inner)
    else:
        log = FusedCallLog.__new__(FusedCallLog)
        log.parallel_calls = []
        adam = _torch_fused.adam

        def counting(inner_, grads, values, *args):
            step = int(keras.ops.convert_to_numpy(inner_.iterations))
            paths = frozenset(v.path for v in model.trainable_variables
                              if any(v.value is t for t in values))
            log.parallel_calls.append((step, paths, None))
            return adam(inner_, grads, values, *args)

        monkeypatch.setattr(_torch_fused, "adam", counting)
    model, reference = twin_blocks()
    before = [np.array(w) for w in model.get_weights()]
    opt = layerlr.LayerwiseOptimizer(
        inner, lr_mult=[("blk0", 0.0), *LR_RULES], decay_mult=DECAY_RULES
    )
    fit(model, opt)

    paths = [v.path for v in model.trainable_variables]
    expected = sorted(map(sorted, hand_groups(paths, multipliers).values()))
    if not replaced:  # one call for all of them
        expected = [sorted(set().union(*expected))]
    assert sorted(log.calls_by_step()) == list(range(STEPS))
    for calls in log.calls_by_step().values():
        assert sorted(map(sorted, (p for p, _ in calls))) == expected
    for v, w0 in zip(model.trainable_variables, before):
        if v.path.startswith("blk0/"):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), w0)
            # Slots untouched too: no moment decay, no weight decay.
            for slots in (inner._momentums, inner._velocities):
                slot = slots[inner._get_variable_index(v)]
                assert not np.any(keras.ops.convert_to_numpy(slot))
    fit(reference, reference_optimizer(
        keras.optimizers.Adam, dict(learning_rate=0.01, weight_decay=WD), multipliers
    ))
    assert max_diff(model, reference) < 1e-6


def nadam_u_product(steps, beta_1=0.9):
    """Keras Nadam: u_product_t = prod_{i<=t} beta_1 * (1 - 0.5 * 0.96**i)."""
    return math.prod(beta_1 * (1.0 - 0.5 * 0.96 ** i) for i in range(1, steps + 1))


def test_nadam_u_product_advances_once_per_step_with_six_groups():
    inner = keras.optimizers.Nadam(0.01, weight_decay=WD)
    model, reference = twin_blocks()
    fit(model, layerlr.LayerwiseOptimizer(inner, lr_mult=LR_RULES, decay_mult=DECAY_RULES))
    u_product = float(keras.ops.convert_to_numpy(inner._u_product))
    assert u_product == pytest.approx(nadam_u_product(STEPS), rel=1e-6)
    # Teeth: advanced once per group, it would be this far off.
    assert not math.isclose(u_product, nadam_u_product(6 * STEPS), rel_tol=0.5)

    ref_opt = reference_optimizer(
        keras.optimizers.Nadam, dict(learning_rate=0.01, weight_decay=WD), hand_multipliers
    )
    fit(reference, ref_opt)
    assert max_diff(model, reference) < 1e-6
    # Each of the reference's six separate Nadams advanced its own product
    # once per step: ours must hold the same value.
    assert len(ref_opt.optimizers) == 6
    for sub in ref_opt.optimizers:
        assert float(keras.ops.convert_to_numpy(sub._u_product)) == pytest.approx(u_product, rel=1e-6)


def test_nadam_u_product_advances_when_every_multiplier_is_zero():
    inner = keras.optimizers.Nadam(0.01)
    model = blocks_model()
    before = [np.array(w) for w in model.get_weights()]
    fit(model, layerlr.LayerwiseOptimizer(inner, lr_mult={"*": 0.0}))
    for w, w0 in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, w0)
    # As one Nadam at learning rate 0 (and as on TF/JAX): once per step.
    assert float(keras.ops.convert_to_numpy(inner._u_product)) == pytest.approx(
        nadam_u_product(STEPS), rel=1e-6
    )


# --- one fused update per step, a rate per tensor --------------------------------

# Ten variables, ten distinct rates (one group each), biases not decayed.
PER_VARIABLE_LR = {"blk0/kernel": 0.1, "blk0/bias": 0.2, "blk1/kernel": 0.3, "blk1/bias": 0.4,
                   "blk2/kernel": 0.5, "blk2/bias": 0.6, "blk3/kernel": 0.7, "blk3/bias": 0.8,
                   "head/kernel": 1.5, "head/bias": 2.0}


def per_variable_multipliers(path):
    key = "/".join(path.split("/")[-2:])
    return PER_VARIABLE_LR[key], 0.0 if key.endswith("bias") else 1.0


class ForeachWrites:
    """Counts in-place `torch._foreach_add_` calls on a model's variables, per step."""

    def __init__(self, monkeypatch, model, optimizer):
        import torch

        self.per_step = {}
        original = torch._foreach_add_

        def counting(targets, *args, **kwargs):
            mine = {id(v.value) for v in model.trainable_variables}
            written = sum(id(t) in mine for t in targets)
            if written:
                step = int(keras.ops.convert_to_numpy(optimizer.iterations))
                self.per_step.setdefault(step, []).append(written)
            return original(targets, *args, **kwargs)

        monkeypatch.setattr(torch, "_foreach_add_", counting)


@pytest.mark.parametrize("name", sorted(FUSED))
def test_one_fused_update_per_step_whatever_the_groups(name, monkeypatch):
    from layerlr.core import _torch_fused

    opt_class, kwargs = FUSED[name]
    kwargs = dict(kwargs, weight_decay=WD)
    inner = opt_class(**kwargs)
    assert type(inner).__module__.startswith("keras.src.backend.torch.optimizers.")
    step_name = {"adamw": "adam"}.get(name, name)
    calls = []
    per_tensor = getattr(_torch_fused, step_name)

    def counting(inner_, grads, values, indices, rates, *args):
        calls.append((int(keras.ops.convert_to_numpy(inner_.iterations)), len(values), len(set(rates))))
        return per_tensor(inner_, grads, values, indices, rates, *args)

    monkeypatch.setattr(_torch_fused, step_name, counting)
    # Keras' own fused step and update_step must not run at all.
    monkeypatch.setattr(type(inner), "update_step", lambda *a: pytest.fail("update_step called"))
    original_fused = type(inner)._parallel_update_step
    fused_calls = []
    monkeypatch.setattr(type(inner), "_parallel_update_step",
                        lambda self, *a: fused_calls.append(1) or original_fused(self, *a))

    model, reference = twin_blocks()
    optimizer = layerlr.LayerwiseOptimizer(
        inner, lr_mult=[(k, v) for k, v in PER_VARIABLE_LR.items()], decay_mult=DECAY_RULES
    )
    writes = ForeachWrites(monkeypatch, model, optimizer)
    fit(model, optimizer)
    assert calls == [(step, 10, 10) for step in range(STEPS)]
    assert not fused_calls

    # As many fused writes to the variables per step as the plain optimizer
    # makes (not one set per group), each covering every variable.
    monkeypatch.undo()
    plain_model = blocks_model()
    plain = opt_class(**kwargs)
    plain_writes = ForeachWrites(monkeypatch, plain_model, plain)
    fit(plain_model, plain)
    assert writes.per_step == plain_writes.per_step
    assert all(n == 10 for counts in writes.per_step.values() for n in counts)

    fit(reference, reference_optimizer(opt_class, kwargs, per_variable_multipliers))
    assert max_diff(model, reference) < 1e-6


def test_scheduled_multiplier_at_zero_leaves_variable_and_slots_untouched_in_the_fused_step():
    # blk0 is held at 0 for the first epoch, then trains at 0.5.
    blk0_mult = layerlr.schedules.FreezeThenWarmup(4, 0, value=0.5)

    inner = keras.optimizers.Adam(0.01, weight_decay=WD)
    model = blocks_model()
    before = [np.array(w) for w in model.get_weights()]
    optimizer = layerlr.LayerwiseOptimizer(inner, lr_mult=[("blk0", blk0_mult), *LR_RULES[1:]],
                                           decay_mult=DECAY_RULES)
    fit(model, optimizer, epochs=1)
    for v, w0 in zip(model.trainable_variables, before):
        moved = np.any(keras.ops.convert_to_numpy(v) != w0)
        assert moved == (not v.path.startswith("blk0/")), v.path
        if v.path.startswith("blk0/"):
            assert not np.any(keras.ops.convert_to_numpy(inner._momentums[inner._get_variable_index(v)]))
    fit(model, optimizer, epochs=1)
    for v, w0 in zip(model.trainable_variables, before):
        assert np.any(keras.ops.convert_to_numpy(v) != w0), v.path


# --- jit_compile=True (torch.compile) ------------------------------------------


class CompileLog:
    """Records every Dynamo recompilation (function and guard failures)."""

    def __init__(self, monkeypatch):
        from torch._dynamo import convert_frame

        self.recompiles = []
        original = convert_frame.get_and_maybe_log_recompilation_reasons

        def recording(cache_entries, frame, *args, **kwargs):
            reasons = original(cache_entries, frame, *args, **kwargs)
            self.recompiles.append((frame.f_code.co_name, frame.f_code.co_filename, reasons))
            return reasons

        monkeypatch.setattr(convert_frame, "get_and_maybe_log_recompilation_reasons", recording)

    @staticmethod
    def unique_graphs():
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]


@pytest.fixture
def dynamo(monkeypatch):
    """A clean Dynamo state; `backend` picks what torch.compile lowers to."""
    import torch
    import torch._dynamo

    def use(backend=None):
        if backend is not None:
            monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
        return CompileLog(monkeypatch)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield use
    torch._dynamo.reset()


def not_keras_own(recompiles):
    """The recompiles that plain Keras optimizers do not have.

    Keras' torch train_step recompiles once on step 2 for every optimizer:
    `model.zero_grad()` guards on `p.grad is None` (no grads before step 1),
    and `_use_weight_decay` creates its cache attribute on step 1.
    """
    keras_guards = (".grad is None", "'_exclude_from_weight_decay_cache')")
    return [
        (name, reasons)
        for name, _, reasons in recompiles
        if not (
            (name == "train_step" or name.startswith("torch_dynamo_resume_in_train_step"))
            and all(any(g in r.splitlines()[0] for g in keras_guards) for r in reasons)
        )
    ]


def fit_compiled_then_forbid_recompiles(model, optimizer, log):
    import torch._dynamo

    fit(model, optimizer, epochs=1, jit_compile=True)
    warm_graphs = log.unique_graphs()
    torch._dynamo.config.error_on_recompile = True
    try:
        x, y = data()
        model.fit(x, y, batch_size=16, epochs=EPOCHS, shuffle=False, verbose=0)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert log.unique_graphs() == warm_graphs
    return warm_graphs


def test_jit_compile_no_recompiles_per_group_or_per_step(dynamo):
    # Recompiles are decided by Dynamo's guards, before any backend runs, so the
    # cheap "eager" backend sees the same ones as inductor (slow test below).
    log = dynamo("eager")
    model, reference = twin_blocks()
    inner = keras.optimizers.Nadam(0.01, weight_decay=WD)
    fit_compiled_then_forbid_recompiles(
        model, layerlr.LayerwiseOptimizer(inner, lr_mult=LR_RULES, decay_mult=DECAY_RULES), log
    )
    assert not_keras_own(log.recompiles) == []
    assert len(log.recompiles) <= 2

    fit(reference, reference_optimizer(
        keras.optimizers.Nadam, dict(learning_rate=0.01, weight_decay=WD), hand_multipliers
    ), epochs=1 + EPOCHS)
    assert max_diff(model, reference) < 1e-6
    assert float(keras.ops.convert_to_numpy(inner._u_product)) == pytest.approx(
        nadam_u_product(STEPS + 4), rel=1e-6
    )


GRAPH_BREAK_CASES = {
    # Keras' fused SGD (and Adadelta) pass the learning-rate tensor as `alpha=`,
    # a graph break inside the fused step: run once per group, it would
    # recompile for every group; while compiling we take the per-variable path.
    "sgd_momentum": (
        keras.optimizers.SGD, dict(learning_rate=0.05, momentum=0.9, weight_decay=WD), LR_RULES
    ),
    # The grouped step reads a scheduled multiplier on the host (a graph break
    # inside the group loop) when not compiling.
    "adam_scheduled": (
        keras.optimizers.Adam, dict(learning_rate=0.01, weight_decay=WD),
        [("blk0", layerlr.schedules.FreezeThenWarmup(freeze_steps=2, warmup_steps=3)),
         ("blk1", 0.1), ("blk[2-3]", 0.5)],
    ),
}


@pytest.mark.parametrize("case", sorted(GRAPH_BREAK_CASES))
def test_jit_compile_no_recompiles_per_group_with_graph_breaks(dynamo, case):
    opt_class, kwargs, rules = GRAPH_BREAK_CASES[case]
    log = dynamo("eager")
    model, eager = twin_blocks()
    fit(model, layerlr.LayerwiseOptimizer(
        opt_class(**kwargs), lr_mult=rules, decay_mult=DECAY_RULES
    ), jit_compile=True)
    fit(eager, layerlr.LayerwiseOptimizer(opt_class(**kwargs), lr_mult=rules, decay_mult=DECAY_RULES))
    assert max_diff(model, eager) < 1e-6
    assert not_keras_own(log.recompiles) == []


@pytest.mark.slow
def test_jit_compile_inductor_compiles_no_more_than_the_plain_optimizer(dynamo):
    log = dynamo()
    model, reference = twin_blocks()
    plain = blocks_model()
    plain.set_weights(model.get_weights())
    fused = keras.optimizers.Adam(0.01, weight_decay=WD)
    graphs = fit_compiled_then_forbid_recompiles(
        model, layerlr.LayerwiseOptimizer(fused, lr_mult=LR_RULES, decay_mult=DECAY_RULES), log
    )
    ours = list(log.recompiles)

    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    log.recompiles.clear()
    plain_graphs = fit_compiled_then_forbid_recompiles(
        plain, keras.optimizers.Adam(0.01, weight_decay=WD), log
    )
    assert graphs == plain_graphs
    assert len(ours) == len(log.recompiles)

    fit(reference, reference_optimizer(
        keras.optimizers.Adam, dict(learning_rate=0.01, weight_decay=WD), hand_multipliers
    ), epochs=1 + EPOCHS)
    assert max_diff(model, reference) < 1e-6


def test_recompile_log_catches_per_group_recompiles(dynamo):
    """Teeth for the checks above: a fused-style step that graph-breaks, run
    once per group, is reported; Keras' own step-2 recompile is not."""
    import torch

    log = dynamo("eager")

    def fused_style_step(grads, variables, rate):
        torch._foreach_mul_(variables, 1.0)
        torch._dynamo.graph_break()
        torch._foreach_add_(variables, grads, alpha=-rate)

    step = torch.compile(fused_style_step)
    groups = [[torch.zeros(8, 8), torch.zeros(8)], [torch.zeros(3)], [torch.zeros(8, 3), torch.zeros(3)]]
    for _ in range(2):
        for group in groups:
            step([torch.ones_like(t) for t in group], group, 0.1)
    assert len(not_keras_own(log.recompiles)) >= len(groups) - 1
    keras_like = [("train_step", "", ["1/0: self._layers[1]._kernel._value.grad is None  # zero_grad"])]
    assert not_keras_own(keras_like) == []
