"""tf.compat.v1 graph mode: one gradient computation, one learning rate per group.

The reference is the textbook TF1 recipe written by hand: one gradient
computation, then one ``tf.compat.v1.train`` optimizer per group at
``lr * mult`` over an explicit variable list (no layerlr code involved).
"""

import re

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import keras  # noqa: E402

import layerlr  # noqa: E402

v1 = tf.compat.v1
STEPS = 6
LR = 0.02
MULTS = {"backbone/w": 0.1, "backbone/b": 0.1, "head/w": 1.0, "head/b": 3.0}  # by hand


def session():
    config = v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
    return v1.Session(config=config)


def init_values(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "backbone/w": rng.normal(size=(5, 8)).astype("float32") * 0.5,
        "backbone/b": rng.normal(size=(8,)).astype("float32") * 0.1,
        "head/w": rng.normal(size=(8, 3)).astype("float32") * 0.5,
        "head/b": rng.normal(size=(3,)).astype("float32") * 0.1,
    }


def batches():
    rng = np.random.default_rng(1)
    return [
        (rng.normal(size=(16, 5)).astype("float32"), rng.normal(size=(16, 3)).astype("float32"))
        for _ in range(STEPS)
    ]


def build_net(use_resource=True):
    """A two-layer net of tf.compat.v1 variables; returns (x, y, loss, variables)."""
    init = init_values()
    x = v1.placeholder(tf.float32, (None, 5), name="x")
    y = v1.placeholder(tf.float32, (None, 3), name="y")
    variables = {}
    for scope in ("backbone", "head"):
        with v1.variable_scope(scope):
            for name in ("w", "b"):
                variables[f"{scope}/{name}"] = v1.get_variable(
                    name, initializer=init[f"{scope}/{name}"], use_resource=use_resource
                )
    h = tf.tanh(tf.matmul(x, variables["backbone/w"], name="backbone_matmul") + variables["backbone/b"])
    out = tf.matmul(h, variables["head/w"]) + variables["head/b"]
    loss = tf.reduce_mean(tf.square(out - y))
    return x, y, loss, variables


def train(build_train_op, use_resource=True, steps=STEPS):
    """Builds a fresh graph, runs the op `steps` times; returns final values."""
    graph = tf.Graph()
    with graph.as_default():
        x, y, loss, variables = build_net(use_resource)
        global_step = v1.train.get_or_create_global_step()
        train_op = build_train_op(loss, variables, global_step)
        with session() as sess:
            sess.run(v1.global_variables_initializer())
            for bx, by in batches()[:steps]:
                sess.run(train_op, {x: bx, y: by})
            values = sess.run(variables)
            step = sess.run(global_step)
    return values, step, graph


def reference_train_op(make_opt, learning_rate, mults):
    """One hand-written gradient computation, one optimizer per explicit group."""

    def build(loss, variables, global_step):
        names = list(variables)
        # Gated per op, as Optimizer.compute_gradients does: ungated, an update
        # of head/w can run before backprop reads it (a race on ref variables).
        grads = tf.gradients(loss, [variables[n] for n in names], gate_gradients=True)
        by_mult = {}
        for name, grad in zip(names, grads):
            by_mult.setdefault(mults[name], []).append((grad, variables[name]))
        updates = [
            make_opt(learning_rate * mult if mult != 1.0 else learning_rate).apply_gradients(pairs)
            for mult, pairs in by_mult.items()
            if mult != 0.0
        ]
        with tf.control_dependencies(updates):
            return global_step.assign_add(1)

    return build


def layerlr_train_op(make_opt, learning_rate, lr_mult, **kwargs):
    def build(loss, variables, global_step):
        return layerlr.compat_v1_minimize(
            loss, make_opt, learning_rate, lr_mult, global_step=global_step, **kwargs
        )

    return build


def max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


OPTIMIZERS = {
    "adam": v1.train.AdamOptimizer,
    "momentum_nesterov": lambda lr: v1.train.MomentumOptimizer(lr, 0.9, use_nesterov=True),
    "rmsprop_centered": lambda lr: v1.train.RMSPropOptimizer(lr, momentum=0.5, centered=True),
    "adagrad": v1.train.AdagradOptimizer,
}
RULES = [("backbone", 0.1), ("head/b", 3.0)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_one_optimizer_per_group(name):
    make_opt = OPTIMIZERS[name]
    ours, step, _ = train(layerlr_train_op(make_opt, LR, RULES))
    reference, _, _ = train(reference_train_op(make_opt, LR, MULTS))
    assert max_diff(ours, reference) < 1e-6
    assert step == STEPS

    # Teeth: the same optimizer at one rate for all ends somewhere else.
    plain, _, _ = train(reference_train_op(make_opt, LR, dict.fromkeys(MULTS, 1.0)))
    assert max_diff(ours, plain) > 1e-4


def test_sgd_matches_a_hand_computed_step():
    """One plain SGD step, checked against numpy gradients of the same net."""
    ours, _, _ = train(layerlr_train_op(v1.train.GradientDescentOptimizer, 0.5, RULES), steps=1)
    init = init_values()
    bx, by = batches()[0]
    pre = bx @ init["backbone/w"] + init["backbone/b"]
    h = np.tanh(pre)
    out = h @ init["head/w"] + init["head/b"]
    d_out = 2 * (out - by) / out.size
    d_pre = (d_out @ init["head/w"].T) * (1 - h**2)
    grads = {
        "head/w": h.T @ d_out, "head/b": d_out.sum(0),
        "backbone/w": bx.T @ d_pre, "backbone/b": d_pre.sum(0),
    }
    expected = {k: init[k] - 0.5 * MULTS[k] * grads[k] for k in init}
    assert max_diff(ours, expected) < 1e-5


def test_schedule_tensor_and_ref_variables():
    """A learning-rate tensor driven by the global step, on TF1 ref variables."""

    def schedule_op(lr_mult, mults=None):
        def build(loss, variables, global_step):
            lr = v1.train.exponential_decay(0.05, global_step, decay_steps=2, decay_rate=0.5)
            if mults is not None:
                return reference_train_op(v1.train.AdamOptimizer, lr, mults)(loss, variables, global_step)
            return layerlr.compat_v1_minimize(
                loss, v1.train.AdamOptimizer, lr, lr_mult, global_step=global_step
            )

        return build

    ours, step, _ = train(schedule_op(RULES), use_resource=False)
    reference, _, _ = train(schedule_op(None, MULTS), use_resource=False)
    assert step == STEPS
    assert max_diff(ours, reference) < 1e-6
    constant, _, _ = train(layerlr_train_op(v1.train.AdamOptimizer, 0.05, RULES), use_resource=False)
    assert max_diff(ours, constant) > 1e-4


def test_zero_multiplier_skips_gradient_slots_and_update():
    rules = [("backbone/w", 0.0), ("backbone", 0.1), ("head/b", 3.0)]
    ours, _, graph = train(layerlr_train_op(v1.train.AdamOptimizer, LR, rules))
    reference, _, _ = train(
        reference_train_op(v1.train.AdamOptimizer, LR, dict(MULTS, **{"backbone/w": 0.0}))
    )
    assert max_diff(ours, reference) < 1e-6
    np.testing.assert_array_equal(ours["backbone/w"], init_values()["backbone/w"])
    names = [op.name for op in graph.get_operations()]
    assert not [n for n in names if n.startswith("backbone/w/Adam")]  # no slots
    assert [n for n in names if n.startswith("backbone/b/Adam")]
    # The first matmul is upstream of backbone/w only: no gradient was built for it.
    assert not [n for n in names if "backbone_matmul_grad" in n]

    _, _, trained_graph = train(layerlr_train_op(v1.train.AdamOptimizer, LR, RULES))
    assert [op.name for op in trained_graph.get_operations() if "backbone_matmul_grad" in op.name]


def test_one_gradient_computation_for_all_groups():
    _, _, graph = train(layerlr_train_op(v1.train.AdamOptimizer, LR, RULES))
    scopes = {op.name.split("/")[0] for op in graph.get_operations()}
    assert "gradients" in scopes
    assert not [s for s in scopes if re.fullmatch(r"gradients_\d+", s)]


def test_variable_regex_predicate_and_tuple_selectors():
    seen = []

    def is_bias(variable):
        seen.append(variable)
        return variable.shape.rank == 1

    def build(loss, variables, global_step):
        return layerlr.compat_v1_minimize(
            loss, v1.train.AdamOptimizer, LR,
            [(variables["head/w"], 1.0),
             ((re.compile(r"^backbone/"), "nothing*here"), 0.1),
             (is_bias, 3.0)],
            global_step=global_step,
        )

    ours, _, _ = train(build)
    reference, _, _ = train(reference_train_op(v1.train.AdamOptimizer, LR, MULTS))
    assert max_diff(ours, reference) < 1e-6
    assert seen and all(isinstance(v, tf.Variable) for v in seen)


def test_without_global_step_and_with_callable_rate():
    def build(loss, variables, global_step):
        return layerlr.compat_v1_minimize(loss, v1.train.AdamOptimizer, lambda: LR, RULES)

    ours, step, _ = train(build)
    reference, _, _ = train(reference_train_op(v1.train.AdamOptimizer, LR, MULTS))
    assert step == 0
    assert max_diff(ours, reference) < 1e-6


def in_graph(fn):
    with tf.Graph().as_default():
        _, _, loss, variables = build_net()
        return fn(loss, variables)


def test_bad_input_is_explained():
    adam = v1.train.AdamOptimizer
    with pytest.raises(ValueError, match=r"'backbon'.*matches none.*Closest paths: 'backbone'"):
        in_graph(lambda loss, _: layerlr.compat_v1_minimize(loss, adam, LR, {"backbon": 0.1}))
    with pytest.raises(TypeError, match="Pass its class"):
        in_graph(lambda loss, _: layerlr.compat_v1_minimize(loss, adam(LR), LR, {}))
    with pytest.raises(TypeError, match="must return a tf.compat.v1.train"):
        in_graph(lambda loss, _: layerlr.compat_v1_minimize(loss, lambda lr: "adam", LR, {}))
    with pytest.raises(TypeError, match="Keras object"):
        in_graph(lambda loss, _: layerlr.compat_v1_minimize(
            loss, adam, LR, {_keras_dense(): 0.1}))
    with pytest.raises(ValueError, match="nothing to train"):
        in_graph(lambda loss, _: layerlr.compat_v1_minimize(loss, adam, LR, {"*": 0.0}))
    with pytest.raises(ValueError, match="must be a finite number"):
        in_graph(lambda loss, _: layerlr.compat_v1_minimize(loss, adam, LR, {"head": -1.0}))
    with pytest.raises(TypeError, match="has a schedule; in graph code multipliers are numbers"):
        in_graph(lambda loss, _: layerlr.compat_v1_minimize(loss, adam, LR, {
            "head": keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5)}))
    with pytest.raises(RuntimeError, match="graph"):
        layerlr.compat_v1_minimize(tf.constant(1.0), adam, LR, {})


def _keras_dense():
    return keras.layers.Dense(2)
