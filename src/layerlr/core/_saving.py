"""Matching saved per-variable settings back to a model's variables.

Keras drops outer-model prefixes from variable paths across ``load_model``
(``outer/backbone/conv/kernel`` becomes ``conv/kernel``), so saved settings are
matched by path up to such a prefix, never by a rule that might now select
something else.
"""

from __future__ import annotations

from collections.abc import Sequence

from layerlr.core._rules import same_variable_path, variable_path


def match_saved(saved_paths: Sequence[str], trainable, frozen, path_of=variable_path) -> list | str:
    """The model's variables in the saved order, or a description of the mismatch.

    Exact paths are matched first, then paths that differ by an outer prefix;
    a saved path that could be either of two variables is refused. Frozen
    variables may match: their state was saved while they trained.
    ``path_of`` gives the current path to compare (`structural_path` when the
    model's layers are known: then only exact matches count).
    """
    pool = list(trainable) + [v for v in frozen if not any(v is t for t in trainable)]
    paths = [path_of(v) for v in pool]
    chosen: list = [None] * len(saved_paths)
    used: set[int] = set()
    tests = (str.__eq__,) if path_of is not variable_path else (str.__eq__, same_variable_path)
    for same in tests:
        for i, saved in enumerate(saved_paths):
            if chosen[i] is not None:
                continue
            candidates = [j for j, path in enumerate(paths) if j not in used and same(saved, path)]
            if len(candidates) > 1 and same is not str.__eq__:
                a, b = (paths[j] for j in candidates[:2])
                return (
                    f"the saved variable {saved!r} could be {a!r} or {b!r} (paths lose "
                    "outer-model prefixes across load_model)"
                )
            if candidates:
                chosen[i] = pool[candidates[0]]
                used.add(candidates[0])
    for i, saved in enumerate(saved_paths):
        if chosen[i] is None:
            return f"the saved variable #{i} {saved!r} has no counterpart in the model"
    for j, variable in enumerate(pool[: len(trainable)]):
        if j not in used:
            return f"the trainable variable {paths[j]!r} was not saved with the optimizer"
    return chosen


def first_path_mismatch(saved: Sequence[str], current: Sequence[str]) -> str | None:
    """For position-matched lists: the first difference beyond an outer prefix."""
    if len(saved) != len(current):
        return (
            f"{len(saved)} trainable variables were saved, the model has "
            f"{len(current)}"
        )
    for i, (s, c) in enumerate(zip(saved, current)):
        if not same_variable_path(s, c):
            return f"trainable variable #{i} was {s!r} and is now {c!r}"
    return None
