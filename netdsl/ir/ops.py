"""The layer registry: for each op kind its parameters, shape rule and cost rules.

Adding a layer type means adding one `OpSpec` to `OPS` (and, in later stages, a reference implementation
and an emitter found by the same name). Shapes are per image: `(C, H, W)` for feature maps and `(N,)` for
flat vectors; the batch is chosen at run time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from netdsl.codegen.windows import SAME_WORDS, Pads, compact, empty_window, four_pads, output_length

Shape = tuple[int, ...]
REQUIRED = object()


class ParamError(Exception):
    """A parameter value is invalid; the builder adds the location. `hint` says what to do about it."""

    def __init__(self, message: str, hint: str, param: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.param = param


class ShapeError(Exception):
    """A layer cannot be applied to its input shapes; the shape pass adds the location. `hint` says what to do."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Param:
    """One layer parameter. `kind` is int, float, bool, pair (n or (h, w)) or pad (a pair, four pads
    (top, left, bottom, right), `same`, `same_lower` or `valid`)."""

    name: str
    kind: str
    default: object = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    below_maximum: bool = False  # maximum is exclusive
    doc: str = ""


@dataclass(frozen=True)
class OpSpec:
    name: str
    doc: str
    params: tuple[Param, ...] = ()
    positional: tuple[str, ...] = ()  # parameters that may be given by position, after the inputs
    inputs: str = "one"  # "one": several inputs are concatenated on channels; "many": concat, add
    shape: Callable[[dict, list[Shape]], Shape] = field(default=lambda p, ins: ins[0])
    weights: Callable[[dict, Shape], dict[str, Shape]] = field(default=lambda p, x: {})
    buffers: Callable[[dict, Shape], dict[str, Shape]] = field(default=lambda p, x: {})
    macs: Callable[[dict, Shape, Shape], int] = field(default=lambda p, x, y: 0)
    normalize: Callable[[dict], dict] = field(default=lambda p: p)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def tensors(self, params: dict, x: Shape) -> dict[str, Shape]:
        """Every tensor a layer of this kind stores, by name: its learned weights, then its buffers."""
        return {**self.weights(params, x), **self.buffers(params, x)}


# --- helpers used by the shape rules --------------------------------------------------------------


def _fmt(shape: Shape) -> str:
    return " x ".join(str(d) for d in shape)


def _need_map(op: str, shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ShapeError(
            f"{op} needs a C x H x W feature map, but its input is a flat vector of {shape[0]}",
            hint="put spatial layers (conv, pooling, lrn) before fc and flatten",
        )
    return shape


def layer_pads(p: dict, size: tuple[int, int]) -> Pads:
    """The (top, left, bottom, right) padding of a conv or pooling layer (its normalized `p`) over an input of
    `size` (h, w): `same` and `same_lower` depend on it."""
    return four_pads(p["pad"], size, p["size"], p["stride"], p.get("dilation", (1, 1)))


def _spatial(op: str, x: Shape, kernel, stride, pads: Pads, dilation=(1, 1), ceil=False) -> tuple[int, int]:
    _c, h, w = _need_map(op, x)
    top, left, bottom, right = pads
    out = tuple(
        output_length(n, k, s, begin, end, d, ceil)
        for n, k, s, begin, end, d in zip((h, w), kernel, stride, (top, left), (bottom, right), dilation, strict=True)
    )
    if min(out) <= 0:
        eff = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=False))
        raise ShapeError(
            f"the {eff[0]}x{eff[1]} window (with padding {_pads_text(pads)}) does not fit the {_fmt(x)} input",
            hint="use a smaller kernel, more padding, or a larger input",
        )
    return out


def _pads_text(pads: Pads, pair_as: str = "{0}x{1}") -> str:
    """Padding for a message: as (h, w) in `pair_as`'s form where both ends of each axis are alike."""
    short = compact(pads)
    return pair_as.format(*short) if len(short) == 2 else f"{short} (top, left, bottom, right)"


def _pair(value) -> tuple[int, int]:
    return value if isinstance(value, tuple) else (value, value)


def _normalize_pad(p: dict) -> None:
    """`pad` as (h, w) when both ends of each axis are padded alike, else (top, left, bottom, right); `same`
    and `same_lower` stay words where they depend on the input's size (a stride above 1)."""
    pad = p["pad"]
    if pad in SAME_WORDS and p["stride"] == (1, 1):  # then the padding is the same for every input size
        pad = four_pads(pad, (1, 1), p["size"], p["stride"], p.get("dilation", (1, 1)))
    p["pad"] = pad if pad in SAME_WORDS else compact(four_pads(pad))


# --- the op kinds ---------------------------------------------------------------------------------


def _conv_normalize(p: dict) -> dict:
    p = dict(p)
    for key in ("size", "stride", "dilation"):
        p[key] = _pair(p[key])
    _normalize_pad(p)
    if p["filters"] % p["groups"]:
        raise ParamError(
            f"{p['filters']} filters cannot be split into {p['groups']} groups",
            "filters must be a multiple of groups",
            "groups",
        )
    return p


def _conv_shape(p: dict, ins: list[Shape]) -> Shape:
    c = _need_map("conv", ins[0])[0]
    if c % p["groups"]:
        raise ShapeError(
            f"{c} input channels cannot be split into {p['groups']} groups",
            hint="the input channels must be a multiple of groups",
        )
    pads = layer_pads(p, ins[0][1:])
    return (p["filters"], *_spatial("conv", ins[0], p["size"], p["stride"], pads, p["dilation"]))


def _conv_weights(p: dict, x: Shape) -> dict[str, Shape]:
    weights = {"weight": (p["filters"], x[0] // p["groups"], *p["size"])}
    if p["bias"]:
        weights["bias"] = (p["filters"],)
    return weights


def _conv_macs(p: dict, x: Shape, y: Shape) -> int:
    return math.prod(y) * (x[0] // p["groups"]) * p["size"][0] * p["size"][1]


def _fc_shape(p: dict, ins: list[Shape]) -> Shape:
    if math.prod(ins[0]) == 0:
        raise ShapeError(
            f"fc has nothing to read: its input {_fmt(ins[0])} is empty",
            hint="check the layers before it: one of them leaves 0 channels or 0 pixels",
        )
    return (p["units"],)


def _fc_weights(p: dict, x: Shape) -> dict[str, Shape]:
    weights = {"weight": (p["units"], math.prod(x))}
    if p["bias"]:
        weights["bias"] = (p["units"],)
    return weights


def _pool_normalize(p: dict) -> dict:
    p = dict(p)
    p["size"] = _pair(p["size"])
    p["stride"] = p["size"] if p["stride"] is None else _pair(p["stride"])
    p["dilation"] = _pair(p["dilation"])
    _normalize_pad(p)
    too_much = p["pad"] not in SAME_WORDS and _too_much_pool_padding(four_pads(p["pad"]), p["size"])
    if too_much:
        raise ParamError(too_much, _POOL_PAD_HINT, "pad")
    return p


_POOL_PAD_HINT = "pad at most size - 1 on each side"


def _too_much_pool_padding(pads: Pads, size: tuple[int, int]) -> str | None:
    """What is wrong with pooling padding that is not below the window on every side (ONNX's limit; PyTorch's
    is half the window), or None."""
    if all(pad < k for pad, k in zip(pads, (*size, *size), strict=True)):
        return None
    written = _pads_text(pads, "{0}" if len(set(pads)) == 1 else "({0}, {1})")
    return f"pooling padding {written} must be smaller than the {size[0]}x{size[1]} window"


def _pool_shape(op: str) -> Callable[[dict, list[Shape]], Shape]:
    def rule(p: dict, ins: list[Shape]) -> Shape:
        _need_map(op, ins[0])
        pads = layer_pads(p, ins[0][1:])
        too_much = _too_much_pool_padding(pads, p["size"])  # `same` padding, worked out for this input
        if too_much:
            raise ShapeError(too_much, hint=_POOL_PAD_HINT)
        out = _spatial(op, ins[0], p["size"], p["stride"], pads, p["dilation"], ceil=p["ceil"])
        for axis, n, k, s, begin, d, count in zip(
            ("row", "column"), ins[0][1:], p["size"], p["stride"], pads[:2], p["dilation"], out, strict=True
        ):
            first = empty_window(n, k, s, begin, d, count)  # of the windows the output has, not those past it
            if first is not None:
                raise ShapeError(
                    f"the window at output {axis} {first} reads only padding: its {k} taps {d} apart step over "
                    f"all {n} input {axis}s",
                    hint="use less padding or a smaller dilation",
                )
        return (ins[0][0], *out)

    return rule


def _lrn_shape(p: dict, ins: list[Shape]) -> Shape:
    c = _need_map("lrn", ins[0])[0]
    if c % p["groups"]:
        raise ShapeError(
            f"{c} channels cannot be split into {p['groups']} groups", hint="the channels must be a multiple of groups"
        )
    return ins[0]


def _shuffle_shape(p: dict, ins: list[Shape]) -> Shape:
    c = _need_map("shuffle", ins[0])[0]
    if c % p["groups"]:
        raise ShapeError(
            f"{c} channels cannot be shuffled in {p['groups']} groups",
            hint="the channels must be a multiple of groups",
        )
    return ins[0]


def shuffle_sources(channels: int, groups: int) -> list[int]:
    """The input channel that each output channel of `shuffle(groups)` reads, in output order."""
    per_group = channels // groups
    return [(i % groups) * per_group + i // groups for i in range(channels)]


def _global_pool_shape(p: dict, ins: list[Shape]) -> Shape:
    return (_need_map("global_avgpool", ins[0])[0], 1, 1)


def _same_spatial(op: str, ins: list[Shape]) -> None:
    if len({len(s) for s in ins}) > 1 or len({s[1:] for s in ins}) > 1:
        listed = ", ".join(_fmt(s) for s in ins)
        raise ShapeError(
            f"{op} needs inputs of the same spatial size, got {listed}",
            hint="pool or pad the inputs to one size before joining them",
        )


def concat_channels(ins: list[Shape]) -> Shape:
    """The shape of inputs joined on channels (what several inputs to one layer mean)."""
    if len(ins) == 1:
        return ins[0]
    _same_spatial("joining several inputs", ins)
    return (sum(s[0] for s in ins), *ins[0][1:])


def _concat_shape(p: dict, ins: list[Shape]) -> Shape:
    _same_spatial("concat", ins)
    return concat_channels(ins)


def _add_shape(p: dict, ins: list[Shape]) -> Shape:
    if len(set(ins)) > 1:
        raise ShapeError(
            f"add needs inputs of one shape, got {', '.join(_fmt(s) for s in ins)}",
            hint="a 1x1 conv can match the channel counts",
        )
    return ins[0]


def _channels(p: dict, x: Shape) -> dict[str, Shape]:
    return {"weight": (x[0],), "bias": (x[0],)}


def _stats(p: dict, x: Shape) -> dict[str, Shape]:
    return {"running_mean": (x[0],), "running_var": (x[0],)}


_PAIR_1 = dict(kind="pair", minimum=1)

OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in [
        OpSpec(
            "conv",
            "2-D convolution (cross-correlation, as in every framework)",
            params=(
                Param("filters", "int", minimum=1, doc="output channels"),
                Param("size", default=REQUIRED, doc="kernel size, n or (h, w)", **_PAIR_1),
                Param("stride", default=1, doc="step between windows", **_PAIR_1),
                Param("pad", "pad", 0, minimum=0, doc="zeros added around the input (see padding)"),
                Param("dilation", default=1, doc="spacing between kernel taps", **_PAIR_1),
                Param("groups", "int", 1, minimum=1, doc="channel groups (each filter sees channels/groups)"),
                Param("bias", "bool", True, doc="add a learned bias per filter"),
                Param(
                    "init_std", "float", None, minimum=0, doc="initial weights N(0, init_std) (default: the scheme's)"
                ),
                Param("init_bias", "float", None, doc="initial value of every bias (default: the scheme's)"),
            ),
            positional=("filters", "size"),
            shape=_conv_shape,
            weights=_conv_weights,
            macs=_conv_macs,
            normalize=_conv_normalize,
        ),
        OpSpec(
            "fc",
            "fully connected layer; flattens its input (channel-major) first",
            params=(
                Param("units", "int", minimum=1, doc="output features"),
                Param("bias", "bool", True, doc="add a learned bias per unit"),
                Param(
                    "init_std", "float", None, minimum=0, doc="initial weights N(0, init_std) (default: the scheme's)"
                ),
                Param("init_bias", "float", None, doc="initial value of every bias (default: the scheme's)"),
            ),
            positional=("units",),
            shape=_fc_shape,
            weights=_fc_weights,
            macs=lambda p, x, y: math.prod(x) * p["units"],
        ),
        OpSpec("relu", "max(x, 0)"),
        OpSpec(
            "leaky_relu",
            "x for x > 0, slope * x otherwise",
            params=(Param("slope", "float", 0.01, minimum=0, doc="slope for negative inputs"),),
            positional=("slope",),
        ),
        OpSpec(
            "lrn",
            "local response normalization across channels, as in the AlexNet paper: "
            "b_c = a_c / (k + alpha * sum of a_j^2 over the `size` channels around c) ^ beta "
            "(alpha is NOT divided by size; the window is clipped at the first and last channel)",
            params=(
                Param("size", "int", 5, minimum=1, doc="channels in the window (n)"),
                Param("alpha", "float", 1e-4, minimum=0, doc="scale of the sum of squares (not divided by size)"),
                Param("beta", "float", 0.75, minimum=0, doc="exponent"),
                Param("k", "float", 2.0, minimum=0, doc="additive constant"),
                Param("groups", "int", 1, minimum=1, doc="channel groups normalized apart (windows stop at edges)"),
            ),
            positional=("size",),
            shape=_lrn_shape,
        ),
        OpSpec(
            "maxpool",
            "max over sliding windows",
            params=(
                Param("size", default=REQUIRED, doc="window, n or (h, w)", **_PAIR_1),
                Param("stride", default=None, doc="step between windows (default: size)", **_PAIR_1),
                Param("pad", "pad", 0, minimum=0, doc="padding around the input, below `size` (never wins the max)"),
                Param("dilation", default=1, doc="spacing between window taps", **_PAIR_1),
                Param("ceil", "bool", False, doc="round the output size up (Caffe pooling) instead of down"),
            ),
            positional=("size",),
            shape=_pool_shape("maxpool"),
            normalize=_pool_normalize,
        ),
        OpSpec(
            "avgpool",
            "mean over sliding windows",
            params=(
                Param("size", default=REQUIRED, doc="window, n or (h, w)", **_PAIR_1),
                Param("stride", default=None, doc="step between windows (default: size)", **_PAIR_1),
                Param("pad", "pad", 0, minimum=0, doc="zero padding around the input, below `size`"),
                Param("dilation", default=1, doc="spacing between window taps", **_PAIR_1),
                Param("ceil", "bool", False, doc="round the output size up instead of down"),
                Param("count_pad", "bool", True, doc="count padded zeros in the divisor"),
            ),
            positional=("size",),
            shape=_pool_shape("avgpool"),
            normalize=_pool_normalize,
        ),
        OpSpec("global_avgpool", "mean over each whole channel: C x H x W -> C x 1 x 1", shape=_global_pool_shape),
        OpSpec(
            "dropout",
            "drops units while training; the identity at inference",
            params=(Param("rate", "float", 0.5, minimum=0, maximum=1, below_maximum=True, doc="drop probability"),),
            positional=("rate",),
        ),
        OpSpec("softmax", "exp(x) / sum(exp(x)) over channels (over the features of a flat vector)"),
        OpSpec("concat", "joins its inputs on channels", inputs="many", shape=_concat_shape),
        OpSpec("add", "element-wise sum of inputs of one shape", inputs="many", shape=_add_shape),
        OpSpec(
            "batchnorm",
            "per-channel (x - mean) / sqrt(var + eps) * weight + bias with running statistics",
            params=(
                Param("eps", "float", 1e-5, minimum=0, doc="added to the variance"),
                Param(
                    "momentum",
                    "float",
                    0.1,
                    minimum=0,
                    maximum=1,
                    doc="while training (which normalizes with the batch's statistics), the weight of each batch "
                    "in the running ones, PyTorch's convention: running = (1 - momentum) * running + momentum * batch",
                ),
            ),
            weights=_channels,
            buffers=_stats,
        ),
        OpSpec(
            "flatten", "C x H x W -> a flat vector of C*H*W (channel-major)", shape=lambda p, ins: (math.prod(ins[0]),)
        ),
        OpSpec(
            "shuffle",
            "ShuffleNet's channel shuffle: the C channels, seen as groups x C/groups, transposed to C/groups x groups "
            "(output channel i reads input channel (i % groups) * C/groups + i // groups)",
            params=(Param("groups", "int", minimum=1, doc="channel groups (C must be a multiple)"),),
            positional=("groups",),
            shape=_shuffle_shape,
        ),
    ]
}

# Layers whose outputs are "neurons" in the paper's sense (they carry weights).
NEURON_OPS = frozenset({"conv", "fc"})


def layer_tensors(item) -> dict[str, Shape]:
    """The tensors a layer (anything with `op`, `params` and `input_shape`) stores: none for an input
    or a layer not yet shaped."""
    if item.op == "input" or item.input_shape is None:
        return {}
    return OPS[item.op].tensors(item.params, item.input_shape)


def trained_tensors(item) -> dict[str, Shape]:
    """The tensors of a layer that training updates: its learned weights, not its buffers (running statistics)."""
    if item.op == "input" or item.input_shape is None:
        return {}
    return OPS[item.op].weights(item.params, item.input_shape)


def describe_params(item) -> str:
    """A layer's (anything with `op` and `params`) positional parameters and those that differ from
    their defaults, as the dumps, `netdsl info` and the picture show them: `filters=48 size=11x11`."""
    if item.op == "input":
        return ""
    spec = OPS[item.op]
    words = []
    for param in spec.params:
        value = item.params[param.name]
        if param.name == "stride" and item.op in ("maxpool", "avgpool") and value == item.params["size"]:
            continue
        default = (param.default, param.default) if isinstance(value, tuple) else param.default
        if value != default or param.name in spec.positional:
            words.append(f"{param.name}={_value(value, square=param.name == 'size')}")
    return " ".join(words)


def _value(value, square: bool = False) -> str:
    if isinstance(value, tuple) and len(value) != 2:  # padding (top, left, bottom, right)
        return "(" + ",".join(map(str, value)) + ")"
    if isinstance(value, tuple):
        return str(value[0]) if value[0] == value[1] and not square else "x".join(map(str, value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
