"""Reading Caffe's ``lr_mult`` / ``decay_mult`` from a net ``.prototxt``.

Parsing: a ``.prototxt`` is protobuf text format, but typed parsing
(``google.protobuf.text_format.Parse``) needs the ``caffe.proto`` schema, which
ships with neither protobuf nor TensorFlow. A partial schema would either
reject the many valid fields we do not model (and every fork's extra layer
parameters: SSD, Faster R-CNN, ...) or need ``allow_unknown_field=True``,
which silently drops typos such as ``lr_mul: 0``, turning a frozen layer into
a trained one. So we read the file with protobuf's own text-format lexer
(``text_format.Tokenizer``: comments, quoting and escapes, ``inf``/``1e-3f``
numbers, all exactly as protobuf) into a schema-free tree, and check strictly
only what we consume: every field of ``param { }`` (``ParamSpec`` has four),
and misplaced or misspelled multiplier fields at the layer level.

Blobs: Caffe lists one ``param { }`` per blob in the layer's blob order. For
most layers blob 0 is the weights (Keras ``kernel``) and blob 1 the bias; the
few layer types whose blobs are named otherwise in Keras are in `_BLOB_NAMES`.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TypedDict, Union


class CaffeRules(TypedDict):
    """Rules for `LayerwiseOptimizer`: ``LayerwiseOptimizer(opt, **rules)``."""

    lr_mult: list[tuple[str, float]]
    decay_mult: list[tuple[str, float]]


LayerNameMap = Union[Mapping[str, Optional[str]], Callable[[str], Optional[str]]]

_DEFAULT_BLOBS = ("kernel", "bias")
_BLOB_NAMES = {
    # Caffe's BatchNorm (statistics) + Scale (gamma, beta) pair is one Keras
    # BatchNormalization: map the Scale layer's name onto it.
    "Scale": ("gamma", "beta"),
    "Bias": ("bias",),
    "PReLU": ("alpha",),
    "Embed": ("embeddings", "bias"),
}
_PARAM_SPEC_FIELDS = ("name", "share_mode", "lr_mult", "decay_mult")
_MULT_FIELDS = ("param", "lr_mult", "decay_mult", "blobs_lr", "weight_decay")
_SOLVER_FIELDS = ("base_lr", "lr_policy", "net", "train_net", "max_iter", "solver_mode")


# --- schema-free text-format tree ---------------------------------------------


def _text_format():
    # protobuf comes with TensorFlow but not with Keras, JAX or torch: only
    # from_caffe needs it, so `import layerlr` must not.
    try:
        from google.protobuf import text_format
    except ImportError:
        raise ImportError(
            "layerlr.from_caffe reads prototxt files with protobuf's text-format "
            "lexer: install it with `pip install protobuf`."
        ) from None
    return text_format


@dataclass
class _Message:
    fields: list[tuple[str, object]]

    def all(self, name: str) -> list:
        return [value for key, value in self.fields if key == name]

    def one(self, name: str, where: str):
        values = self.all(name)
        if len(values) > 1:
            raise ValueError(f"{where} has {len(values)} '{name}' fields; it takes one.")
        return values[0] if values else None


@dataclass
class _Scalar:
    text: str
    quoted: bool

    def __str__(self):
        return self.text


def _parse_value(tokenizer):
    if tokenizer.token[:1] in ("'", '"'):
        return _Scalar(tokenizer.ConsumeString(), quoted=True)
    token = tokenizer.token
    if not token or not (token[0].isalnum() or token[0] in "_.+-"):
        raise tokenizer.ParseError(f"Expected a value, found {token!r}.")
    tokenizer.NextToken()
    return _Scalar(token, quoted=False)


def _parse_message_body(tokenizer, closing: str | None) -> _Message:
    fields: list[tuple[str, object]] = []
    while True:
        if closing is None and tokenizer.AtEnd():
            return _Message(fields)
        if closing is not None and tokenizer.TryConsume(closing):
            return _Message(fields)
        if tokenizer.AtEnd():
            raise tokenizer.ParseError(f"Missing '{closing}' at the end of the text.")
        name = tokenizer.ConsumeIdentifierOrNumber()
        colon = tokenizer.TryConsume(":")
        if tokenizer.TryConsume("{"):
            fields.append((name, _parse_message_body(tokenizer, "}")))
        elif tokenizer.TryConsume("<"):
            fields.append((name, _parse_message_body(tokenizer, ">")))
        elif not colon:
            raise tokenizer.ParseError(f"Expected ':' or '{{' after the field name {name!r}.")
        elif tokenizer.TryConsume("["):  # short repeated form: blobs_lr: [1, 2]
            while not tokenizer.TryConsume("]"):
                if tokenizer.TryConsume("{"):
                    fields.append((name, _parse_message_body(tokenizer, "}")))
                else:
                    fields.append((name, _parse_value(tokenizer)))
                if not tokenizer.LookingAt("]"):
                    tokenizer.Consume(",")
        else:
            fields.append((name, _parse_value(tokenizer)))
        if not tokenizer.TryConsume(","):
            tokenizer.TryConsume(";")


def _parse_text(text: str, source: str) -> _Message:
    text_format = _text_format()
    try:
        return _parse_message_body(text_format.Tokenizer(text.split("\n")), None)
    except text_format.ParseError as error:
        raise ValueError(f"{source} is not valid protobuf text format: {error}") from None


# --- reading the net ------------------------------------------------------------


@dataclass
class _Layer:
    name: str
    type: str
    params: list[tuple[float | None, float | None]]  # per blob: (lr_mult, decay_mult)
    # Per blob: the param's sharing name (param { name: ... }), or None.
    shared_names: list[str | None] | None = None


def _number(value, what: str) -> float:
    if isinstance(value, _Message) or value.quoted:
        raise ValueError(f"{what} must be a number, got {_show(value)}.")
    try:
        number = _text_format().ParseFloat(value.text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {value.text!r}.") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value.text}.")
    return number


def _string(value, what: str) -> str:
    if isinstance(value, _Message):
        raise ValueError(f"{what} must be a string, got a message {{ ... }}.")
    return value.text


def _show(value) -> str:
    return "a message { ... }" if isinstance(value, _Message) else repr(value.text)


def _check_misplaced(message: _Message, allowed: tuple[str, ...], where: str, hint: str) -> None:
    """Rejects multiplier fields in the wrong place and near-misses of them."""
    for key, _ in message.fields:
        if key in allowed:
            continue
        if key in _MULT_FIELDS:
            raise ValueError(f"{where}: '{key}' does not belong here. {hint}")
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.8)
        if close:
            raise ValueError(
                f"{where}: unknown field '{key}'; did you mean '{close[0]}'? {hint}"
            )


def _read_param_spec(spec, where: str) -> tuple[float | None, float | None]:
    if not isinstance(spec, _Message):
        raise ValueError(f"{where}: 'param' must be a block param {{ lr_mult: ... }}.")
    for key, _ in spec.fields:
        if key not in _PARAM_SPEC_FIELDS:
            close = difflib.get_close_matches(key, _PARAM_SPEC_FIELDS, n=1, cutoff=0.6)
            raise ValueError(
                f"{where}: unknown field '{key}' in param {{ }}"
                + (f"; did you mean '{close[0]}'?" if close else ".")
                + " A param block takes name, share_mode, lr_mult and decay_mult."
            )
    lr = spec.one("lr_mult", where)
    decay = spec.one("decay_mult", where)
    return (
        None if lr is None else _number(lr, f"{where}: lr_mult"),
        None if decay is None else _number(decay, f"{where}: decay_mult"),
    )


_NEW_LAYER_HINT = (
    "In a layer { } block, multipliers go in one param { lr_mult: ... decay_mult: ... } "
    "per blob."
)
_V1_LAYER_HINT = (
    "In the old layers { } format, multipliers are repeated blobs_lr: ... and "
    "weight_decay: ... fields, one per blob."
)


def _read_layer(block, index: int) -> _Layer:
    where, name, layer_type = _layer_head(block, "layer", index)
    _check_misplaced(block, ("param",), where, _NEW_LAYER_HINT)
    specs = block.all("param")
    params = [_read_param_spec(spec, f"{where} param #{i}") for i, spec in enumerate(specs)]
    shared = []
    for i, spec in enumerate(specs):
        value = spec.one("name", f"{where} param #{i}")
        shared.append(None if value is None else _string(value, f"{where} param #{i} name"))
    _require_name(name, params, where, "param blocks")
    return _Layer(name, _type_text(layer_type, where), params, shared)


def _read_v1_layer(block, index: int) -> _Layer:
    where, name, layer_type = _layer_head(block, "layers", index, _refuse_v0)
    # V1's `param` holds blob-sharing names (strings), not multipliers.
    _check_misplaced(block, ("blobs_lr", "weight_decay", "param"), where, _V1_LAYER_HINT)
    for value in block.all("param"):
        if isinstance(value, _Message):
            raise ValueError(f"{where}: param {{ }} blocks belong to the new layer {{ }} format. {_V1_LAYER_HINT}")
    v1_shared = [str(v) for v in block.all("param")]
    lrs = [_number(v, f"{where}: blobs_lr") for v in block.all("blobs_lr")]
    decays = [_number(v, f"{where}: weight_decay") for v in block.all("weight_decay")]
    count = max(len(lrs), len(decays))
    params = [
        (lrs[i] if i < len(lrs) else None, decays[i] if i < len(decays) else None)
        for i in range(count)
    ]
    _require_name(name, params, where, "multipliers")
    # Blobs that are only shared by name still take a place in the blob order.
    count = max(count, len(v1_shared))
    params += [(None, None)] * (count - len(params))
    shared = [v1_shared[i] if i < len(v1_shared) else None for i in range(count)]
    return _Layer(name, _type_text(layer_type, where), params, shared)


def _refuse_v0(block, where: str) -> None:
    if block.all("layer"):
        raise ValueError(
            f"{where} nests a layer {{ }} block: this is Caffe's V0 format. Upgrade "
            "the file with Caffe's upgrade_net_proto_text tool first."
        )


def _layer_head(block, keyword: str, index: int, check_format=None):
    """``(where, name or None, raw type field)`` of a ``layer``/``layers`` block.

    ``where`` names the layer in errors: by its name once it has one, else by
    its position. ``check_format(block, where)`` runs before the name is read,
    so a block of another format is reported as that, not as a bad name.
    """
    where = f"{keyword} #{index}"
    if not isinstance(block, _Message):
        raise ValueError(f"{where} must be a block {keyword} {{ ... }}, got {_show(block)}.")
    if check_format is not None:
        check_format(block, where)
    name = block.one("name", where)
    if name is not None:
        name = _string(name, where + " name")
        where = f"{keyword} {name!r}"
    return where, name, block.one("type", where)


def _require_name(name, params, where: str, what: str) -> None:
    if params and name is None:
        raise ValueError(f"{where} has {what} but no name, so no Keras layer can match it.")


def _type_text(layer_type, where: str) -> str:
    return "" if layer_type is None else _string(layer_type, f"{where} type")


def _read_net(net: _Message, source: str) -> list[_Layer]:
    new, old = net.all("layer"), net.all("layers")
    if new and old:
        raise ValueError(
            f"{source} mixes layer {{ }} and the old layers {{ }} blocks, which Caffe "
            "rejects too. Upgrade it with Caffe's upgrade_net_proto_text tool."
        )
    if not new and not old:
        keys = {key for key, _ in net.fields}
        inline = [v for key in ("net_param", "train_net_param") for v in net.all(key)]
        if keys & set(_SOLVER_FIELDS + ("net_param", "train_net_param")) and inline:
            if len(inline) > 1:
                raise ValueError(
                    f"{source} is a solver with {len(inline)} inline nets (net_param / "
                    "train_net_param); pass the one to read: its text, or a net prototxt."
                )
            if not isinstance(inline[0], _Message):
                raise ValueError(f"{source}: net_param must be a block net_param {{ layer {{ ... }} }}.")
            return _read_net(inline[0], f"{source} (its net_param)")
        if keys & set(_SOLVER_FIELDS):
            nets = [str(v) for key in ("net", "train_net") for v in net.all(key) if isinstance(v, _Scalar)]
            named = f" (it names {nets[0]!r})" if nets else ""
            raise ValueError(
                f"{source} is a solver prototxt, not a net: pass the net prototxt"
                f"{named}. Its base_lr and weight_decay go on the Keras optimizer."
            )
        close = [k for k in keys if difflib.get_close_matches(k, ("layer", "layers"), cutoff=0.8)]
        hint = f" Found {sorted(close)}: did you mean 'layer'?" if close else ""
        raise ValueError(f"{source} has no layer {{ }} blocks.{hint}")
    if new:
        return [_read_layer(block, i) for i, block in enumerate(new)]
    return [_read_v1_layer(block, i) for i, block in enumerate(old)]


# --- rules --------------------------------------------------------------------


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _blob_names(layer: _Layer) -> tuple[str, ...]:
    names = _BLOB_NAMES.get(layer.type, _DEFAULT_BLOBS)
    if len(layer.params) > len(names):
        known = ", ".join(names)
        raise ValueError(
            f"Caffe layer {layer.name!r} (type {layer.type or 'unknown'!r}) has "
            f"{len(layer.params)} param blocks, but layerlr maps only {len(names)} "
            f"blob(s) of this layer type to Keras variables ({known}). Skip it with "
            f"layer_name_map={{{layer.name!r}: None}} and give its variables rules by hand."
        )
    return names


def _keras_names(layers: list[_Layer], layer_name_map) -> dict[str, str | None]:
    caffe_names = [layer.name for layer in layers if layer.name is not None]
    if layer_name_map is None:
        return {n: n for n in caffe_names}
    if isinstance(layer_name_map, Mapping):
        unknown = [k for k in layer_name_map if k not in caffe_names]
        if unknown:
            hints = [
                f"{k!r} (closest: {difflib.get_close_matches(str(k), caffe_names, n=1, cutoff=0.5)})"
                for k in unknown
            ]
            raise ValueError(
                "layer_name_map names layers that are not in the prototxt: "
                + ", ".join(hints) + "."
            )
        mapping = {n: layer_name_map.get(n, n) for n in caffe_names}
    elif callable(layer_name_map):
        mapping = {n: layer_name_map(n) for n in caffe_names}
    else:
        raise TypeError(
            "layer_name_map must be a dict {caffe_name: keras_name or None} or a "
            f"function caffe_name -> keras_name or None, got {layer_name_map!r}."
        )
    for caffe_name, keras_name in mapping.items():
        if keras_name is not None and not (isinstance(keras_name, str) and keras_name):
            raise TypeError(
                f"layer_name_map gives {keras_name!r} for the Caffe layer "
                f"{caffe_name!r}; expected a Keras layer name (a non-empty str) or None "
                "to skip the layer."
            )
    return mapping


def _read_source(prototxt_text_or_path) -> tuple[str, str]:
    if isinstance(prototxt_text_or_path, os.PathLike) or (
        isinstance(prototxt_text_or_path, str)
        and "{" not in prototxt_text_or_path
        and "\n" not in prototxt_text_or_path
    ):
        path = Path(prototxt_text_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No prototxt file at {str(path)!r}. Pass the path of a net "
                ".prototxt or the prototxt text itself."
            )
        return path.read_text(encoding="utf-8"), f"The prototxt {str(path)!r}"
    if isinstance(prototxt_text_or_path, str):
        return prototxt_text_or_path, "The prototxt text"
    raise TypeError(
        "from_caffe takes the prototxt text (a str) or a path to it, got "
        f"{type(prototxt_text_or_path).__name__}."
    )


def from_caffe(
    prototxt_text_or_path: str | os.PathLike,
    layer_name_map: LayerNameMap | None = None,
) -> CaffeRules:
    """``lr_mult`` / ``decay_mult`` rules from a Caffe net ``.prototxt``.

    Each layer's ``param { lr_mult: ... decay_mult: ... }`` blocks (one per
    blob: weights first, then bias) become rules for the Keras layer of the
    same name: blob 0 is its ``kernel`` and blob 1 its ``bias`` (``gamma`` /
    ``beta`` for a ``Scale`` layer, ``alpha`` for ``PReLU``,
    ``embeddings`` for ``Embed``). The old ``layers { blobs_lr: ...
    weight_decay: ... }`` format is read too. Only values written in the file
    become rules; everything else keeps Caffe's and layerlr's default, 1.0.
    ``BatchNorm`` blobs are statistics that no optimizer trains, in Caffe
    (which requires ``lr_mult: 0`` there) as in Keras, so they give no rules.
    Params shared by name (``param { name: "conv1_w" }`` in two layers, as in
    Caffe's siamese nets) belong to the first layer that names them, which a
    Keras port calls twice; the other layer gets no rule for them. A solver
    prototxt with the net inline (``net_param { ... }``) is read too.

    Args:
        prototxt_text_or_path: The net prototxt text, or a path to the file.
        layer_name_map: Renames Caffe layers to Keras layer names: a dict
            ``{caffe_name: keras_name}`` (unlisted names stay as they are) or a
            function ``caffe_name -> keras_name``; ``None`` as a value skips
            the layer. Keras names cannot contain ``"/"``, which Caffe names
            often do (``"conv1/7x7_s2"``): e.g.
            ``lambda name: name.replace("/", "_")``.

    Returns:
        ``{"lr_mult": [(glob, value), ...], "decay_mult": [...]}`` in file
        order, for ``LayerwiseOptimizer(optimizer, **rules)``. Each glob
        (``"conv1/kernel"``) selects that variable of every layer with that
        name, and a layer the model lacks is an error when the optimizer is
        built, as for any rule.

    Note that Caffe's weight decay is an L2 term added to the gradient while
    Keras' ``weight_decay`` is decoupled: the multipliers carry over, the base
    value may need retuning except for plain SGD without momentum, where both
    coincide.

    Example:

    >>> import keras, layerlr
    >>> rules = layerlr.from_caffe('''
    ...     layer { name: "conv1" type: "Convolution"
    ...             param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 } }
    ...     layer { name: "fc8_new" type: "InnerProduct"
    ...             param { lr_mult: 10 decay_mult: 1 } param { lr_mult: 20 decay_mult: 0 } }
    ... ''')
    >>> rules["lr_mult"]
    [('conv1/kernel', 0.0), ('conv1/bias', 0.0), ('fc8_new/kernel', 10.0), ('fc8_new/bias', 20.0)]
    >>> opt = layerlr.LayerwiseOptimizer(keras.optimizers.SGD(1e-3, momentum=0.9), **rules)
    """
    text, source = _read_source(prototxt_text_or_path)
    layers = _read_net(_parse_text(text, source), source)
    names = _keras_names(layers, layer_name_map)
    lr_rules: dict[str, tuple[float, str]] = {}
    decay_rules: dict[str, tuple[float, str]] = {}
    # Shared params: the first layer that names a param owns it (a Keras port
    # reuses that layer); later layers naming it add no rule of their own.
    owners: dict[str, tuple[str, tuple]] = {}
    for layer in layers:
        if not layer.params:
            continue
        shared = layer.shared_names or [None] * len(layer.params)
        skip = set()
        for i, (param_name, mults) in enumerate(zip(shared, layer.params)):
            if not param_name:
                continue
            if param_name not in owners:
                owners[param_name] = (layer.name, mults)
                continue
            owner, owner_mults = owners[param_name]
            for kind, mine, theirs in zip(("lr_mult", "decay_mult"), mults, owner_mults):
                if (1.0 if mine is None else mine) != (1.0 if theirs is None else theirs):
                    raise ValueError(
                        f"Caffe layers {owner!r} and {layer.name!r} share the param "
                        f"{param_name!r} with different {kind} ({theirs} and {mine}); Caffe "
                        "refuses this too. Give both the same multipliers."
                    )
            skip.add(i)
        if len(skip) == len(layer.params):
            continue  # every blob belongs to the layer it is shared with
        keras_name = names[layer.name]
        if keras_name is None:
            continue
        if layer.type == "BatchNorm":
            if any(lr not in (None, 0.0) for lr, _ in layer.params):
                raise ValueError(
                    f"Caffe layer {layer.name!r} is a BatchNorm with a nonzero "
                    "lr_mult; Caffe rejects this too (its blobs are statistics, not "
                    "parameters). Set lr_mult: 0 or drop the param blocks."
                )
            continue
        blobs = _blob_names(layer)
        for i, (blob, (lr, decay)) in enumerate(zip(blobs, layer.params)):
            if i in skip:
                continue
            glob = f"{_glob_escape(keras_name)}/{blob}"
            for rules, value, kind in ((lr_rules, lr, "lr_mult"), (decay_rules, decay, "decay_mult")):
                if value is None:
                    continue
                previous = rules.setdefault(glob, (value, layer.name))
                if previous[0] != value:
                    raise ValueError(
                        f"The Caffe layers {previous[1]!r} and {layer.name!r} both map "
                        f"to the Keras variable {glob!r} with different {kind} "
                        f"({previous[0]} and {value}). Rename one with layer_name_map."
                    )
    return CaffeRules(
        lr_mult=[(glob, value) for glob, (value, _) in lr_rules.items()],
        decay_mult=[(glob, value) for glob, (value, _) in decay_rules.items()],
    )
