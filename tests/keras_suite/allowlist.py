"""Keras tests that fail through the wrapper for reasons that are not behaviour.

Each key is a Keras test (path under ``keras/src``, ``fnmatch`` patterns
allowed) that inspects what a wrapper cannot share with the class it wraps: a
private attribute, an ``isinstance`` check against the wrapped class, or the
class name. ``ours`` is our test showing that the public behaviour behind it is
the same as with the plain optimizer. The plugin expects these tests to fail
(strict xfail): one that starts passing must leave the list.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("private attribute", "isinstance", "class name")
ALL_BACKENDS = ("tensorflow", "jax", "torch")


@dataclass(frozen=True)
class Allowed:
    kind: str
    reason: str
    ours: tuple[str, ...]  # tests/<file>.py::<test>, relative to the repository
    backends: tuple[str, ...] = ALL_BACKENDS


ALLOWED: dict[str, Allowed] = {
    "optimizers/optimizer_test.py::OptimizerTest::test_get_method": Allowed(
        "isinstance",
        "asserts optimizers.get('sgd') is an instance of SGD; it is a "
        "LayerwiseOptimizer wrapping one",
        ("tests/test_drop_in.py::test_identifiers_give_the_optimizer_keras_gives",),
    ),
    "optimizers/multi_optimizer_test.py::MultiOptimizerTest::test_serialization": Allowed(
        "class name",
        "compares sub-optimizers' __class__.__name__ with 'Adam', 'SGD', ... after "
        "a config round trip",
        ("tests/test_drop_in.py::test_multi_optimizer_of_wrapped_optimizers_round_trips",),
    ),
    "optimizers/optimizer_test.py::OptimizerTest::test_gradient_accumulation": Allowed(
        "private attribute",
        "reads `_accumulated_gradients`, which belongs to the wrapped optimizer",
        ("tests/test_drop_in.py::test_gradient_accumulation_matches_plain_keras_step_by_step",
         "tests/test_training.py::test_optimizer_features_match_reference"),
    ),
    "optimizers/optimizer_test.py::OptimizerTest::test_overwrite_with_gradient_with_gradient_accumulation": Allowed(
        "private attribute",
        "reads `_accumulated_gradients`, which belongs to the wrapped optimizer",
        ("tests/test_drop_in.py::test_gradient_accumulation_matches_plain_keras_step_by_step",),
    ),
    "optimizers/nadam_test.py::NadamTest::test_build_with_empty_var_list": Allowed(
        "private attribute",
        "reads Nadam's `_u_product`, which belongs to the wrapped optimizer",
        ("tests/test_drop_in.py::test_building_on_no_variables_gives_the_plain_optimizers_state",),
    ),
    "optimizers/muon_test.py::MuonTest::test_should_use_adamw": Allowed(
        "private attribute",
        "calls Muon's private `_should_use_adamw` on the optimizer",
        ("tests/test_equivalence.py::test_matches_one_optimizer_per_group",),
    ),
    "optimizers/muon_test.py::MuonTest::test_adamw_weight_decay": Allowed(
        "private attribute",
        "calls `_apply_weight_decay` directly; through the wrapper, decay is "
        "applied per variable inside the update (with decay_mult), so the "
        "wrapper's own is the base one, which knows nothing of Muon's "
        "adam_weight_decay",
        ("tests/test_equivalence.py::test_matches_one_optimizer_per_group",),
    ),
    "optimizers/optimizer_sparse_test.py::OptimizerSparseTest::test_sparse_gradients_*": Allowed(
        "private attribute",
        "mocks `_apply_weight_decay` and the state-writing `assign*` methods on "
        "the optimizer it is given, unwrapping only a LossScaleOptimizer (by "
        "isinstance): for a LayerwiseOptimizer it mocks the wrapper, not the "
        "optimizer that writes",
        ("tests/test_drop_in.py::test_sparse_gradients_give_the_same_updates_as_plain_keras",),
        backends=("tensorflow", "jax"),  # sparse gradients: skipped on torch
    ),
}
