"""Time to resolve rules: 10,000 variables x 100 rules (target < 1 s).

The variables are real Keras variables with realistic nested paths
(``stage_3/block_17/attn/kernel``); the rules mix the selector kinds users
write (globs over path segments, regexes, a tuple of globs), so that more than
half of the variables match no rule at all and are checked against every rule
(the worst case for first-match-wins).
"""

from __future__ import annotations

import re
import statistics
import time

import keras
import numpy as np

import layerlr

LAYERS = ("conv", "bn", "proj", "attn", "mlp_in", "mlp_out", "norm", "gate", "embed", "head")


def make_variables(n: int) -> list:
    """``n`` scalar variables, 2 per layer, 10 layers per block, 50 blocks per stage."""
    variables = []
    per_stage = 50 * len(LAYERS) * 2
    for s in range(-(-n // per_stage)):
        with keras.name_scope(f"stage_{s}"):
            for b in range(50):
                with keras.name_scope(f"block_{b}"):
                    for layer in LAYERS:
                        with keras.name_scope(layer):
                            for name in ("kernel", "bias"):
                                if len(variables) < n:
                                    variables.append(keras.Variable(
                                        np.zeros((), "float32"), name=name))
    return variables


def make_rules(n_rules: int, variables: list) -> list:
    """``n_rules`` rules, each the first match of at least one variable.

    (layerlr rejects a rule that selects nothing, shadowed rules included.)
    """
    blocks = list(dict.fromkeys("/".join(v.path.split("/")[:2]) for v in variables))
    n_block_rules = n_rules - 12
    if n_block_rules < 0 or n_block_rules + 8 >= len(blocks):
        raise ValueError(f"{n_rules} rules need between 12 and {len(blocks) + 3} "
                         f"rules for {len(variables)} variables")
    # Layer-wise decay over the first blocks (a glob per block)...
    rules = [(block, round(0.9 ** (i % 40), 6)) for i, block in enumerate(blocks[:n_block_rules])]
    # ...the attention of the next 8 blocks (regexes)...
    rules += [(re.compile("^" + re.escape(block) + "/attn/"), 0.5)
              for block in blocks[n_block_rules:n_block_rules + 8]]
    last_stage, last_block = blocks[-1].split("/")
    rules += [
        (("*/gate/*", "*/embed/*"), 0.1),  # a tuple of globs
        (f"stage_*/{last_block}/head", 2.0),
        (re.compile(r"/norm/bias$"), 0.0),
        (f"{last_stage}/*/mlp_*", 0.25),
    ]
    return rules


def measure(n_variables: int = 10_000, n_rules: int = 100, repeats: int = 3) -> dict:
    variables = make_variables(n_variables)
    rules = make_rules(n_rules, variables)
    decay_rules = [("*bias", 0.0), ("*/norm/*", 0.0)]

    def fresh():  # selectors may cache per-path answers: a new optimizer every time
        return layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1, weight_decay=1e-4),
                                          lr_mult=rules, decay_mult=decay_rules)

    resolve_s = []
    for _ in range(repeats):
        opt = fresh()
        start = time.perf_counter()
        entries = opt._resolve_rules(variables, None)
        resolve_s.append(time.perf_counter() - start)
    opt = fresh()
    start = time.perf_counter()
    opt.build(variables)  # the public path: resolve + (slot-free) SGD build + hook
    build_s = time.perf_counter() - start
    return {
        "variables": len(variables),
        "lr_rules": len(rules),
        "decay_rules": len(decay_rules),
        "variables_matching_no_lr_rule": sum(e.lr_rule is None for e in entries),
        "resolve_s": statistics.median(resolve_s),
        "resolve_runs_s": resolve_s,
        "build_s": build_s,
    }
