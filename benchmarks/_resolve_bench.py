"""Time to resolve rules: 10,000 variables x 100 rules, per selector kind (target < 0.5 s).

Two sets of variables:

- ``paths``: bare Keras variables with realistic nested paths
  (``stage_3/block_17/attn/kernel``) and rules of the kinds users write over
  paths (globs over path segments, regexes, a tuple of globs);
- every other kind: a real model, a ``Sequential`` of 40 ``Sequential`` blocks
  of ``Dense(1)`` layers (the variables of a layer sit under three owners: the
  layer, its block and the model), whose layers are of 2 x 100 ``Dense``
  subclasses so that layer-type rules can select some and not others.

The rules are built so that each one is the first match of at least one
variable (layerlr rejects a rule that selects nothing) and, except in the
mixed set, more than half of the variables match no rule and are checked
against every rule: the worst case for first-match-wins.

    python -m benchmarks._resolve_bench               # the full size, every kind
    python -m benchmarks._resolve_bench --variables 1000 --rules 30 --kinds blocks
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import layerlr  # noqa: E402
from layerlr.core._resolution import multipliers_of  # noqa: E402
from benchmarks._report import RESOLVE_MAX_S  # noqa: E402

LAYERS = ("conv", "bn", "proj", "attn", "mlp_in", "mlp_out", "norm", "gate", "embed", "head")
N_BLOCKS = 40

KINDS = {  # key -> what the row says
    "paths": "globs, regexes, a tuple of globs",
    "layers": "layer objects",
    "blocks": "Sequential blocks (+ layers inside them)",
    "types": "layer types",
    "variables": "variable objects",
    "predicates": "predicates",
    "mixed": "every kind, mixed",
}


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
    """``n_rules`` path rules over `make_variables`, each the first match of a variable.

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


# --- the model, for the selectors that need live objects ----------------------


@functools.lru_cache(maxsize=None)
def _layer_types(n: int) -> tuple[type, ...]:
    # Cached: each call would otherwise create new classes with the same names.
    return tuple(type(f"Dense{k}", (keras.layers.Dense,), {}) for k in range(n))


def make_model(n_variables: int, n_rules: int) -> tuple[keras.Model, list, list]:
    """(model, its blocks, its leaf layers): ``n_variables`` variables in `N_BLOCKS` blocks.

    Leaf layer ``k`` is of type ``k % (2 * n_rules)``: rules for the first
    ``n_rules`` types select about half of the layers.
    """
    n_layers = max(N_BLOCKS, n_variables // 2)
    types = _layer_types(2 * n_rules)
    leaves, blocks = [], []
    for b in range(N_BLOCKS):
        size = n_layers // N_BLOCKS + (b < n_layers % N_BLOCKS)
        block_leaves = [types[(len(leaves) + j) % len(types)](1, name=f"d{b}_{j}")
                        for j in range(size)]
        leaves += block_leaves
        blocks.append(keras.Sequential(block_leaves, name=f"block_{b}"))
    model = keras.Sequential(blocks, name="net")
    model.build((None, 1))
    return model, blocks, leaves


def _spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them if fewer)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def _first_half(blocks):
    return [layer for block in blocks[: len(blocks) // 2] for layer in block.layers]


def _path_endswith(suffix: str):
    # A realistic user predicate: one attribute read and a string test.
    return lambda v: v.path.endswith(suffix)


def model_rules(kind: str, n_rules: int, blocks: list) -> list:
    """``n_rules`` rules of ``kind`` over `make_model`'s model, each a first match."""
    half = _first_half(blocks)
    if kind == "layers":
        return [(layer, 0.5) for layer in _spread(half, n_rules)]
    if kind == "blocks":
        # 1 in 5 rules a whole block, after 4 layers of each (first match wins).
        n_blocks = max(1, n_rules // 5)
        if n_blocks > len(blocks) // 2:
            raise ValueError(f"{n_rules} rules: at most {5 * (len(blocks) // 2)} for 'blocks'")
        inner = [layer for block in blocks[:n_blocks] for layer in block.layers]
        return ([(layer, 0.1) for layer in _spread(inner, n_rules - n_blocks)]
                + [(block, 0.5) for block in blocks[:n_blocks]])
    if kind == "types":
        return [(t, 0.5) for t in _layer_types(2 * n_rules)[:n_rules]]
    if kind == "variables":
        variables = [v for layer in half for v in layer.weights]
        return [(v, 0.5) for v in _spread(variables, n_rules)]
    if kind == "predicates":
        return [(_path_endswith(f"/{layer.name}/kernel"), 0.5)
                for layer in _spread(half, n_rules)]
    if kind == "mixed":
        return _mixed_rules(n_rules, blocks, half)
    raise ValueError(f"unknown kind {kind!r}")


def _mixed_rules(n_rules: int, blocks: list, half: list) -> list:
    """Every kind at once: specific selectors first, then types, then blocks."""
    n_each = max(1, n_rules // 10)
    n_blocks = max(1, n_rules // 20)
    n_types = n_each
    n_specific = n_rules - n_blocks - n_types
    # Each specific rule gets its own layer from blocks the block rules do not cover.
    targets = _spread(half[len(half) * n_blocks // (len(blocks) // 2):], n_specific)
    if len(targets) < n_specific:
        raise ValueError(f"{n_rules} rules are too many for 'mixed' with this model")
    makers = [
        lambda layer: (layer.name, 0.9),  # a glob naming the layer (a path segment)
        lambda layer: (re.compile(f"/{re.escape(layer.name)}/kernel$"), 0.8),
        lambda layer: (layer, 0.7),
        lambda layer: (layer.kernel, 0.6),
        lambda layer: (_path_endswith(f"/{layer.name}/bias"), 0.5),
        lambda layer: ((f"*/{layer.name}/bias", layer.bias), 0.4),  # a tuple of two kinds
        lambda layer: ((re.compile(f"^{re.escape(layer.kernel.path)}$"), layer), 0.3),
        lambda layer: (f"{layer.name}/kernel", 0.2),
    ]
    rules = [makers[i % len(makers)](layer) for i, layer in enumerate(targets)]
    types = _layer_types(2 * n_rules)
    rules += [(t, 0.15) for t in types[:n_types]]
    rules += [(block, 0.05) for block in blocks[:n_blocks]]
    return rules


# --- measuring ----------------------------------------------------------------


def _time_resolution(make_optimizer, variables, model, repeats: int) -> tuple[list, object]:
    runs, entries = [], None
    for _ in range(repeats):
        opt = make_optimizer()  # selectors may cache answers: a new optimizer every time
        start = time.perf_counter()
        # What build() runs; the public `opt.resolve(model)` adds the rates now.
        entries = multipliers_of(opt.lr_rules, opt.decay_rules, variables, model)
        runs.append(time.perf_counter() - start)
    return runs, entries


def measure_kind(kind: str, n_variables: int = 10_000, n_rules: int = 100, repeats: int = 3,
                 _model=None) -> dict:
    """Resolution time of ``n_rules`` lr rules of ``kind`` (+ 2 decay globs)."""
    decay_rules = [("*bias", 0.0), ("*/norm/*", 0.0)] if kind == "paths" else [("*bias", 0.0)]
    if kind == "paths":
        model = None
        variables = make_variables(n_variables)
        rules = make_rules(n_rules, variables)
    else:
        model, blocks, _ = _model or make_model(n_variables, n_rules)
        variables = model.trainable_variables
        rules = model_rules(kind, n_rules, blocks)

    def fresh():
        return layerlr.LayerwiseOptimizer(keras.optimizers.SGD(0.1, weight_decay=1e-4),
                                          lr_mult=rules, decay_mult=decay_rules)

    with warnings.catch_warnings():
        # A shadowed rule would mean the benchmark is not measuring what it says.
        warnings.simplefilter("error")
        runs, entries = _time_resolution(fresh, variables, model, repeats)
    opt = fresh()
    start = time.perf_counter()
    # The public path: resolve + (slot-free) SGD build + hook.
    opt.build(variables if model is None else model)
    build_s = time.perf_counter() - start
    return {
        "kind": kind,
        "label": KINDS[kind],
        "variables": len(variables),
        "lr_rules": len(rules),
        "decay_rules": len(decay_rules),
        "variables_matching_no_lr_rule": sum(e.lr_rule is None for e in entries),
        "resolve_s": statistics.median(runs),
        "resolve_runs_s": runs,
        "build_s": build_s,
    }


def measure(n_variables: int = 10_000, n_rules: int = 100, repeats: int = 3,
            kinds=tuple(KINDS)) -> dict:
    """Every kind; the top-level figures are the path rules' (the historical row)."""
    results = {}
    model = None
    for kind in kinds:
        if kind != "paths" and model is None:
            model = make_model(n_variables, n_rules)  # shared: building it dominates
        results[kind] = measure_kind(kind, n_variables, n_rules, repeats, _model=model)
    first = results[kinds[0]]
    return {
        "variables": first["variables"],
        "lr_rules": first["lr_rules"],
        "decay_rules": first["decay_rules"],
        "variables_matching_no_lr_rule": first["variables_matching_no_lr_rule"],
        "resolve_s": first["resolve_s"],
        "resolve_runs_s": first["resolve_runs_s"],
        "build_s": first["build_s"],
        "kinds": results,
    }


def table(result: dict) -> str:
    """A Markdown PASS/FAIL row per kind."""
    lines = ["| selectors | variables x rules | no rule matches | resolve (median) | "
             f"build | < {RESOLVE_MAX_S:g} s |", "|---|---|---|---|---|---|"]
    for r in result["kinds"].values():
        lines.append(
            f"| {r['label']} | {r['variables']:,} x {r['lr_rules']} | "
            f"{r['variables_matching_no_lr_rule']:,} | {r['resolve_s']:.3f} s | "
            f"{r['build_s']:.2f} s | {'PASS' if r['resolve_s'] < RESOLVE_MAX_S else 'FAIL'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._resolve_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--variables", type=int, default=10_000)
    p.add_argument("--rules", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--json", type=str, default=None, metavar="FILE", help="also write the figures")
    args = p.parse_args(argv)
    result = measure(args.variables, args.rules, args.repeats, tuple(args.kinds))
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}")
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
