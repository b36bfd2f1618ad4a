"""How far each layer sits from a model's output, for layer-wise LR decay.

`layer_depths` turns a model into a DAG of *leaf calls*: every call of a layer
that is not itself a model (a `Dense`, a `MultiHeadAttention`, a custom
`Block` layer with sublayers: one leaf), with nested models expanded in place.
Functional models give the DAG from their Keras graph, Sequential models from
their layer order, and subclassed models from one traced call on a sample
input (their ``model.layers`` is attribute order, not execution order).

The leaves are then grouped into *units* that share a depth, and a unit's depth
is the largest number of units with trainable weights after it on any path to
an output (so the output head is at 0, and two parallel towers each count back
from where they merge). Units:

- automatic: each leaf is a unit, except that a block closed by a join
  (the ``Add`` of a residual connection, the ``Concatenate`` of parallel
  branches, the ``Multiply`` of a gate) is one unit with its join when no
  layer inside it feeds anything outside it. The block is everything on a path
  from the fork (the last layer all the join's inputs come from) to the join.
  Inputs entering from elsewhere, such as attention masks or an encoder's
  output, do not break it. A block inside a block is part of the outer one.
- with a block pattern: the layers whose names match with the same captured
  groups form one unit, together with every layer between them (and the
  weightless layers right after them, such as the unnamed closing ``Add``);
  all layers before the first block form one *stem* unit; every other layer
  is a unit.
- in both cases, a normalization layer that is a unit on its own joins the
  unit of the layer whose output it normalizes (Conv + BatchNormalization is
  one step).

Only layers holding variables created trainable count as steps (frozen layers
included: their depth does not change when they are unfrozen later).
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import keras

from layerlr.core import _keras

_MISSING = object()


# --- small helpers -------------------------------------------------------------


def _normalization_types() -> tuple[type, ...]:
    names = ("BatchNormalization", "LayerNormalization", "GroupNormalization", "RMSNormalization")
    return tuple(t for t in (getattr(keras.layers, n, None) for n in names) if t is not None)


NORMALIZATION_TYPES = _normalization_types()
"""Layers whose parameters are normalization scales/offsets, found by type."""


def _is_functional(layer) -> bool:
    return isinstance(layer, keras.Model) and _keras.is_functional(layer)


def _sublayers(layer, recursive: bool = True) -> list:
    return _keras.sublayers(layer, include_self=False, recursive=recursive)


def _own_params(layer) -> list:
    """Variables `layer` itself created trainable (frozen or not), sublayers excluded."""
    return _keras.created_trainable(layer)


def params(layer) -> list:
    """Variables created trainable by `layer` or its sublayers, frozen ones included.

    `layer.trainable_weights` is empty while a layer is frozen, and
    `layer.weights` also holds statistics (BatchNormalization's moving mean)
    no optimizer ever trains.
    """
    seen: set[int] = set()
    found = []
    for sub in _keras.sublayers(layer):
        for variable in _own_params(sub):
            if id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _names(layers, limit: int = 8) -> str:
    names = [repr(getattr(layer, "name", str(layer))) for layer in layers]
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


# --- tracing subclassed models ---------------------------------------------------


@dataclass(eq=False)
class _Call:
    layer: Any
    children: list = field(default_factory=list)


class _NeedsTrace(Exception):
    def __init__(self, layer):
        super().__init__(layer.name)
        self.layer = layer


def _trace(model, sample_input) -> dict[int, list[_Call]]:
    """Calls `model` once in inference mode, recording which layer called which.

    Each layer's `call` is wrapped on the instance (never on the class, so
    other models are unaffected) and restored afterwards.
    """
    root = _Call(None)
    stack = [root]
    calls: dict[int, list[_Call]] = defaultdict(list)

    def wrap(layer, original):
        def traced_call(*args, **kwargs):
            record = _Call(layer)
            stack[-1].children.append(record)
            calls[id(layer)].append(record)
            stack.append(record)
            try:
                return original(*args, **kwargs)
            finally:
                stack.pop()

        return traced_call

    patched = []
    try:
        for layer in _keras.sublayers(model):
            previous = layer.__dict__.get("call", _MISSING)
            # object.__setattr__: Keras' (and TF's, torch's) attribute tracking
            # must not see the wrapper.
            object.__setattr__(layer, "call", wrap(layer, layer.call))
            patched.append((layer, previous))
        model(sample_input, training=False)
    finally:
        for layer, previous in reversed(patched):
            if previous is _MISSING:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)
    return calls


# --- the DAG of leaf calls -------------------------------------------------------


class _Builder:
    """Expands a model into leaf calls. Node ids are a topological order."""

    def __init__(self, pattern: re.Pattern | None, calls: dict[int, list[_Call]] | None):
        self.pattern = pattern
        self.calls = calls
        self.ops: list = []  # the leaf layer / keras op called; None for inputs and joins
        self.parents: list[list[int]] = []
        self.keys: list = []  # block key from `pattern`, or None
        self.containers: list[tuple[Any, int, int]] = []  # (layer, first node, end)
        self._calls_used: dict[int, int] = defaultdict(int)

    def add(self, op, parents, key=None) -> int:
        self.ops.append(op)
        self.parents.append(sorted(set(parents)))
        self.keys.append(key)
        return len(self.ops) - 1

    def join(self, ids: list[int]) -> int:
        unique = sorted(set(ids))
        return unique[0] if len(unique) == 1 else self.add(None, unique)

    def fit(self, outputs: list[int], n_out: int) -> list[int]:
        if len(outputs) == n_out:
            return outputs
        return [self.join(outputs)] * n_out

    def build(self, model) -> list[int]:
        functional = _is_functional(model)
        inputs = [self.add(None, []) for _ in (model.inputs if functional else [None])]
        n_out = len(model.outputs) if functional else 1
        return self.expand(model, inputs, n_out, None, None, top=True)

    def key_of(self, layer, inherited):
        if self.pattern is None:
            return inherited
        match = self.pattern.search(layer.name)
        if match is None:
            return inherited
        return match.groups() if self.pattern.groups else match.group(0)

    def holds_blocks(self, layer) -> bool:
        return self.pattern is not None and any(
            self.pattern.search(sub.name) for sub in _sublayers(layer)
        )

    def expand(self, op, parents, n_out, key, call, top=False) -> list[int]:
        if not isinstance(op, keras.Layer):  # a keras.ops operation in a functional graph
            return [self.add(op, parents, key)] * n_out
        if not top:  # the model itself is never a block, whatever its name
            key = self.key_of(op, key)
        if isinstance(op, keras.Sequential):
            outputs = self.container(op, parents, key, [(layer, None) for layer in op.layers])
        elif _is_functional(op):
            return self.functional(op, parents, n_out, key)
        elif _sublayers(op, recursive=False) and (
            isinstance(op, keras.Model) or top or self.holds_blocks(op)
        ):
            outputs = self.container(op, parents, key, self.traced_children(op, call))
        else:
            outputs = None
        if outputs is None:  # a leaf, or a container that called no sublayer
            return [self.add(op, parents, key)] * n_out
        return self.fit(outputs, n_out)

    def container(self, layer, parents, key, children) -> list[int] | None:
        start = len(self.ops)
        current = list(parents)
        for child, child_call in children:
            current = self.expand(child, current, 1, key, child_call)
        if len(self.ops) == start:
            return None
        self.containers.append((layer, start, len(self.ops)))
        return current

    def traced_children(self, layer, call) -> list[tuple[Any, _Call]]:
        if call is None:
            if self.calls is None:
                raise _NeedsTrace(layer)
            records = self.calls.get(id(layer), [])
            if not records:
                return []
            # The k-th time the graph reaches this layer is its k-th traced call.
            index = min(self._calls_used[id(layer)], len(records) - 1)
            self._calls_used[id(layer)] += 1
            call = records[index]
        return [(record.layer, record) for record in call.children]

    def functional(self, model, parents, n_out, key) -> list[int]:
        inputs = model.inputs
        if len(parents) == len(inputs):
            tensors = {id(t): p for t, p in zip(inputs, parents)}
        else:
            joined = self.join(parents) if parents else self.add(None, [])
            tensors = {id(t): joined for t in inputs}
        start = len(self.ops)
        # Same order as Keras' own execution (`Function._run_through_graph`),
        # so traced calls of layers inside line up with these nodes.
        nodes = _keras.nodes_by_depth(model)
        for depth in sorted(nodes, reverse=True):
            for node in nodes[depth]:
                if node.operation is None or node.is_input:
                    continue
                node_parents = [tensors[id(t)] for t in node.input_tensors if id(t) in tensors]
                outputs = self.expand(node.operation, node_parents, len(node.outputs), key, None)
                for tensor, output in zip(node.outputs, outputs):
                    tensors[id(tensor)] = output
        self.containers.append((model, start, len(self.ops)))
        return self.fit([tensors[id(t)] for t in model.outputs], n_out)


# --- units and depths ------------------------------------------------------------


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


class _Dag:
    def __init__(self, builder: _Builder, outputs: list[int], param_cache: dict[int, list]):
        self.b = builder
        n = len(builder.ops)
        self.n = n
        self.weighted = [
            isinstance(op, keras.Layer) and bool(param_cache.setdefault(id(op), params(op)))
            for op in builder.ops
        ]
        self.children: list[list[int]] = [[] for _ in range(n)]
        for v, ps in enumerate(builder.parents):
            for p in ps:
                self.children[p].append(v)
        # A node carries features once a weighted layer is upstream of it (or
        # is it); the rest (inputs, masks computed from them) is side data.
        self.feature = [False] * n
        for v in range(n):
            self.feature[v] = self.weighted[v] or any(self.feature[p] for p in builder.parents[v])
        live = [False] * n
        out_set = set(outputs)
        for v in reversed(range(n)):
            live[v] = v in out_set or any(live[c] for c in self.children[v])
        self.keep = [self.feature[v] and live[v] for v in range(n)]
        self.outputs = out_set
        self.anc = [0] * n  # ancestors-or-self, as bitsets over node ids
        for v in range(n):
            bits = 1 << v
            for p in builder.parents[v]:
                bits |= self.anc[p]
            self.anc[v] = bits
        self.desc = [0] * n  # descendants-or-self
        for v in reversed(range(n)):
            bits = 1 << v
            for c in self.children[v]:
                bits |= self.desc[c]
            self.desc[v] = bits
        self.keep_mask = sum(1 << v for v in range(n) if self.keep[v])

    def name(self, v: int) -> str:
        op = self.b.ops[v]
        return getattr(op, "name", "?") if op is not None else "?"

    # Automatic units: closed blocks fold into their join.
    def fold_blocks(self, units: _UnionFind) -> None:
        for j in range(self.n):
            # Side data (masks from the inputs) never makes a join.
            ps = [p for p in self.b.parents[j] if self.feature[p]]
            if not self.keep[j] or len(ps) < 2:
                continue
            common = self.anc[ps[0]]
            for p in ps[1:]:
                common &= self.anc[p]
            if not common:
                continue  # inputs from separate model inputs: towers, not a block
            fork = common.bit_length() - 1
            inner = self.desc[fork] & self.anc[j] & ~(1 << fork) & ~(1 << j)
            region = inner | (1 << j)
            if any(
                self.feature[v] and any(self.keep[c] and not (region >> c) & 1 for c in self.children[v])
                for v in _bits(inner)
            ):
                continue  # a layer inside feeds something outside: not a block
            for v in _bits(region & self.keep_mask):
                units.union(j, v)

    # Token, position and segment embeddings summed into one tensor (BERT,
    # GPT, KerasHub backbones) are one step, the stem: the join whose only
    # weighted ancestors are embedding layers takes them all, with the layers
    # between them (a position embedding called on the token embedding).
    def merge_embeddings(self, units: _UnionFind) -> None:
        for j in range(self.n):
            parents = [p for p in self.b.parents[j] if self.feature[p]]
            if not self.keep[j] or self.weighted[j] or len(parents) < 2:
                continue
            upstream = [v for v in _bits(self.anc[j] & ~(1 << j)) if self.weighted[v] and self.keep[v]]
            if len(upstream) >= 2 and all(_is_embedding(self.b.ops[v]) for v in upstream):
                for v in upstream:
                    units.union(j, v)

    # A normalization layer on its own is part of the layer whose output it
    # normalizes, so Conv + BatchNormalization (or a post-LN Add +
    # LayerNormalization) is one step. One already inside a block (a pre-LN
    # LayerNormalization) stays there: its input comes from the block before.
    def merge_normalizations(self, units: _UnionFind) -> None:
        size: dict[int, int] = defaultdict(int)
        for v in range(self.n):
            if self.keep[v]:
                size[units.find(v)] += 1
        for v in range(self.n):
            if not (self.keep[v] and isinstance(self.b.ops[v], NORMALIZATION_TYPES)):
                continue
            if size[units.find(v)] > 1:
                continue
            node = v
            while True:
                feature_parents = [p for p in self.b.parents[node] if self.feature[p]]
                if len(feature_parents) != 1:
                    break
                node = feature_parents[0]
                units.union(v, node)
                if self.weighted[node]:
                    break

    # Units named by the block pattern, and the stem before them.
    def pattern_units(self, units: _UnionFind, pattern: re.Pattern) -> set[int]:
        members: dict[Any, list[int]] = defaultdict(list)
        for v in range(self.n):
            if self.keep[v] and self.b.keys[v] is not None:
                members[self.b.keys[v]].append(v)
        if not any(self.weighted[v] for vs in members.values() for v in vs):
            raise ValueError(
                f"block_pattern {pattern.pattern!r} matches no layer with trainable "
                "weights on the way from the inputs to the outputs. Layers with "
                f"weights: {_names(self._weighted_layers())}."
            )
        owner: dict[int, Any] = {}
        hull_bits = 0
        for key, vs in members.items():
            down = up = 0
            for v in vs:
                down |= self.desc[v]
                up |= self.anc[v]
            hull = down & up & self.keep_mask
            for v in _bits(hull):
                if v in owner and owner[v] != key:
                    raise ValueError(
                        f"block_pattern {pattern.pattern!r} gives interleaved blocks: "
                        f"layer {self.name(v)!r} lies between layers of block "
                        f"{_show_key(owner[v])} and between layers of block "
                        f"{_show_key(key)}. Make the pattern capture one group per "
                        "block, e.g. r'encoder_(\\d+)' rather than r'(\\d+)'."
                    )
                owner[v] = key
                units.union(vs[0], v)
            hull_bits |= hull
        # The unnamed Add closing a block (all its inputs from the block) and
        # weightless layers right after it belong to the block too.
        for v in range(self.n):
            if v in owner or not self.keep[v] or self.weighted[v]:
                continue
            keys = {owner.get(p, _MISSING) for p in self.b.parents[v] if self.feature[p]}
            if len(keys) == 1 and _MISSING not in keys:
                owner[v] = keys.pop()
                units.union(v, next(p for p in self.b.parents[v] if self.feature[p]))
                hull_bits |= 1 << v
        before = after = 0
        for v in _bits(hull_bits):
            before |= self.anc[v]
            after |= self.desc[v]
        stem = set(_bits(before & ~after & ~hull_bits & self.keep_mask))
        for v in stem:
            units.union(min(stem), v)
        return stem

    def _weighted_layers(self):
        seen, layers = set(), []
        for v in range(self.n):
            op = self.b.ops[v]
            if self.weighted[v] and id(op) not in seen:
                seen.add(id(op))
                layers.append(op)
        return layers

    def depths(self, units: _UnionFind) -> dict[int, int]:
        """Longest path to an output, counted in weighted units."""
        nodes = [v for v in range(self.n) if self.keep[v]]
        unit_of = {v: units.find(v) for v in nodes}
        weighted: dict[int, bool] = defaultdict(bool)
        succ: dict[int, set[int]] = defaultdict(set)
        indegree: dict[int, int] = defaultdict(int)
        for v in nodes:
            u = unit_of[v]
            weighted[u] |= self.weighted[v]
            indegree.setdefault(u, 0)
        for v in nodes:
            for c in self.children[v]:
                if self.keep[c] and unit_of[c] != unit_of[v] and unit_of[c] not in succ[unit_of[v]]:
                    succ[unit_of[v]].add(unit_of[c])
                    indegree[unit_of[c]] += 1
        order, ready = [], sorted(u for u, d in indegree.items() if d == 0)
        while ready:
            u = ready.pop()
            order.append(u)
            for c in succ[u]:
                indegree[c] -= 1
                if indegree[c] == 0:
                    ready.append(c)
        if len(order) != len(indegree):
            raise ValueError(
                "The layer groups form a cycle, so no depth order exists: a group "
                "has layers both before and after another group. Check "
                "block_pattern: each block must be a contiguous run of layers."
            )
        depth: dict[int, int] = {}
        for u in reversed(order):
            depth[u] = max((depth[c] + weighted[c] for c in succ[u]), default=0)
        return {v: depth[unit_of[v]] for v in nodes}


def _is_embedding(op) -> bool:
    """Embedding layers: Keras' and subclasses, or any layer class named *Embedding."""
    return isinstance(op, keras.layers.Embedding) or type(op).__name__.endswith("Embedding")


def _show_key(key) -> str:
    if isinstance(key, tuple):
        key = key[0] if len(key) == 1 else key
    return repr(key)


# --- the public entry (used by layer_decay) ---------------------------------------


def _check_model(model) -> None:
    if not isinstance(model, keras.Layer):
        raise TypeError(
            f"Expected a Keras model or layer, got {model!r} of type {type(model).__name__}."
        )


def _compile_pattern(block_pattern) -> re.Pattern | None:
    if block_pattern is None:
        return None
    if isinstance(block_pattern, re.Pattern):
        return block_pattern
    if isinstance(block_pattern, str):
        try:
            return re.compile(block_pattern)
        except re.error as error:
            raise ValueError(f"block_pattern {block_pattern!r} is not a valid regex: {error}.") from None
    raise TypeError(
        "block_pattern must be a regex string or re.Pattern naming the blocks, e.g. "
        f"r'transformer_layer_(\\d+)', got {block_pattern!r}."
    )


def layer_depths(
    model,
    *,
    sample_input=None,
    block_pattern: str | re.Pattern | None = None,
    stem_depth: int | None = None,
) -> list[tuple[Any, int]]:
    """``(layer or variable, depth)`` for every weight of `model`, head first.

    Depth 0 is the output head. See the module docstring for how depth is
    counted and `layerlr.layer_decay` for the arguments.
    """
    _check_model(model)
    pattern = _compile_pattern(block_pattern)
    if stem_depth is not None:
        if isinstance(stem_depth, bool) or not isinstance(stem_depth, int) or stem_depth < 0:
            raise ValueError(f"stem_depth must be an int >= 0, got {stem_depth!r}.")
        if pattern is None:
            raise ValueError(
                "stem_depth needs block_pattern: the stem is every layer before the "
                "first block the pattern names, e.g. layer_decay(model, 0.75, "
                "block_pattern=r'transformer_layer_(\\d+)', stem_depth=13)."
            )
    if not model.built:
        if sample_input is None:
            raise ValueError(
                f"The model {model.name!r} is not built, so it has no weights to give "
                "a depth. Call it on a batch first, or pass sample_input=<a batch>."
            )
        model(sample_input, training=False)
    if pattern is not None:
        names = [layer.name for layer in _sublayers(model)]
        if not any(pattern.search(name) for name in names):
            raise ValueError(
                f"block_pattern {pattern.pattern!r} matches none of the layer names "
                f"({_names(_sublayers(model), 12)}). It is searched in each layer's "
                "name (re.search), not in variable paths."
            )
    try:
        builder = _Builder(pattern, None)
        outputs = builder.build(model)
    except _NeedsTrace as need:
        if sample_input is None:
            raise ValueError(
                f"{need.layer.name!r} is a subclassed {type(need.layer).__name__}: its "
                "layers are listed in attribute order, not in the order they run. Pass "
                "sample_input=<a batch> so layer_decay can call the model once "
                "(training=False) and record the order."
            ) from None
        builder = _Builder(pattern, _trace(model, sample_input))
        outputs = builder.build(model)
    return _collect(model, builder, outputs, pattern, stem_depth)


def _collect(model, builder, outputs, pattern, stem_depth) -> list[tuple[Any, int]]:
    cache: dict[int, list] = {}
    dag = _Dag(builder, outputs, cache)
    units = _UnionFind(dag.n)
    stem: set[int] = set()
    if pattern is None:
        dag.fold_blocks(units)
        dag.merge_embeddings(units)
    else:
        stem = dag.pattern_units(units, pattern)
    dag.merge_normalizations(units)
    node_depth = dag.depths(units)
    if stem_depth is not None:
        if not any(dag.weighted[v] for v in stem):
            raise ValueError(
                f"stem_depth was given, but no layer with weights comes before the first "
                f"block named by block_pattern {pattern.pattern!r}."
            )
        for v in stem:
            node_depth[v] = stem_depth

    entries: dict[int, list] = {}  # id(selector) -> [selector, depth, first node]
    for v, d in node_depth.items():
        op = builder.ops[v]
        if not dag.weighted[v]:
            continue
        entry = entries.setdefault(id(op), [op, d, v])
        entry[1] = min(entry[1], d)  # a shared layer: its call nearest the output
    covered = {id(w) for op, _, _ in entries.values() for w in cache[id(op)]}
    for layer, start, end in builder.containers:
        own = [w for w in _own_params(layer) if id(w) not in covered]
        inside = [node_depth[v] for v in range(start, end) if v in node_depth]
        if own and inside:
            # A model's own weights (a class token, position embeddings) are
            # used where its computation starts.
            for w in own:
                entries[id(w)] = [w, max(inside), start]
                covered.add(id(w))
    missing = [w for w in params(model) if id(w) not in covered]
    if missing:
        warnings.warn(
            f"layer_decay: {len(missing)} trainable variable(s) "
            f"({', '.join(repr(w.path) for w in missing[:6])}{', ...' if len(missing) > 6 else ''}) "
            "belong to layers that were not called on the way from the inputs to the "
            "outputs (in the traced call, if any, which runs with training=False). "
            "They get no layer_decay rule and keep lr_mult 1.0; put a rule of your "
            "own for them before the layer_decay rules if that is wrong.",
            stacklevel=4,
        )
    ordered = sorted(entries.values(), key=lambda e: (e[1], e[2]))
    return [(selector, d) for selector, d, _ in ordered]
