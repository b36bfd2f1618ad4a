"""Matching saved per-variable settings back to a model's variables.

Keras drops outer-model prefixes from variable paths across ``load_model``
(``outer/backbone/conv/kernel`` becomes ``conv/kernel``), so saved settings are
matched by path up to such a prefix, never by a rule that might now select
something else.
"""

from __future__ import annotations

from collections.abc import Sequence

from layerlr._rules import same_variable_path, variable_path


def match_saved(saved_paths: Sequence[str], trainable, frozen) -> list | str:
    """The model's variables in the saved order, or a description of the mismatch.

    Exact paths are matched first, then paths that differ by an outer prefix.
    Frozen variables may match: their state was saved while they trained.
    """
    pool = list(trainable) + [v for v in frozen if not any(v is t for t in trainable)]
    paths = [variable_path(v) for v in pool]
    chosen: list = [None] * len(saved_paths)
    used: set[int] = set()
    for same in (str.__eq__, same_variable_path):
        for i, saved in enumerate(saved_paths):
            if chosen[i] is not None:
                continue
            for j, path in enumerate(paths):
                if j not in used and same(saved, path):
                    chosen[i] = pool[j]
                    used.add(j)
                    break
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
