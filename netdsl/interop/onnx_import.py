"""Import an ONNX model as a readable `.net` file and a safetensors file of its weights.

`import_onnx(path, towers=False)` returns an `OnnxImport`: the text of the `.net` file, its weights
named exactly as `netdsl.runtime.weights.weight_specs` names them for that net, and notes for the user
(`text, weights = import_onnx(path)` also works). `import_to_files(path, net_path, weights_path)`
writes both files. docs/onnx.md lists the supported ops and how each attribute is mapped.

How a model becomes a net:

1. the file is read and checked: a protobuf `ModelProto`, a supported opset, only supported ops
   (one error lists every unsupported node), `onnx.checker`, inputs N x C x H x W (or N x F) float32
   with fixed C, H, W;
2. constants are folded (initializers, Constant, ConstantOfShape, and a few ops on constants, with
   numpy: nothing from the file is executed); the batch size may flow through Shape -> Gather ->
   Unsqueeze -> Concat into a Reshape as a symbol;
3. each node becomes a netdsl layer (or an alias: Identity, Dropout, a Flatten before fc), shapes are
   worked out with netdsl's own rules (netdsl/ir/ops.py), padding is matched window for window;
4. clean-up: a constant Add after a conv/fc becomes its bias, MatMul + Add an fc, Flatten before fc
   disappears (fc flattens itself), identical weightless layers are merged, unused layers dropped;
5. with `towers=True`, parallel copies of layers (what `netdsl export` writes for `towers`) or the
   groups of grouped convolutions become `towers` blocks, one tower per copy or group;
6. the layers are written as chains (`a = conv(...) | relu | maxpool(2)`) under readable names, and
   the text is built again with netdsl to check it and to name the weights.

Names: a layer keeps its ONNX name (its first output's name) when that is a valid netdsl name; other
names are rewritten (`/features/features.0/Conv_output_0` -> `features_0`, `input.1` -> `input_1`),
kept unique. A layer whose name is what netdsl would call it anyway (`conv1.relu` after `conv1`), or
whose name was not a valid name (and that is not a conv or fc), continues the chain of the layer it
reads.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from netdsl.errors import NetError
from netdsl.files import write_atomic
from netdsl.interop.onnx_patterns import fold_torch_lrn
from netdsl.ir.ops import OPS, REQUIRED, ParamError, ShapeError, window_out

MIN_OPSET = 7
RESERVED = frozenset(
    {"net", "input", "output", "const", "include", "device", "towers", "block", "repeat", "return", "all"}
)
BUILTINS = frozenset({"true", "false", "same", "valid"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_]+")
_TORCH_NAME = re.compile(r"/(?:(.+)/)?([A-Za-z]+)(?:_\d+)?_output_\d+\Z")
_LONGEST_NAME = 120
_SHOWN = 12  # unsupported nodes listed before "and N more"
_MAX_FOLDED = 1 << 26  # elements of a folded constant
_BATCH = np.int64(-(2**62) + 12345)  # the batch size while folding Shape -> ... -> Reshape

# ONNX ops that become layers (or aliases), and ops supported on constants only (folded).
LAYER_OPS = (
    "Conv",
    "Relu",
    "Clip",
    "LeakyRelu",
    "LRN",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "ReduceMean",
    "Gemm",
    "MatMul",
    "Add",
    "Sum",
    "Concat",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Softmax",
    "BatchNormalization",
    "Dropout",
    "Identity",
    "Split",
    "Pad",
)
CONST_OPS = (
    "Constant",
    "ConstantOfShape",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Cast",
    "Transpose",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Sqrt",
)
SUPPORTED_OPS = frozenset(LAYER_OPS + CONST_OPS)
_FOLDABLE = frozenset(CONST_OPS) | {"Reshape", "Concat", "Add", "Sum", "Identity", "Dropout", "Flatten", "Squeeze"}
_SYMBOLIC_OK = frozenset({"Gather", "Unsqueeze", "Squeeze", "Concat", "Identity", "Cast"})
# The method of `_Importer` that converts each op: Conv -> op_conv, BatchNormalization -> op_batch_normalization.
_HANDLERS = {
    op: "op_" + {"LRN": "lrn", "MatMul": "matmul"}.get(op, re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower())
    for op in (*LAYER_OPS, "Shape")
    if op != "Split"  # split_group: a pattern of several nodes
}
_PER_CHANNEL = frozenset({"relu", "leaky_relu", "maxpool", "avgpool", "global_avgpool", "batchnorm", "lrn"})


def max_opset() -> int:
    """The newest opset this importer reads: the newest the installed `onnx` package knows."""
    import onnx.defs

    return int(onnx.defs.onnx_opset_version())


# --- the result ------------------------------------------------------------------------------------


@dataclass
class OnnxImport:
    """A model read from ONNX: the `.net` text, its weights (float32, in `weight_specs` order) and
    notes for the user (e.g. why --towers could not split the net)."""

    text: str
    weights: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator:  # text, weights = import_onnx(path)
        return iter((self.text, self.weights))


def import_onnx(path: str | os.PathLike, towers: bool = False, *, weights_name: str | None = None) -> OnnxImport:
    """Reads the ONNX model at `path`; returns the `.net` text and its weights. `weights_name` is only
    mentioned in the text's header comment. Raises `NetError` (where: the path) for every problem."""
    path = Path(path)
    try:
        model = _read_model(path)
        importer = _Importer(model, str(path))
        importer.convert()
        importer.clean_up()
        plan = importer.tower_plan() if towers else None
        return importer.write(path, plan, weights_name)
    except UnicodeDecodeError:  # protobuf decodes string fields when they are read
        raise NetError(
            "not a readable ONNX model: a name or string in it is not UTF-8 text",
            where=str(path),
            hint="the file may be damaged; export it again",
        ) from None
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as error:  # a model this importer missed
        raise NetError(
            f"internal error while importing: {type(error).__name__}: {_shown(str(error), 200)}",
            where=str(path),
            hint="please report this model (netdsl --debug import ... shows where it happened)",
        ) from error


def import_to_files(
    path: str | os.PathLike,
    net_path: str | os.PathLike,
    weights_path: str | os.PathLike | None = None,
    towers: bool = False,
) -> OnnxImport:
    """Imports `path` and writes the `.net` file and the safetensors file (default: the `.net` path
    with the suffix `.safetensors`). The weights are written first, each file atomically."""
    from netdsl.runtime.weights import save_weights

    net_path = Path(net_path)
    weights_path = Path(weights_path) if weights_path is not None else net_path.with_suffix(".safetensors")
    if net_path.resolve() == weights_path.resolve():
        raise NetError("the .net file and the weights file must differ", where=str(net_path))
    for target in (net_path, weights_path):
        if target.is_dir():
            raise NetError(f"cannot write {target}: it is a folder", where=str(target))
        if not target.parent.is_dir():
            raise NetError(f"cannot write {target}: no folder {target.parent}", where=str(target))
    shown = weights_path.name if weights_path.parent.resolve() == net_path.parent.resolve() else str(weights_path)
    result = import_onnx(path, towers, weights_name=shown)
    save_weights(weights_path, result.weights)
    write_atomic(net_path, result.text)
    return result


# --- reading and checking the file -----------------------------------------------------------------


def _read_model(path: Path):
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise NetError("importing ONNX models needs onnx", where="import", hint="pip install 'netdsl[onnx]'") from None

    where = str(path)
    if not path.exists():
        raise NetError("ONNX file not found", where=where, hint="check the path; `netdsl export` writes ONNX files")
    if path.is_dir():
        raise NetError("the ONNX path is a folder, not a file", where=where)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise NetError(f"cannot read the ONNX file: {error.strerror or error}", where=where) from None
    hint = "the file may be truncated or damaged, or not an ONNX model; export it again"
    if not data:
        raise NetError("not an ONNX model: the file is empty", where=where, hint=hint)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as error:
        reason = str(error).split(":")[-1].strip() or type(error).__name__
        raise NetError(f"not an ONNX model: the protobuf cannot be parsed ({reason})", where=where, hint=hint) from None
    if model.ir_version <= 0 or not model.HasField("graph") or not (model.graph.node or model.graph.output):
        raise NetError("not an ONNX model: it holds no graph (no IR version, nodes or outputs)", where=where, hint=hint)
    if not model.graph.output:
        raise NetError("the model declares no outputs: nothing would be computed", where=where, hint=hint)
    _check_opset(model, where)
    fold_torch_lrn(model, where)  # PyTorch's traced LocalResponseNorm -> one LRN node
    _check_ops(model, where)
    _load_external_data(model, path)
    _check_model(model, where)
    return model


def _opset(model) -> int | None:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return int(versions[0]) if versions else None


def _check_opset(model, where: str) -> None:
    newest = max_opset()
    supported = f"netdsl imports ONNX opsets {MIN_OPSET} to {newest}"
    opset = _opset(model)
    if opset is None:
        raise NetError("the model declares no ONNX opset (opset_import)", where=where, hint=supported)
    if opset < MIN_OPSET:
        raise NetError(
            f"ONNX opset {opset} is too old: {supported}",
            where=where,
            hint="convert it first: onnx.version_converter.convert_version(model, 17)",
        )
    if opset > newest:
        import onnx

        raise NetError(
            f"ONNX opset {opset} is newer than the installed onnx {onnx.__version__} knows: {supported}",
            where=where,
            hint="upgrade onnx (pip install -U onnx), or export the model with an older opset",
        )


def _node_text(node, index: int) -> str:
    name = _shown(node.name)
    return f"node '{name}', #{index}" if name else f"node #{index}"


def _where(node, index: int) -> str:
    return f"{node.op_type} {_node_text(node, index)}"


def _shown(text: str, limit: int = 60) -> str:
    """A name from the file, safe to print: no control characters, not too long."""
    clean = "".join(c if c.isprintable() else "?" for c in str(text))
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _check_ops(model, where: str) -> None:
    bad = []
    for index, node in enumerate(model.graph.node):
        standard = node.domain in ("", "ai.onnx")
        if not standard or node.op_type not in SUPPORTED_OPS:
            op = node.op_type if standard else f"{node.domain}.{node.op_type}"
            bad.append(f"{_shown(op, 40)} ({_node_text(node, index)})")
    if bad:
        listed = ", ".join(bad[:_SHOWN]) + (f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
        raise NetError(
            f"unsupported ONNX ops: {listed}",
            where=where,
            hint=f"netdsl imports {', '.join(sorted(LAYER_OPS))} (and {', '.join(sorted(CONST_OPS))} on constants)",
        )


def _check_model(model, where: str) -> None:
    """`onnx.checker` on the model without its large weights (they become typed inputs), so a large
    model checks quickly; the shapes of the weights are checked when they are used."""
    import onnx
    from onnx import helper

    graph = model.graph
    if len(graph.sparse_initializer):
        raise NetError("sparse initializers are not supported", where=where, hint="store the weights densely")
    declared = {vi.name for vi in graph.input}
    kept, moved = [], []
    for tensor in graph.initializer:
        (kept if math.prod(tensor.dims) <= 1024 or tensor.name in declared else moved).append(tensor)
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.graph.CopyFrom(
        helper.make_graph(
            list(graph.node),
            graph.name or "graph",
            [*graph.input, *(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved)],
            list(graph.output),
            kept,
            value_info=list(graph.value_info),
        )
    )
    try:
        onnx.checker.check_model(light)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        reason = _shown(lines[0] if lines else type(error).__name__, 300)
        raise NetError(
            f"the model fails onnx.checker: {reason}", where=where, hint="the file is not a valid ONNX model"
        ) from None


def _load_external_data(model, path: Path) -> None:
    """Reads the weights stored outside the model file (next to it), refusing paths that leave its folder."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor

    tensors = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t") and attr.t.data_location == TensorProto.EXTERNAL:
                tensors.append(attr.t)
    from onnx.checker import ValidationError

    base = path.resolve().parent
    for tensor in tensors:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        shown = _shown(location)
        try:
            missing = not (base / location).exists()
        except (OSError, ValueError):
            missing = False
        if missing:
            raise NetError(
                f"the external data file '{shown}' of tensor '{_shown(tensor.name)}' is missing",
                where=str(path),
                hint=f"copy it next to the model, into {base}",
            )
        try:
            load_external_data_for_tensor(tensor, str(base))
        except (OSError, ValueError, RuntimeError, ValidationError) as error:
            reason = _shown(str(error).splitlines()[0] if str(error) else type(error).__name__, 200)
            raise NetError(
                f"cannot read the external data '{shown}' of tensor '{_shown(tensor.name)}': {reason}",
                where=str(path),
            ) from None


# --- the layers ------------------------------------------------------------------------------------


@dataclass
class _Layer:
    key: int
    name: str  # the ONNX name: the first output tensor's (or the input's) name
    op: str  # a netdsl op, "input", "_bias" (a constant Add) or "_affine" (x * scale + shift per channel)
    params: dict
    inputs: list[int]
    shape: tuple[int, ...]
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    where: str = ""
    order: float = 0.0  # position in the file (for a stable, readable order)
    constant: np.ndarray | None = None  # `_bias`: the constant added
    scale: np.ndarray | None = None  # `_affine`: per channel, float64
    shift: np.ndarray | None = None


def _f32(value) -> float:
    """A float32 attribute as the shortest decimal that reads back as the same float32."""
    return float(str(np.float32(value)))


def _pair(values, where: str, what: str) -> tuple[int, int]:
    values = [int(v) for v in values]
    if len(values) != 2:
        raise NetError(f"{where}: {what} has {len(values)} values; netdsl layers are 2-D (h, w)")
    return values[0], values[1]


def _check_ranges(op: str, params: dict, where: str) -> None:
    for param in OPS[op].params:
        value = params.get(param.name)
        if value is None or isinstance(value, (bool, str)):
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise NetError(f"{where}: {op} `{param.name}` must be a finite number, got {v}")
            if param.minimum is not None and v < param.minimum:
                raise NetError(f"{where}: {op} `{param.name}` must be at least {param.minimum:g}, got {v:g}")
            if param.maximum is not None and (v >= param.maximum if param.below_maximum else v > param.maximum):
                raise NetError(f"{where}: {op} `{param.name}` must be below {param.maximum:g}, got {v:g}")


def _netdsl_shape(op: str, params: dict, in_shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    spec = OPS[op]
    _check_ranges(op, params, where)
    full = {p.name: params.get(p.name, p.default) for p in spec.params}
    missing = [name for name, value in full.items() if value is REQUIRED]
    assert not missing, (op, missing)
    try:
        normalized = spec.normalize(full)
        return tuple(int(d) for d in spec.shape(normalized, in_shapes))
    except (ParamError, ShapeError) as error:
        raise NetError(f"{where}: {error}", hint=error.hint) from None


def _fmt(shape) -> str:
    return " x ".join(str(d) for d in shape) if len(shape) else "a scalar"


def _attributes(node, where: str) -> dict:
    from onnx import AttributeProto, helper

    attrs = {}
    for attr in node.attribute:
        if attr.ref_attr_name:
            raise NetError(f"{where}: attribute `{attr.name}` refers to a function attribute")
        if attr.type == AttributeProto.GRAPH or attr.type == AttributeProto.GRAPHS:
            raise NetError(f"{where}: attribute `{attr.name}` holds a subgraph, which netdsl does not import")
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        attrs[attr.name] = value
    return attrs


def _to_array(tensor, where: str) -> np.ndarray:
    from onnx import numpy_helper

    try:
        array = numpy_helper.to_array(tensor)
    except (ValueError, TypeError, RuntimeError, KeyError) as error:
        raise NetError(f"{where}: tensor '{_shown(tensor.name)}' cannot be read ({_shown(str(error), 200)})") from None
    if array.dtype == object or array.dtype.kind in "USO":
        raise NetError(f"{where}: tensor '{_shown(tensor.name)}' holds strings, not numbers")
    return array


class _Importer:
    """One model's conversion: ONNX nodes in, netdsl layers out."""

    def __init__(self, model, where: str) -> None:
        self.model = model
        self.where = where
        self.opset = _opset(model)
        self.layers: dict[int, _Layer] = {}
        self.acts: dict[str, int] = {}  # tensor -> the layer that computes it
        self.consts: dict[str, np.ndarray] = {}  # tensor -> folded value
        self.symbolic: set[str] = set()  # constants holding the batch size
        self.unusable: dict[str, str] = {}  # tensor -> why it cannot be read
        self.outputs: list[tuple[str, int]] = []  # (ONNX output name, layer)
        self.notes: list[str] = []
        self.batch: int | None = None  # the batch size when every input fixes it
        self.skip: set[int] = set()  # nodes folded into a pattern (Split -> op per part -> Concat)
        # A zero Pad's output -> (the layer it pads, (top, left, bottom, right)): only a conv or pool reads it,
        # which takes the padding as its own.
        self.padded: dict[str, tuple[int, tuple[int, int, int, int]]] = {}
        self._next = 0

    def fail(self, message: str, hint: str | None = None) -> NetError:
        return NetError(message, where=self.where, hint=hint)

    # --- inputs, values -----------------------------------------------------------------------

    def add_layer(self, name: str, op: str, params: dict, inputs: list[int], where: str, weights=None) -> int:
        if op == "input":
            shape = params.pop("shape")
        elif op in ("_bias", "_affine"):
            shape = self.layers[inputs[0]].shape
        else:
            try:
                shape = _netdsl_shape(op, params, [self.layers[k].shape for k in inputs], where)
            except NetError as error:
                raise self.fail(error.message, error.hint) from None
        key = self._next
        self._next += 1
        self.layers[key] = _Layer(key, name, op, params, list(inputs), shape, dict(weights or {}), where, float(key))
        return key

    def read_inputs(self) -> None:
        from onnx import TensorProto

        graph = self.model.graph
        for tensor in graph.initializer:
            self.consts[tensor.name] = _to_array(tensor, f"initializer '{_shown(tensor.name)}'")
        batches = set()
        for vi in graph.input:
            if vi.name in self.consts:
                continue
            shown = _shown(vi.name)
            hint = "netdsl nets read float32 images N x C x H x W (or vectors N x F) with fixed C, H and W"
            if not vi.type.HasField("tensor_type"):
                raise self.fail(f"input '{shown}' is not a tensor", hint)
            tensor_type = vi.type.tensor_type
            if tensor_type.elem_type != TensorProto.FLOAT:
                known = tensor_type.elem_type in TensorProto.DataType.values()
                kind = TensorProto.DataType.Name(tensor_type.elem_type).lower() if known else "unknown (damaged?)"
                raise self.fail(f"input '{shown}' holds {kind} values, not float32", hint)
            if not tensor_type.HasField("shape"):
                raise self.fail(f"input '{shown}' has no shape", hint)
            dims = list(tensor_type.shape.dim)
            if len(dims) not in (2, 4):
                raise self.fail(f"input '{shown}' has {len(dims)} dimensions", hint)
            shape = []
            for axis, dim in zip("CHW" if len(dims) == 4 else "F", dims[1:]):
                if not dim.HasField("dim_value") or dim.dim_value <= 0:
                    symbol = f" `{_shown(dim.dim_param)}`" if dim.HasField("dim_param") else ""
                    raise self.fail(
                        f"input '{shown}' has no fixed size{symbol} in dimension {axis}", hint + " (the batch may vary)"
                    )
                shape.append(int(dim.dim_value))
            batches.add(int(dims[0].dim_value) if dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None)
            key = self.add_layer(vi.name, "input", {"shape": tuple(shape)}, [], f"input '{shown}'")
            self.acts[vi.name] = key
        if not any(layer.op == "input" for layer in self.layers.values()):
            raise self.fail("the model has no inputs (every graph input is an initializer)")
        if len(batches) == 1 and None not in batches:
            self.batch = batches.pop()

    def act(self, name: str, where: str, what: str = "its input") -> int:
        if name in self.acts:
            return self.acts[name]
        if name in self.unusable:
            raise self.fail(self.unusable[name])
        if name in self.consts:
            raise self.fail(
                f"{where}: {what} '{_shown(name)}' is a constant; netdsl layers read the input or other layers"
            )
        raise self.fail(f"{where}: {what} '{_shown(name)}' is not defined")

    def const(self, name: str, where: str, what: str) -> np.ndarray:
        if name in self.consts:
            if name in self.symbolic:
                raise self.fail(f"{where}: {what} depends on the batch size, which netdsl nets do not fix")
            return self.consts[name]
        if name in self.acts:
            raise self.fail(
                f"{where}: {what} '{_shown(name)}' is computed from the input; netdsl needs a constant here",
                hint="weights must be initializers or Constant nodes",
            )
        if name in self.unusable:
            raise self.fail(self.unusable[name])
        raise self.fail(f"{where}: {what} '{_shown(name)}' is not defined")

    def weight(self, name: str, where: str, what: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        array = self.const(name, where, what)
        if array.dtype.kind not in "fiu":
            raise self.fail(f"{where}: {what} holds {array.dtype} values, not numbers")
        array = np.asarray(array, dtype=np.float32)
        if shape is not None and tuple(array.shape) != tuple(shape):
            raise self.fail(f"{where}: {what} has shape {_fmt(array.shape)}, but it must be {_fmt(shape)} here")
        if not np.all(np.isfinite(array)):
            raise self.fail(f"{where}: {what} holds NaN or infinite values")
        return array

    def channels(self, key: int, where: str, op: str) -> tuple[int, int, int]:
        shape = self.layers[key].shape
        if len(shape) != 3:
            raise self.fail(f"{where}: {op} needs an N x C x H x W input, but its input is N x {shape[0]}")
        return shape

    # --- the nodes ----------------------------------------------------------------------------

    def convert(self) -> None:
        self.read_inputs()
        graph = self.model.graph
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(graph.node):
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
        self.graph_outputs = {o.name for o in graph.output}
        for index, node in enumerate(graph.node):
            if index in self.skip:
                continue
            where = _where(node, index)
            attrs = _attributes(node, where)
            inputs = list(node.input)
            given = [name for name in inputs if name]
            if node.op_type == "Split":
                result = self.split_group(index, node, where, attrs)
            elif node.op_type in _FOLDABLE and all(name in self.consts for name in given):
                result = self.fold(node, where, attrs, inputs)
            else:
                if node.op_type in ("Mul", "Sub", "Div") and len(given) == 2:
                    result = self.arithmetic(node, where, inputs)
                elif node.op_type in CONST_OPS and node.op_type != "Shape":
                    raise self.fail(
                        f"{where}: {node.op_type} on the activations is not supported (only on constants, "
                        "which are folded)"
                    )
                else:
                    result = getattr(self, _HANDLERS[node.op_type])(node, where, attrs, inputs)
            self.bind(node, where, result)
        for output in graph.output:
            name = output.name
            if name in self.consts:
                raise self.fail(f"output '{_shown(name)}' is a constant, not computed from the input")
            key = self.act(name, f"output '{_shown(name)}'", "the output")
            if self.layers[key].op == "input":
                raise self.fail(f"output '{_shown(name)}' is an input of the model; netdsl outputs are layers")
            self.outputs.append((name, key))
            self.check_declared_shape(output, key)

    def check_declared_shape(self, value_info, key: int) -> None:
        """An output whose ONNX type gives fixed sizes must have the shape netdsl computes."""
        if not value_info.type.HasField("tensor_type") or not value_info.type.tensor_type.HasField("shape"):
            return
        dims = list(value_info.type.tensor_type.shape.dim)
        ours = self.layers[key].shape
        if not dims:
            return
        fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if len(fixed) != len(ours) or any(f is not None and f != o for f, o in zip(fixed, ours)):
            declared = " x ".join("?" if f is None else str(f) for f in fixed)
            raise self.fail(
                f"output '{_shown(value_info.name)}' is declared N x {declared}, but netdsl computes N x {_fmt(ours)}",
                hint="the model's declared output shape does not match its nodes",
            )

    def bind(self, node, where: str, result) -> None:
        outputs = list(node.output)
        if isinstance(result, tuple):  # (value, symbolic)
            result, symbolic = result
            if symbolic:
                self.symbolic.add(outputs[0])
        if isinstance(result, np.ndarray):
            self.consts[outputs[0]] = result
        elif result is not None:
            self.acts[outputs[0]] = result
        for i, name in enumerate(outputs[1:], start=1):
            if name:
                self.unusable[name] = (
                    f"{where}: its output #{i} ('{_shown(name)}') is used, but netdsl computes only the first output"
                )
                if name in self.graph_outputs:
                    raise self.fail(self.unusable[name])

    # --- constants ----------------------------------------------------------------------------

    def fold(self, node, where: str, attrs: dict, inputs: list[str]):
        op = node.op_type
        values = [self.consts[name] if name else None for name in inputs]
        symbolic = any(name in self.symbolic for name in inputs if name)
        if symbolic and op not in _SYMBOLIC_OK:
            raise self.fail(f"{where}: computes with the batch size, which netdsl nets do not fix")
        try:
            result = self.fold_op(op, where, attrs, values)
        except NetError:
            raise
        except (ValueError, TypeError, IndexError, KeyError, ArithmeticError, MemoryError) as error:
            raise self.fail(f"{where}: cannot fold this constant ({_shown(str(error), 200)})") from None
        result = np.asarray(result)
        if symbolic and result.dtype.kind != "i":
            raise self.fail(f"{where}: computes with the batch size, which netdsl nets do not fix")
        if result.size > _MAX_FOLDED:
            raise self.fail(f"{where}: the folded constant would have {result.size} values, too many")
        return result, bool(symbolic and result.dtype.kind == "i" and np.any(result == _BATCH))

    def fold_op(self, op: str, where: str, attrs: dict, v: list):
        from onnx import helper, numpy_helper

        if op == "Constant":
            return self.constant(where, attrs)
        if op == "ConstantOfShape":
            shape = [int(d) for d in np.asarray(v[0]).reshape(-1)]
            if any(d < 0 for d in shape) or math.prod(shape) > _MAX_FOLDED:
                raise self.fail(f"{where}: cannot make a constant of shape {shape}")
            fill = numpy_helper.to_array(attrs["value"]).reshape(-1) if "value" in attrs else np.zeros(1, np.float32)
            return np.full(shape, fill[0], dtype=fill.dtype)
        if op in ("Identity", "Dropout"):
            return v[0]
        if op == "Shape":
            shape = np.array(v[0].shape, dtype=np.int64)
            return shape[attrs.get("start", 0) : attrs.get("end", len(shape))]
        if op == "Gather":
            return np.take(v[0], v[1].astype(np.int64), axis=int(attrs.get("axis", 0)))
        if op == "Unsqueeze":
            axes = attrs.get("axes") if len(v) < 2 or v[1] is None else v[1].reshape(-1).tolist()
            out = v[0]
            rank = out.ndim + len(axes)
            for axis in sorted(a % rank for a in axes):
                out = np.expand_dims(out, axis)
            return out
        if op == "Squeeze":
            axes = attrs.get("axes") if len(v) < 2 or v[1] is None else v[1].reshape(-1).tolist()
            return np.squeeze(v[0], axis=None if axes is None else tuple(int(a) for a in axes))
        if op == "Cast":
            return v[0].astype(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))
        if op == "Transpose":
            return np.transpose(v[0], attrs.get("perm"))
        if op == "Reshape":
            target = [int(d) for d in v[1].reshape(-1)]
            if not attrs.get("allowzero", 0):
                target = [v[0].shape[i] if d == 0 else d for i, d in enumerate(target)]
            return v[0].reshape(target)
        if op == "Flatten":
            axis = int(attrs.get("axis", 1)) % max(v[0].ndim, 1)
            return v[0].reshape(math.prod(v[0].shape[:axis]), -1)
        if op == "Concat":
            return np.concatenate([x for x in v if x is not None], axis=int(attrs["axis"]))
        if op in ("Add", "Sum"):
            out = v[0]
            for x in v[1:]:
                out = out + x
            return out
        if op == "Sub":
            return v[0] - v[1]
        if op == "Mul":
            return v[0] * v[1]
        if op == "Div":
            if v[0].dtype.kind in "iu" and v[1].dtype.kind in "iu":
                return np.trunc(v[0] / v[1]).astype(np.result_type(v[0], v[1]))
            return v[0] / v[1]
        if op == "Neg":
            return -v[0]
        if op == "Sqrt":
            return np.sqrt(v[0])
        raise self.fail(f"{where}: {op} cannot be folded")  # pragma: no cover - every _FOLDABLE op is above

    def constant(self, where: str, attrs: dict) -> np.ndarray:
        if "value" in attrs:
            return _to_array(attrs["value"], where)
        if "value_float" in attrs:
            return np.array(attrs["value_float"], dtype=np.float32)
        if "value_floats" in attrs:
            return np.array(attrs["value_floats"], dtype=np.float32)
        if "value_int" in attrs:
            return np.array(attrs["value_int"], dtype=np.int64)
        if "value_ints" in attrs:
            return np.array(attrs["value_ints"], dtype=np.int64)
        if "sparse_value" in attrs:
            raise self.fail(f"{where}: sparse constants are not supported")
        raise self.fail(f"{where}: a constant of strings is not supported (netdsl weights are numbers)")

    # --- layer ops ----------------------------------------------------------------------------

    def op_shape(self, node, where, attrs, inputs):
        """The shape of an activation: its batch size is a symbol, the rest is known."""
        shape = np.array([_BATCH, *self.layers[self.act(inputs[0], where)].shape], dtype=np.int64)
        part = shape[attrs.get("start", 0) : attrs.get("end", len(shape))]
        return part, bool(np.any(part == _BATCH))

    def op_identity(self, node, where, attrs, inputs):
        return self.act(inputs[0], where)

    def op_dropout(self, node, where, attrs, inputs):
        if len(inputs) > 2 and inputs[2]:
            training = self.const(inputs[2], where, "training_mode")
            if np.any(training):
                raise self.fail(f"{where}: dropout in training mode is random; netdsl imports inference models")
        return self.act(inputs[0], where)

    def op_relu(self, node, where, attrs, inputs):
        return self.add_layer(node.output[0], "relu", {}, [self.act(inputs[0], where)], where)

    def op_clip(self, node, where, attrs, inputs):
        """Clip to [0, +inf) is a ReLU; any other bound (ReLU6's 6, say) has no netdsl layer."""
        if self.opset < 11:
            low, high = float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))
        else:
            given = [*inputs[1:3], "", ""]
            low, high = (
                float(self.const(name, where, f"the {what}").reshape(-1)[0]) if name else default
                for name, what, default in zip(given, ("min", "max"), (-np.inf, np.inf))
            )
        if low != 0 or high != np.inf:
            raise self.fail(
                f"{where}: Clip to [{low:g}, {high:g}] is not supported (only [0, inf), a ReLU)",
                hint="netdsl has relu and leaky_relu, no bounded activation such as ReLU6",
            )
        return self.add_layer(node.output[0], "relu", {}, [self.act(inputs[0], where)], where)

    def op_leaky_relu(self, node, where, attrs, inputs):
        slope = _f32(attrs.get("alpha", 0.01))
        return self.add_layer(node.output[0], "leaky_relu", {"slope": slope}, [self.act(inputs[0], where)], where)

    def lrn_params(self, where: str, attrs: dict) -> dict:
        size = int(attrs["size"])
        if size < 1:
            raise self.fail(f"{where}: LRN size must be at least 1, got {size}")
        # ONNX divides alpha by size; netdsl's lrn uses the paper's alpha (not divided): the shortest
        # decimal that gives back the file's float32 alpha when multiplied by size again.
        onnx_alpha = np.float32(attrs.get("alpha", 1e-4))
        alpha = float(onnx_alpha) / size
        for digits in range(1, 18):
            candidate = float(f"{alpha:.{digits}g}")
            if np.float32(candidate * size) == onnx_alpha:
                alpha = candidate
                break
        return {"size": size, "alpha": alpha, "beta": _f32(attrs.get("beta", 0.75)), "k": _f32(attrs.get("bias", 1.0))}

    def op_lrn(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        self.channels(x, where, "LRN")
        return self.add_layer(node.output[0], "lrn", {**self.lrn_params(where, attrs), "groups": 1}, [x], where)

    def op_global_average_pool(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        self.channels(x, where, "GlobalAveragePool")
        return self.add_layer(node.output[0], "global_avgpool", {}, [x], where)

    def op_global_max_pool(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        _c, h, w = self.channels(x, where, "GlobalMaxPool")
        params = {"size": (h, w), "stride": (h, w), "pad": (0, 0), "ceil": False}
        return self.add_layer(node.output[0], "maxpool", params, [x], where)

    def axes(self, inputs, attrs, where) -> list[int] | None:
        """The axes of a Reduce or Squeeze node: its second input (opset 13 and 18 on) or its attribute."""
        if len(inputs) > 1 and inputs[1]:
            return [int(a) for a in self.const(inputs[1], where, "the axes").reshape(-1)]
        return attrs.get("axes")

    def op_reduce_mean(self, node, where, attrs, inputs):
        """The mean over H and W (keepdims=1: N x C x 1 x 1, keepdims=0: N x C) is global_avgpool."""
        x = self.act(inputs[0], where)
        shape = self.layers[x].shape
        axes = self.axes(inputs, attrs, where)
        if len(shape) != 3 or axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
            raise self.fail(f"{where}: ReduceMean over axes {axes} is not supported (only over H and W: axes 2, 3)")
        key = self.add_layer(node.output[0], "global_avgpool", {}, [x], where)
        if attrs.get("keepdims", 1):
            return key
        self.layers[key].name = node.output[0] + "/pool"
        return self.add_layer(node.output[0], "flatten", {}, [key], where)

    def op_softmax(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        shape = self.layers[x].shape
        rank = len(shape) + 1
        axis = int(attrs.get("axis", 1 if self.opset < 13 else -1))
        axis = axis + rank if axis < 0 else axis
        ok = axis == 1 and (rank == 2 or self.opset >= 13 or shape[1:] == (1, 1))
        if not ok:
            what = "over the channels (axis 1) of N x C x H x W" if rank == 4 else "over axis 1 of N x F"
            raise self.fail(
                f"{where}: Softmax over axis {axis} of an N x {_fmt(shape)} input; netdsl's softmax is {what}"
            )
        return self.add_layer(node.output[0], "softmax", {}, [x], where)

    def op_flatten(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        shape = self.layers[x].shape
        rank = len(shape) + 1
        axis = int(attrs.get("axis", 1))
        axis = axis + rank if axis < 0 else axis
        if axis != 1:
            raise self.fail(f"{where}: Flatten with axis {axis} is not supported (netdsl flattens from axis 1)")
        if len(shape) == 1:
            return x
        return self.add_layer(node.output[0], "flatten", {}, [x], where)

    def op_squeeze(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        shape = self.layers[x].shape
        axes = self.axes(inputs, attrs, where)
        if axes is not None and len(shape) == 3 and sorted(a % 4 for a in axes) == [2, 3] and shape[1:] == (1, 1):
            return self.add_layer(node.output[0], "flatten", {}, [x], where)
        raise self.fail(
            f"{where}: Squeeze of N x {_fmt(shape)} with axes {axes} is not supported "
            "(only N x C x 1 x 1 -> N x C, axes 2 and 3)"
        )

    def op_reshape(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        if inputs[1] not in self.consts:
            self.const(inputs[1], where, "the target shape")
        target = [int(d) for d in self.consts[inputs[1]].reshape(-1)]
        shape = self.layers[x].shape
        size = math.prod(shape)
        zero = not attrs.get("allowzero", 0)
        if target:
            first = target[0]
            rest = [shape[i] if d == 0 and zero and i < len(shape) else d for i, d in enumerate(target[1:])]
            fixed = all(d == -1 or d > 0 for d in rest) and rest.count(-1) <= 1
            if first == _BATCH or (first == 0 and zero) or (self.batch is not None and first == self.batch):
                keeps_batch = fixed
            else:
                keeps_batch = first == -1 and fixed and -1 not in rest and math.prod(rest) == size
            known = math.prod(d for d in rest if d != -1) if fixed else 0
            if keeps_batch and known and size % known == 0:
                rest = [size // known if d == -1 else d for d in rest]
                if tuple(rest) == shape:
                    return x
                if rest == [size]:
                    return self.add_layer(node.output[0], "flatten", {}, [x], where)
        shown = "[" + ", ".join("N" if d == _BATCH else str(d) for d in target) + "]"
        raise self.fail(
            f"{where}: Reshape of N x {_fmt(shape)} to {shown} is not supported: netdsl can only flatten "
            f"(to N x {size}, e.g. shape [0, -1] or [-1, {size}])"
        )

    def op_concat(self, node, where, attrs, inputs):
        keys = [self.act(name, where, "an input") for name in inputs if name]
        ranks = {len(self.layers[k].shape) for k in keys}
        if len(ranks) > 1:
            raise self.fail(f"{where}: Concat of inputs of different ranks")
        rank = ranks.pop() + 1
        axis = int(attrs["axis"])
        axis = axis + rank if axis < 0 else axis
        if axis != 1:
            raise self.fail(f"{where}: Concat on axis {axis} is not supported (netdsl joins on channels, axis 1)")
        if len(keys) == 1:
            return keys[0]
        return self.add_layer(node.output[0], "concat", {}, keys, where)

    def op_sum(self, node, where, attrs, inputs):
        given = [name for name in inputs if name]
        if any(name in self.consts for name in given):
            if len(given) == 2:
                return self.op_add(node, where, attrs, given)
            raise self.fail(f"{where}: Sum of layers and constants is not supported")
        keys = [self.act(name, where, "an input") for name in given]
        if len(keys) == 1:
            return keys[0]
        return self.add_layer(node.output[0], "add", {}, keys, where)

    def op_add(self, node, where, attrs, inputs):
        a, b = inputs[0], inputs[1]
        if a in self.consts or b in self.consts:
            act, const = (b, a) if a in self.consts else (a, b)
            x = self.act(act, where)
            value = self.weight(const, where, "the constant added")
            key = self.add_layer(node.output[0], "_bias", {}, [x], where)
            self.layers[key].constant = value
            return key
        keys = [self.act(a, where, "an input"), self.act(b, where, "an input")]
        return self.add_layer(node.output[0], "add", {}, keys, where)

    def arithmetic(self, node, where, inputs):
        """Mul, Sub or Div of an activation and a constant that is one number, or one per channel:
        x * scale + shift per channel (a normalization written as arithmetic, e.g. (x - mean) / std)."""
        a, b = inputs
        if (a in self.consts) == (b in self.consts):
            raise self.fail(
                f"{where}: {node.op_type} of two activations is not supported (only with a constant: one number "
                "or one per channel)"
            )
        first_is_const = a in self.consts
        x = self.act(b if first_is_const else a, where)
        value = self.weight(a if first_is_const else b, where, f"the constant of the {node.op_type}")
        vector = _channel_vector(value, self.layers[x].shape)
        if vector is None:
            raise self.fail(
                f"{where}: {node.op_type} by a constant of shape {_fmt(value.shape)} on N x "
                f"{_fmt(self.layers[x].shape)}; netdsl reads one number or one per channel"
            )
        ones, zeros = np.ones_like(vector), np.zeros_like(vector)
        if node.op_type == "Mul":
            scale, shift = vector, zeros
        elif node.op_type == "Sub":
            scale, shift = (-ones, vector) if first_is_const else (ones, -vector)
        elif first_is_const or not np.all(vector):
            raise self.fail(f"{where}: Div of a constant by an activation, or by zero, is not supported")
        else:
            scale, shift = 1.0 / vector, zeros
        key = self.add_layer(node.output[0], "_affine", {}, [x], where)
        self.layers[key].scale, self.layers[key].shift = scale, shift
        return key

    def op_matmul(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        shape = self.layers[x].shape
        if len(shape) != 1:
            raise self.fail(
                f"{where}: MatMul of an N x {_fmt(shape)} input; netdsl's fc reads N x F (insert a Flatten)"
            )
        weight = self.weight(inputs[1], where, "the weight (B)")
        if weight.ndim != 2 or weight.shape[0] != shape[0]:
            raise self.fail(
                f"{where}: the weight (B) has shape {_fmt(weight.shape)}, but it must be {shape[0]} x units"
            )
        params = {"units": int(weight.shape[1]), "bias": False}
        return self.add_layer(node.output[0], "fc", params, [x], where, {"weight": np.ascontiguousarray(weight.T)})

    def op_gemm(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        shape = self.layers[x].shape
        if len(shape) != 1:
            raise self.fail(f"{where}: Gemm of an N x {_fmt(shape)} input; Gemm reads N x F (insert a Flatten)")
        if attrs.get("transA", 0):
            raise self.fail(f"{where}: Gemm with transA=1 is not supported (the input would be transposed)")
        b = self.weight(inputs[1], where, "the weight (B)")
        if b.ndim != 2:
            raise self.fail(f"{where}: the weight (B) has shape {_fmt(b.shape)}; it must be 2-D")
        weight = b if attrs.get("transB", 0) else b.T
        alpha = np.float32(attrs.get("alpha", 1.0))
        if alpha != 1:
            weight = weight * alpha  # float32, as onnxruntime scales the product
        units, features = weight.shape
        if features != shape[0]:
            layout = f"{units} x {shape[0]}" if attrs.get("transB", 0) else f"{shape[0]} x {units}"
            raise self.fail(
                f"{where}: the weight (B) has shape {_fmt(b.shape)}, but the input has {shape[0]} features "
                f"(B must be {layout} with transB={attrs.get('transB', 0)})"
            )
        weights = {"weight": np.ascontiguousarray(weight, dtype=np.float32)}
        beta = float(np.float32(attrs.get("beta", 1.0)))
        if len(inputs) > 2 and inputs[2] and beta != 0:
            c = self.weight(inputs[2], where, "the bias (C)")
            if c.size == 1:
                c = np.full(units, c.reshape(-1)[0], dtype=np.float32)
            elif c.shape in ((units,), (1, units)):
                c = c.reshape(units)
            else:
                raise self.fail(f"{where}: the bias (C) has shape {_fmt(c.shape)}; netdsl needs {units} or 1 x {units}")
            weights["bias"] = (c.astype(np.float64) * beta).astype(np.float32)
        params = {"units": int(units), "bias": "bias" in weights}
        return self.add_layer(node.output[0], "fc", params, [x], where, weights)

    def op_batch_normalization(self, node, where, attrs, inputs):
        x = self.act(inputs[0], where)
        if attrs.get("training_mode", 0):
            raise self.fail(f"{where}: BatchNormalization in training mode is not supported (inference only)")
        if not attrs.get("spatial", 1):
            raise self.fail(f"{where}: BatchNormalization with spatial=0 is not supported")
        channels = self.layers[x].shape[0]
        names = ("weight", "bias", "running_mean", "running_var")
        whats = ("the scale", "the bias (B)", "the mean", "the variance")
        weights = {
            name: self.weight(inputs[i + 1], where, what, (channels,))
            for i, (name, what) in enumerate(zip(names, whats))
        }
        if np.any(weights["running_var"] < 0):
            raise self.fail(f"{where}: the variance has negative values")
        params = {"eps": _f32(attrs.get("epsilon", 1e-5))}
        return self.add_layer(node.output[0], "batchnorm", params, [x], where, weights)

    def op_conv(self, node, where, attrs, inputs):
        x, attrs = self.take_padding(inputs[0], attrs, where, "Conv")
        weight = self.weight(inputs[1], where, "the weight (W)")
        bias = self.weight(inputs[2], where, "the bias (B)") if len(inputs) > 2 and inputs[2] else None
        return self.conv(node.output[0], x, weight, bias, attrs, where, int(attrs.get("group", 1)))

    def conv(self, name, x, weight, bias, attrs, where, groups) -> int:
        c, h, w = self.channels(x, where, "Conv")
        if weight.ndim != 4:
            raise self.fail(f"{where}: the weight (W) has shape {_fmt(weight.shape)}; netdsl convolutions are 2-D")
        filters, per_group, kh, kw = (int(d) for d in weight.shape)
        if groups < 1 or c % groups or filters % groups or per_group * groups != c:
            raise self.fail(
                f"{where}: the weight (W) has shape {_fmt(weight.shape)}, which does not fit {c} input channels "
                f"in {groups} group(s) (it must be filters x {c // max(groups, 1)} x kh x kw)"
            )
        if "kernel_shape" in attrs and _pair(attrs["kernel_shape"], where, "kernel_shape") != (kh, kw):
            raise self.fail(
                f"{where}: kernel_shape {list(attrs['kernel_shape'])} does not match the weight's {kh} x {kw}"
            )
        if bias is not None and bias.shape != (filters,):
            raise self.fail(f"{where}: the bias (B) has shape {_fmt(bias.shape)}, but it must be {filters}")
        stride = _pair(attrs.get("strides", (1, 1)), where, "strides")
        dilation = _pair(attrs.get("dilations", (1, 1)), where, "dilations")
        pad, _ceil = self.window(where, "conv", attrs, (h, w), (kh, kw), stride, dilation, ceil_mode=False)
        params = {
            "filters": filters,
            "size": (kh, kw),
            "stride": stride,
            "pad": pad,
            "dilation": dilation,
            "groups": groups,
            "bias": bias is not None,
        }
        weights = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return self.add_layer(name, "conv", params, [x], where, weights)

    def pool(self, node, where, attrs, inputs, op: str):
        x, attrs = self.take_padding(inputs[0], attrs, where, node.op_type)
        _c, h, w = self.channels(x, where, node.op_type)
        kernel = _pair(attrs["kernel_shape"], where, "kernel_shape")
        if any(d != 1 for d in attrs.get("dilations", (1, 1))):
            raise self.fail(f"{where}: {node.op_type} with dilations {list(attrs['dilations'])} is not supported")
        stride = _pair(attrs.get("strides", (1, 1)), where, "strides")
        count_pad = bool(attrs.get("count_include_pad", 0)) if op == "avgpool" else None
        pad, ceil = self.window(
            where, op, attrs, (h, w), kernel, stride, (1, 1), bool(attrs.get("ceil_mode", 0)), count_pad
        )
        if kernel == (1, 1) and stride == (1, 1) and pad == (0, 0):
            return x  # a 1 x 1 window moved by 1: the identity (PyTorch's adaptive pool to the size it has)
        params = {"size": kernel, "stride": stride, "pad": pad, "ceil": ceil}
        if op == "avgpool":
            params["count_pad"] = count_pad
        return self.add_layer(node.output[0], op, params, [x], where)

    def op_pad(self, node, where, attrs, inputs):
        """A zero Pad of H and W (as TensorFlow exports write before a VALID conv): remembered, and
        folded into the conv or pool that reads it."""
        x = self.act(inputs[0], where)
        rank = len(self.layers[x].shape) + 1
        mode = attrs.get("mode", "constant")
        if mode != "constant":
            raise self.fail(f"{where}: Pad mode `{_shown(mode)}` is not supported (only zeros: mode constant)")
        if self.opset < 11:
            pads, value = [int(p) for p in attrs.get("pads", ())], float(attrs.get("value", 0.0))
        else:
            pads = [int(p) for p in self.const(inputs[1], where, "the pads").reshape(-1)]
            has_value = len(inputs) > 2 and inputs[2]
            value = float(self.const(inputs[2], where, "the value").reshape(-1)[0]) if has_value else 0.0
            if len(inputs) > 3 and inputs[3]:  # opset 18: the axes the pads are for
                axes = [int(a) % rank for a in self.const(inputs[3], where, "the axes").reshape(-1)]
                full = [0] * (2 * rank)
                for i, axis in enumerate(axes):
                    full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
                pads = full
        if rank != 4 or len(pads) != 8:
            raise self.fail(f"{where}: Pad of an N x {_fmt(self.layers[x].shape)} input is not supported")
        if value != 0 or min(pads) < 0 or any(pads[i] for i in (0, 1, 4, 5)):
            raise self.fail(
                f"{where}: only a Pad with zeros of height and width can be read (pads {pads}, value {value:g})",
                hint="it is folded into the Conv or pooling layer after it",
            )
        self.padded[node.output[0]] = (x, (pads[2], pads[3], pads[6], pads[7]))
        self.unusable[node.output[0]] = (
            f"{where}: a Pad can be read only by the Conv or pooling node after it, which takes the padding "
            "as its own (netdsl has no pad layer)"
        )
        return None

    def take_padding(self, name: str, attrs: dict, where: str, op: str) -> tuple[int, dict]:
        """The layer `name` holds and the node's attributes, with the padding of a Pad before it added."""
        if name not in self.padded:
            return self.act(name, where), attrs
        x, (top, left, bottom, right) = self.padded[name]
        auto = attrs.get("auto_pad", "NOTSET") or "NOTSET"
        if auto not in ("NOTSET", "VALID"):
            raise self.fail(f"{where}: a {op} with auto_pad {auto} after a Pad is not supported")
        own = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))] if auto == "NOTSET" else [0, 0, 0, 0]
        if op == "MaxPool" and self.layers[x].op not in ("relu", "softmax"):
            raise self.fail(
                f"{where}: MaxPool after a Pad with zeros is read only when its input is >= 0 (after a Relu): "
                "it pads with -infinity",
            )
        if op == "AveragePool":
            if any(own) or attrs.get("ceil_mode", 0):
                raise self.fail(f"{where}: an AveragePool after a Pad needs no padding and no ceil_mode of its own")
            attrs = {**attrs, "count_include_pad": 1}  # the Pad's zeros are values the average counts
        pads = [own[0] + top, own[1] + left, own[2] + bottom, own[3] + right]
        return x, {**attrs, "auto_pad": "NOTSET", "pads": pads}

    def op_max_pool(self, node, where, attrs, inputs):
        return self.pool(node, where, attrs, inputs, "maxpool")

    def op_average_pool(self, node, where, attrs, inputs):
        return self.pool(node, where, attrs, inputs, "avgpool")

    def window(self, where, op, attrs, size, kernel, stride, dilation, ceil_mode, count_pad=None):
        """netdsl's (pad, ceil) for an ONNX window: the same windows at the same places, or an error.
        netdsl pads both sides alike; an ONNX padding that differs at the end is accepted when the
        extra padding is never read (or, for pooling, when ceil=true reproduces it exactly)."""
        auto = attrs.get("auto_pad", "NOTSET") or "NOTSET"
        if auto == "NOTSET":
            pads = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))]
            if len(pads) != 4:
                raise self.fail(f"{where}: pads has {len(pads)} values; netdsl layers are 2-D (4 pads)")
            if min(pads) < 0:
                raise self.fail(f"{where}: negative pads {pads} are not supported")
            pairs = [(pads[0], pads[2]), (pads[1], pads[3])]
        elif auto == "VALID":
            pairs = [(0, 0), (0, 0)]
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            pairs = []
            for n, k, s, d in zip(size, kernel, stride, dilation):
                total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                small, big = total // 2, total - total // 2
                pairs.append((small, big) if auto == "SAME_UPPER" else (big, small))
        else:
            raise self.fail(f"{where}: unknown auto_pad `{_shown(auto)}`")
        counts = []
        for n, k, s, d, (begin, end) in zip(size, kernel, stride, dilation, pairs):
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                counts.append(-(-n // s))
            else:
                counts.append(_onnx_count(n, (k - 1) * d + 1, s, begin, end, ceil_mode))
        for ceil in (ceil_mode, not ceil_mode) if op != "conv" else (False,):
            if all(
                _same_windows(n, k, s, d, begin, end, count, ceil, count_pad)
                for n, k, s, d, (begin, end), count in zip(size, kernel, stride, dilation, pairs, counts)
            ):
                return (pairs[0][0], pairs[1][0]), ceil
        shown = [pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]]
        raise self.fail(
            f"{where}: padding {shown} (top, left, bottom, right) cannot be written in netdsl, which pads both "
            "sides alike",
            hint="re-export the model with symmetric padding",
        )

    # --- patterns -----------------------------------------------------------------------------

    def split_group(self, index, node, where, attrs):
        """Split (channels, equal parts) -> the same LRN or Conv on each part -> Concat, in order: one
        lrn(groups=n) or one conv(groups=n) (what `netdsl export` writes for lrn(groups=n))."""
        graph = self.model.graph
        bad = self.fail(
            f"{where}: Split is supported only as Split (channels, equal parts) -> one LRN or Conv per part -> "
            "Concat of them all, in order (a grouped layer)"
        )
        x = self.act(node.input[0], where)
        shape = self.layers[x].shape
        parts = list(node.output)
        axis = int(attrs.get("axis", 0))
        if len(shape) != 3 or axis not in (1, -3) or len(parts) < 2 or any(not p for p in parts):
            raise bad
        if len(node.input) > 1 and node.input[1]:
            sizes = [int(s) for s in self.const(node.input[1], where, "the split sizes").reshape(-1)]
        else:
            sizes = [int(s) for s in attrs.get("split", [shape[0] // len(parts)] * len(parts))]
        if len(set(sizes)) != 1 or sum(sizes) != shape[0]:
            raise bad
        branches = []
        for part in parts:
            users = self.consumers.get(part, [])
            if len(users) != 1 or part in self.graph_outputs:
                raise bad
            branches.append(users[0])
        first = graph.node[branches[0]]
        if first.op_type not in ("LRN", "Conv") or len(set(branches)) != len(branches):
            raise bad
        joins = set()
        for part, b in zip(parts, branches):
            branch = graph.node[b]
            if (
                branch.op_type != first.op_type
                or branch.input[0] != part
                or len([o for o in branch.output if o]) != 1
                or list(branch.attribute) != list(first.attribute)
                or branch.output[0] in self.graph_outputs
            ):
                raise bad
            users = self.consumers.get(branch.output[0], [])
            if len(users) != 1:
                raise bad
            joins.add(users[0])
        if len(joins) != 1:
            raise bad
        join_index = joins.pop()
        join = graph.node[join_index]
        if (
            join.op_type != "Concat"
            or list(join.input) != [graph.node[b].output[0] for b in branches]
            or int(_attributes(join, where).get("axis", 0)) not in (1, -3)
        ):
            raise bad
        branch_where = _where(first, branches[0])
        if first.op_type == "LRN":
            params = {**self.lrn_params(branch_where, _attributes(first, branch_where)), "groups": len(parts)}
            key = self.add_layer(join.output[0], "lrn", params, [x], where)
        else:
            convs = [graph.node[b] for b in branches]
            if any(len(c.input) < 2 for c in convs) or len({len([i for i in c.input if i]) for c in convs}) != 1:
                raise bad
            conv_attrs = _attributes(first, branch_where)
            groups = int(conv_attrs.get("group", 1))
            weight = np.concatenate(
                [self.weight(c.input[1], _where(c, b), "the weight (W)") for c, b in zip(convs, branches)]
            )
            has_bias = len(first.input) > 2 and bool(first.input[2])
            bias = (
                np.concatenate([self.weight(c.input[2], _where(c, b), "the bias (B)") for c, b in zip(convs, branches)])
                if has_bias
                else None
            )
            key = self.conv(join.output[0], x, weight, bias, conv_attrs, where, groups * len(parts))
        self.skip.update(branches)
        self.skip.add(join_index)
        self.acts[join.output[0]] = key
        return None

    # --- clean-up -----------------------------------------------------------------------------

    def readers(self) -> dict[int, list[int]]:
        found: dict[int, list[int]] = {key: [] for key in self.layers}
        for key, layer in self.layers.items():
            for source in layer.inputs:
                found[source].append(key)
        return found

    def replace(self, old: int, new: int) -> None:
        for layer in self.layers.values():
            layer.inputs = [new if k == old else k for k in layer.inputs]
        self.outputs = [(name, new if k == old else k) for name, k in self.outputs]

    def output_keys(self) -> set[int]:
        return {k for _, k in self.outputs}

    def clean_up(self) -> None:
        self.drop_unused()  # dangling nodes must not keep a conv from taking its bias
        self.fold_biases()
        self.lower_affines()
        self.join_flat_concats()
        self.drop_flattens_before_fc()
        self.merge_duplicates()
        self.drop_unused()
        self.name_outputs()

    def fold_biases(self) -> None:
        """A constant Add right after a conv or an fc (read by nothing else) is that layer's bias; any
        other per-channel constant Add becomes an `_affine` (see lower_affines)."""
        for key in sorted(k for k, layer in self.layers.items() if layer.op == "_bias"):
            add = self.layers[key]
            source = self.layers[add.inputs[0]]
            readers = self.readers()
            value = np.asarray(add.constant, dtype=np.float32)
            channels = source.shape[0]
            vector = _channel_vector(value, source.shape)
            if vector is not None and (
                source.op not in ("conv", "fc") or readers[source.key] != [key] or source.key in self.output_keys()
            ):
                add.op, add.scale, add.shift = "_affine", np.ones_like(vector), vector
                continue
            if vector is None:
                raise self.fail(
                    f"{add.where}: adds a constant of shape {_fmt(value.shape)} to N x {_fmt(source.shape)}; netdsl "
                    "reads a constant added to activations only as one number or one per channel"
                )
            old = source.weights.get("bias", np.zeros(channels, np.float32))
            source.weights["bias"] = (old.astype(np.float64) + vector).astype(np.float32)
            source.params["bias"] = True
            source.name = add.name
            self.replace(key, source.key)
            del self.layers[key]

    def lower_affines(self) -> None:
        """Per-channel x * scale + shift: runs of them composed into one, then folded into the conv or
        fc right before (read by nothing else), else written as batchnorm(eps=0) with mean 0, var 1."""
        for key in sorted(k for k, layer in self.layers.items() if layer.op == "_affine"):
            affine = self.layers[key]
            source = self.layers[affine.inputs[0]]
            alone = self.readers()[source.key] == [key] and source.key not in self.output_keys()
            if source.op == "_affine" and alone:  # scale2 * (scale1 * x + shift1) + shift2
                affine.scale, affine.shift = source.scale * affine.scale, source.shift * affine.scale + affine.shift
                affine.inputs = list(source.inputs)
                del self.layers[source.key]
        for key in sorted(k for k, layer in self.layers.items() if layer.op == "_affine"):
            affine = self.layers[key]
            source = self.layers[affine.inputs[0]]
            alone = self.readers()[source.key] == [key] and source.key not in self.output_keys()
            if source.op in ("conv", "fc") and alone:
                weight = source.weights["weight"].astype(np.float64)
                bias = source.weights.get("bias", np.zeros(weight.shape[0])).astype(np.float64)
                scale = affine.scale.reshape(-1, *([1] * (weight.ndim - 1)))
                source.weights["weight"] = (weight * scale).astype(np.float32)
                source.weights["bias"] = (bias * affine.scale + affine.shift).astype(np.float32)
                source.params["bias"] = True
                source.name = affine.name
                self.replace(key, source.key)
                del self.layers[key]
                continue
            channels = affine.scale.size
            affine.op, affine.params = "batchnorm", {"eps": 0.0}
            affine.weights = {
                "weight": affine.scale.astype(np.float32),
                "bias": affine.shift.astype(np.float32),
                "running_mean": np.zeros(channels, np.float32),
                "running_var": np.ones(channels, np.float32),
            }

    def join_flat_concats(self) -> None:
        """concat(flatten(a), flatten(b)) of maps of one size is flatten(concat(a, b)): what an fc
        reading several maps is exported as; netdsl's fc then reads the joined map itself."""
        for key in sorted(k for k, layer in self.layers.items() if layer.op == "concat"):
            join = self.layers[key]
            readers = self.readers()
            flats = [self.layers[k] for k in join.inputs]
            if len(join.shape) != 1 or any(
                f.op != "flatten" or readers[f.key] != [key] or f.key in self.output_keys() for f in flats
            ):
                continue
            maps = [self.layers[f.inputs[0]] for f in flats]
            if len({m.shape[1:] for m in maps}) != 1:
                continue
            inner = self.add_layer(join.name, "concat", {}, [m.key for m in maps], join.where)
            self.layers[inner].order = join.order - 0.5
            join.op, join.inputs, join.name = "flatten", [inner], join.name + "/flat"
            for f in flats:
                del self.layers[f.key]

    def drop_flattens_before_fc(self) -> None:
        outputs = self.output_keys()
        readers = self.readers()
        for key in sorted(k for k, layer in self.layers.items() if layer.op == "flatten"):
            if key in outputs or not readers[key] or any(self.layers[r].op != "fc" for r in readers[key]):
                continue
            self.replace(key, self.layers[key].inputs[0])
            del self.layers[key]
            readers = self.readers()

    def merge_duplicates(self) -> None:
        """Layers without weights that compute the same thing from the same inputs are one layer."""
        changed = True
        while changed:
            changed = False
            seen: dict[tuple, int] = {}
            outputs = self.output_keys()
            for key in sorted(self.layers, key=lambda k: self.layers[k].order):
                layer = self.layers[key]
                if layer.op == "input" or layer.weights or key in outputs:
                    continue
                signature = (layer.op, _frozen(layer.params), tuple(layer.inputs))
                if signature in seen:
                    self.replace(key, seen[signature])
                    del self.layers[key]
                    changed = True
                else:
                    seen[signature] = key

    def drop_unused(self) -> None:
        needed, stack = set(), [k for _, k in self.outputs]
        while stack:
            key = stack.pop()
            if key not in needed:
                needed.add(key)
                stack.extend(self.layers[key].inputs)
        dropped = [k for k, layer in self.layers.items() if k not in needed and layer.op != "input"]
        for key in dropped:
            del self.layers[key]

    def name_outputs(self) -> None:
        """An output that is an alias of a layer (Identity, Dropout) gives the layer its name."""
        seen: dict[int, str] = {}
        outputs = []
        own = {name for name, key in self.outputs if self.layers[key].name == name}
        for name, key in self.outputs:
            if key in seen:
                self.notes.append(
                    f"outputs '{_shown(seen[key])}' and '{_shown(name)}' are the same layer; the net lists it once"
                )
                continue
            layer = self.layers[key]
            if layer.name != name and layer.name not in own:
                layer.name = name
            seen[key] = name
            outputs.append((name, key))
        self.outputs = outputs

    # --- towers -------------------------------------------------------------------------------

    def order(self) -> list[int]:
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from(self.layers)
        for key, layer in self.layers.items():
            graph.add_edges_from((source, key) for source in layer.inputs)
        return list(nx.lexicographical_topological_sort(graph, key=lambda k: self.layers[k].order))

    def tower_plan(self) -> _Towers | None:
        plan = _find_copies(self)
        if plan is None:
            plan = _split_groups(self)
        return plan

    # --- writing ------------------------------------------------------------------------------

    def write(self, path: Path, plan: _Towers | None, weights_name: str | None) -> OnnxImport:
        from netdsl.lang.frontend import graph_from_text
        from netdsl.runtime.weights import weight_specs

        writer = _Writer(self, plan)
        text, weights = writer.text(path, weights_name)
        try:
            graph = graph_from_text(text, file=str(path.with_suffix(".net")))
        except NetError as error:  # a bug here, not in the model
            raise self.fail(
                f"internal error: the imported net does not build: {error.message}", hint="please report this model"
            ) from None
        specs = weight_specs(graph)
        if set(specs) != set(weights) or any(tuple(weights[n].shape) != s for n, s in specs.items()):
            raise self.fail(
                "internal error: the weights do not match the imported net", hint="please report this model"
            )
        return OnnxImport(text, {name: weights[name] for name in specs}, self.notes + writer.notes)


def _frozen(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def _channel_vector(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """A constant added to N x shape, as one number per channel (None if it varies otherwise)."""
    channels = shape[0]
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    dims = list(value.shape)
    while dims and dims[0] == 1 and len(dims) > len(shape):
        dims.pop(0)
    per_channel = [channels] + [1] * (len(shape) - 1)
    if dims == per_channel or (len(shape) == 1 and dims == [channels]):
        return value.reshape(channels).astype(np.float64)
    return None


def _onnx_count(n: int, span: int, stride: int, begin: int, end: int, ceil: bool) -> int:
    """Windows along one axis as ONNX (and onnxruntime) count them, with pads `begin` and `end`."""
    room = n + begin + end - span
    if room < 0:
        return 0
    if not ceil:
        return room // stride + 1
    count = -(-room // stride) + 1
    if (count - 1) * stride >= n + begin:  # the last window must start inside the input or the left pad
        count -= 1
    return count


def _same_windows(n, k, s, d, begin, end, count, ceil, count_pad) -> bool:
    """Whether netdsl's windows with pad `begin` on both sides (and `ceil`) are ONNX's: as many, at the
    same places; for an average counting padding, also covering the same padded positions."""
    if count < 1 or window_out(n, k, s, begin, d, ceil) != count:
        return False
    if count_pad and begin != end:
        last_end = -begin + (count - 1) * s + (k - 1) * d + 1
        return min(last_end, n + end) == min(last_end, n + begin)
    return True


# --- towers ----------------------------------------------------------------------------------------


@dataclass
class _Towers:
    """Layers written inside `towers`: each set is one layer per tower (in tower order); `allref`
    concats (of a whole set, in order) are written `all x`."""

    devices: list[str]
    sets: list[list[int]]
    allref: dict[int, int]  # concat layer -> set index
    names: list[str]  # each set's name, without the tower

    def tower_of(self) -> dict[int, tuple[int, int]]:
        return {key: (s, t) for s, members in enumerate(self.sets) for t, key in enumerate(members)}


def _signature(layer: _Layer) -> tuple:
    return (
        layer.op,
        _frozen(layer.params),
        tuple(sorted((n, w.shape) for n, w in layer.weights.items())),
        layer.shape,
    )


def _find_copies(imp: _Importer) -> _Towers | None:
    """Parallel copies of layers, as `netdsl export` writes a net with towers: layers of one kind
    reading the same inputs (or each its own copy of them) form a set, one copy per tower."""
    order = imp.order()
    readers = imp.readers()
    outputs = imp.output_keys()
    tower_of: dict[int, tuple[int, int]] = {}
    allref: dict[int, int] = {}
    sets: list[list[int]] = []
    count: int | None = None

    def describe(layer: _Layer):
        refs, towers = [], set()
        for k in layer.inputs:
            if k in allref:
                refs.append(("all", allref[k]))
            elif k in tower_of:
                s, t = tower_of[k]
                refs.append(("own", s))
                towers.add(t)
            else:
                refs.append(("shared", k))
        if len(towers) > 1:
            return None
        return (_signature(layer), tuple(refs)), (towers.pop() if towers else None)

    for key in order:
        layer = imp.layers[key]
        if layer.op == "input" or key in tower_of:
            continue
        if layer.op == "concat" and key not in outputs:
            whole = [tower_of.get(k) for k in layer.inputs]
            if whole and all(whole) and len({s for s, _ in whole}) == 1:
                s = whole[0][0]
                if [t for _, t in whole] == list(range(len(sets[s]))):
                    allref[key] = s
                    continue
        described = describe(layer)
        if described is None:
            continue
        signature, tower = described
        if tower is None:
            source = layer.inputs[0] if layer.inputs else None
            if source is None:
                continue
            members = []
            for r in dict.fromkeys(readers[source]):
                other = imp.layers[r]
                if r in tower_of or r in allref or other.op == "input":
                    continue
                found = describe(other)
                if found is not None and found == (signature, None):
                    members.append(r)
            members.sort(key=lambda k: imp.layers[k].order)
            if len(members) < 2 or (count is not None and len(members) != count):
                continue
        else:
            position = next(i for i, ref in enumerate(signature[1]) if ref[0] == "own")
            s = signature[1][position][1]
            members = []
            for t, copy in enumerate(sets[s]):
                if t == tower:
                    members.append(key)
                    continue
                found = [
                    r
                    for r in dict.fromkeys(readers[copy])
                    if r not in tower_of
                    and imp.layers[r].inputs[position : position + 1] == [copy]
                    and describe(imp.layers[r]) == (signature, t)
                ]
                if len(found) != 1:
                    break
                members.append(found[0])
            if len(members) != len(sets[s]):
                continue
        count = len(members)
        for t, k in enumerate(members):
            tower_of[k] = (len(sets), t)
        sets.append(members)
    if not sets:
        return None
    names, suffixes = [], []
    for members in sets:
        base, ends = _tower_base([imp.layers[k].name for k in members])
        names.append(base)
        suffixes.append(ends)
    devices = [f"gpu{t}" for t in range(count)]
    first = suffixes[0]
    if first and all(s == first for s in suffixes) and all(_is_name(d) for d in first) and len(set(first)) == count:
        devices = list(first)
    imp.notes.append(f"--towers: {len(sets)} layers written once per tower ({', '.join(devices)})")
    return _Towers(devices, sets, allref, names)


def _tower_base(names: list[str]) -> tuple[str, list[str] | None]:
    """`conv1.relu_gpu0`, `conv1.relu_gpu1` -> `conv1.relu` and the towers `gpu0`, `gpu1`."""
    prefix = names[0][: next((i for i, chars in enumerate(zip(*names)) if len(set(chars)) > 1), min(map(len, names)))]
    cut = max(prefix.rfind("_"), prefix.rfind("@"))
    if cut <= 0:
        return names[0], None
    return names[0][:cut], [name[cut + 1 :] for name in names]


def _split_groups(imp: _Importer) -> _Towers | None:
    """Grouped convolutions (all with the same groups g, 2 to 8) split into g towers: each tower
    computes one group's channels. Layers a grouped conv reads are split as far back as needed (a
    conv with groups=1 splits its filters, reading all its input; per-channel layers split along);
    per-channel layers after a split layer are split too; the rest reads `all x`."""
    grouped = [k for k, layer in imp.layers.items() if layer.op == "conv" and layer.params["groups"] > 1]
    if not grouped:
        imp.notes.append("--towers: no grouped convolutions or parallel layers to split; wrote a one-device net")
        return None
    counts = {imp.layers[k].params["groups"] for k in grouped}
    if len(counts) != 1 or not 2 <= min(counts) <= 8:
        shown = ", ".join(str(g) for g in sorted(counts))
        imp.notes.append(
            f"--towers: the grouped convolutions have groups {shown}; towers need one count from 2 to 8, "
            "so the net stays on one device"
        )
        return None
    count = counts.pop()
    outputs = imp.output_keys()
    split: set[int] = set()

    def splittable(key: int, need: list[int]) -> str | None:
        """Marks `key` (and what it needs) to split; returns why it cannot be split, or None."""
        if key in split or key in need:
            return None
        layer = imp.layers[key]
        p = layer.params
        if key in outputs:
            return f"`{_shown(layer.name)}` is an output"
        if layer.op == "input":
            return f"`{_shown(layer.name)}` is an input of the net"
        if len(layer.shape) != 3 or layer.shape[0] % count:
            return f"`{_shown(layer.name)}` ({_fmt(layer.shape)}) cannot be cut into {count} channel groups"
        if layer.op == "conv" and p["groups"] == 1:
            need.append(key)
            return None
        if (layer.op in ("conv", "lrn") and p["groups"] % count == 0) or layer.op in _PER_CHANNEL - {"lrn"}:
            need.append(key)
            return splittable(layer.inputs[0], need)
        return f"`{_shown(layer.name)}` ({layer.op}) mixes the channels of the groups"

    for key in sorted(grouped):
        need: list[int] = []
        why = splittable(key, need)
        if why is not None:
            imp.notes.append(
                f"--towers: cannot split the groups of `{_shown(imp.layers[key].name)}`: {why}; "
                "the net stays on one device"
            )
            return None
        split.update(need)
    for key in imp.order():
        layer = imp.layers[key]
        if key in split or key in outputs or not layer.inputs or layer.inputs[0] not in split:
            continue
        p = layer.params
        if layer.op in _PER_CHANNEL - {"lrn"} or (layer.op == "lrn" and p["groups"] % count == 0):
            split.add(key)
    # Replace each split layer by one copy per tower.
    copies: dict[int, list[int]] = {}
    for key in imp.order():
        if key not in split:
            continue
        layer = imp.layers[key]
        members = []
        for t in range(count):
            params, weights = dict(layer.params), {}
            part = layer.shape[0] // count
            cut = slice(t * part, (t + 1) * part)
            if layer.op == "conv":
                params["filters"] = part
                params["groups"] = max(1, layer.params["groups"] // count)
            if layer.op == "lrn":
                params["groups"] = layer.params["groups"] // count
            for name, value in layer.weights.items():
                weights[name] = np.ascontiguousarray(value[cut])
            source = layer.inputs[0]
            if source in copies:
                if layer.op == "conv" and layer.params["groups"] == 1:
                    inputs = [_all_of(imp, copies[source])]
                else:
                    inputs = [copies[source][t]]
            else:
                inputs = [source]
            copy = imp.add_layer(layer.name, layer.op, params, inputs, layer.where, weights)
            imp.layers[copy].order = layer.order + (t + 1) / (count + 1) / 2
            members.append(copy)
        copies[key] = members
    for key, members in copies.items():
        joined = _all_of(imp, members)
        for other in list(imp.layers.values()):
            if other.key not in split and not (other.op == "concat" and other.inputs == members):
                other.inputs = [joined if k == key else k for k in other.inputs]
    for key in split:
        del imp.layers[key]
    sets = [copies[k] for k in sorted(copies, key=lambda k: imp.layers[copies[k][0]].order)]
    index = {members[0]: i for i, members in enumerate(sets)}
    allref = {}
    for layer in imp.layers.values():
        if layer.op == "concat" and layer.inputs and layer.inputs[0] in index:
            s = index[layer.inputs[0]]
            if layer.inputs == sets[s]:
                allref[layer.key] = s
    imp.drop_unused()
    devices = [f"gpu{t}" for t in range(count)]
    imp.notes.append(f"--towers: {len(sets)} layers split into {count} towers ({', '.join(devices)})")
    return _Towers(devices, sets, allref, [imp.layers[m[0]].name for m in sets])


def _all_of(imp: _Importer, members: list[int]) -> int:
    """A concat of every tower's copy (written `all x`), made once per set."""
    cache = imp.__dict__.setdefault("_all_cache", {})
    if tuple(members) not in cache:
        key = imp.add_layer(imp.layers[members[0]].name + "/all", "concat", {}, list(members), "")
        imp.layers[key].order = max(imp.layers[m].order for m in members) + 0.01
        cache[tuple(members)] = key
    return cache[tuple(members)]


# --- writing the .net text -------------------------------------------------------------------------


def _is_name(text: str) -> bool:
    return bool(_NAME.match(text)) and text not in RESERVED and text not in BUILTINS


def _torch_name(name: str) -> str:
    """torch.onnx.export's `/features/features.0/Conv_output_0` -> `features.0` (the module's
    qualified name); `/layer1/layer1.0/conv1/Conv_output_0` -> `layer1.0/conv1`; `/Flatten_output_0`
    -> `Flatten`. Other names are returned as they are."""
    match = _TORCH_NAME.match(name)
    if not match:
        return name
    if not match.group(1):
        return match.group(2)
    kept: list[str] = []
    for part in match.group(1).split("/"):
        if kept and part.startswith(kept[-1] + "."):
            kept[-1] = part
        else:
            kept.append(part)
    return "/".join(kept)


def _sanitize(name: str, fallback: str) -> str:
    """A valid netdsl name for an ONNX name: kept when valid, else runs of other characters become `_`."""
    if _is_name(name) and len(name) <= _LONGEST_NAME:
        return name
    clean = _NOT_NAME.sub("_", _torch_name(name)).strip("_")[:_LONGEST_NAME].rstrip("_")
    if not clean:
        return fallback
    if clean[0].isdigit():
        clean = f"{fallback}_{clean}"
    if clean in RESERVED or clean in BUILTINS:
        clean = f"{clean}_"
    return clean


def _number(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), text)


def _size(value: tuple[int, int]) -> str:
    return str(value[0]) if value[0] == value[1] else f"({value[0]}, {value[1]})"


def _arguments(op: str, params: dict) -> list[str]:
    """The parameters of a layer as written after its input: positional ones, then those that
    differ from netdsl's defaults."""
    p = params
    if op == "conv":
        args = [str(p["filters"]), f"size={_size(p['size'])}"]
        if p["stride"] != (1, 1):
            args.append(f"stride={_size(p['stride'])}")
        if p["pad"] != (0, 0):
            args.append(f"pad={_size(p['pad'])}")
        if p["dilation"] != (1, 1):
            args.append(f"dilation={_size(p['dilation'])}")
        if p["groups"] != 1:
            args.append(f"groups={p['groups']}")
        if not p["bias"]:
            args.append("bias=false")
        return args
    if op == "fc":
        return [str(p["units"])] + ([] if p["bias"] else ["bias=false"])
    if op in ("maxpool", "avgpool"):
        args = [_size(p["size"])]
        if p["stride"] != p["size"]:
            args.append(f"stride={_size(p['stride'])}")
        if p["pad"] != (0, 0):
            args.append(f"pad={_size(p['pad'])}")
        if p["ceil"]:
            args.append("ceil=true")
        if op == "avgpool" and not p["count_pad"] and p["pad"] != (0, 0):
            args.append("count_pad=false")
        return args
    if op == "lrn":
        args = [
            f"size={p['size']}",
            f"alpha={_number(p['alpha'])}",
            f"beta={_number(p['beta'])}",
            f"k={_number(p['k'])}",
        ]
        return args + ([f"groups={p['groups']}"] if p["groups"] != 1 else [])
    if op == "leaky_relu":
        return [_number(p["slope"])]
    if op == "batchnorm":
        return [] if p["eps"] == 1e-5 else [f"eps={_number(p['eps'])}"]
    return []


@dataclass
class _Unit:
    """One statement-level thing: a layer, or a set of tower copies written once."""

    index: int
    members: list[int]  # one layer, or one per tower
    towered: bool
    name: str
    op: str
    params: dict
    refs: list[tuple[str, int, int]] = field(default_factory=list)  # (plain | all | at, unit, tower)


class _Writer:
    def __init__(self, imp: _Importer, plan: _Towers | None) -> None:
        self.imp = imp
        self.notes: list[str] = []
        self.plan = plan or _Towers([], [], {}, [])
        tower_of = self.plan.tower_of()
        self.units: list[_Unit] = []
        unit_of: dict[int, int] = {}
        for s, members in enumerate(self.plan.sets):
            first = imp.layers[members[0]]
            unit = _Unit(len(self.units), members, True, self.plan.names[s], first.op, first.params)
            for k in members:
                unit_of[k] = unit.index
            self.units.append(unit)
        set_unit = {s: unit_of[m[0]] for s, m in enumerate(self.plan.sets)}
        for key in imp.order():
            if key in unit_of or key in self.plan.allref:
                continue
            layer = imp.layers[key]
            unit_of[key] = len(self.units)
            self.units.append(_Unit(len(self.units), [key], False, layer.name, layer.op, layer.params))
        for unit in self.units:
            for k in imp.layers[unit.members[0]].inputs:
                if k in self.plan.allref:
                    unit.refs.append(("all", set_unit[self.plan.allref[k]], 0))
                elif k in tower_of:
                    unit.refs.append(("plain" if unit.towered else "at", unit_of[k], tower_of[k][1]))
                else:
                    unit.refs.append(("plain", unit_of[k], 0))
        self.unit_of = unit_of
        self.output_refs = []
        for _, key in imp.outputs:
            if key in tower_of:
                self.output_refs.append(("at", unit_of[key], tower_of[key][1]))
            else:
                self.output_refs.append(("plain", unit_of[key], 0))
        self.order = self.unit_order()

    def unit_order(self) -> list[int]:
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from(u.index for u in self.units)
        for unit in self.units:
            graph.add_edges_from((ref[1], unit.index) for ref in unit.refs)
        position = {u.index: min(self.imp.layers[k].order for k in u.members) for u in self.units}
        return list(nx.lexicographical_topological_sort(graph, key=lambda u: position[u]))

    def text(self, path: Path, weights_name: str | None) -> tuple[str, dict[str, np.ndarray]]:
        imp = self.imp
        uses = Counter()
        plain_reader: dict[int, int] = {}
        for unit in self.units:
            for kind, source, _ in unit.refs:
                uses[source] += 1
                if kind == "plain":
                    plain_reader[source] = unit.index
        output_units = {ref[1] for ref in self.output_refs}
        for ref in self.output_refs:
            uses[ref[1]] += 1
        self.taken: set[str] = set()
        wanted = {u.index: _sanitize(u.name, "input" if u.op == "input" else u.op) for u in self.units}
        reserved = set(wanted.values())
        self.presets: dict[str, tuple[str, tuple]] = {}
        preset_params: dict[str, dict] = {}
        chains: list[list[tuple[_Unit, str]]] = []
        head_name: dict[int, str] = {}
        chain_of: dict[int, int] = {}  # unit -> its chain
        for index in self.order:
            unit = self.units[index]
            if index in chain_of:
                continue
            name = self.unique(wanted[index])
            head_name[index] = name
            chain = [(unit, unit.op)]
            chain_of[index] = len(chains)
            counts = Counter()
            current = unit
            while unit.op != "input":
                nxt = plain_reader.get(current.index)
                if nxt is None or uses[current.index] != 1 or current.index in output_units:
                    break
                follower = self.units[nxt]
                if len(follower.refs) != 1 or follower.towered != current.towered or nxt in chain_of:
                    break
                word = self.chain_word(name, follower, counts, follower.index in output_units, reserved)
                if word is None:
                    break
                if word != follower.op:
                    preset_params[word] = follower.params
                counts[word] += 1
                chain.append((follower, word))
                chain_of[nxt] = len(chains)
                current = follower
            chains.append(chain)
        # The name that reads each chain's result, and every layer's netdsl name (for the weights).
        ref_name: dict[int, str] = {}
        layer_names: dict[int, str] = {}
        for chain in chains:
            head = head_name[chain[0][0].index]
            counts = Counter()
            ref_name[chain[-1][0].index] = head
            for position, (unit, word) in enumerate(chain):
                if position == 0:
                    base = head
                else:
                    counts[word] += 1
                    base = f"{head}.{word}" + (f"_{counts[word]}" if counts[word] > 1 else "")
                for t, key in enumerate(unit.members):
                    layer_names[key] = f"{base}@{self.plan.devices[t]}" if unit.towered else base
        weights = {}
        for key, name in layer_names.items():
            for tensor, value in imp.layers[key].weights.items():
                weights[f"{name}.{tensor}"] = np.ascontiguousarray(value, dtype=np.float32)

        def ref(kind: str, unit: int, tower: int) -> str:
            if kind == "all":
                return f"all {ref_name[unit]}"
            if kind == "at":
                return f"{ref_name[unit]}@{self.plan.devices[tower]}"
            return ref_name[unit]

        lines = [f"# Imported from the ONNX model {_sanitize_file(path.name)} (opset {imp.opset}) by `netdsl import`."]
        if weights_name is not None:
            lines.append(f"# Weights: {_sanitize_file(weights_name)}")
        lines.append(f"net {_sanitize(imp.model.graph.name or path.stem, 'imported')}")
        lines.append("")
        statements = []
        for chain in chains:
            unit = chain[0][0]
            head = head_name[unit.index]
            if unit.op == "input":
                dims = " x ".join(str(d) for d in imp.layers[unit.members[0]].shape)
                lines.append(f"input {head}: {dims}")
                continue
            first_args = [ref(*r) for r in unit.refs] + _arguments(unit.op, unit.params)
            elements = [f"{unit.op}({', '.join(first_args)})"]
            for follower, word in chain[1:]:
                args = [] if word != follower.op else _arguments(follower.op, follower.params)
                elements.append(f"{word}({', '.join(args)})" if args else word)
            statements.append((unit.towered, head, elements))
        if self.presets:
            lines.append("")
            for word in self.presets:
                op = self.presets[word][0]
                lines.append(f"const {word} = {op}({', '.join(_arguments(op, preset_params[word]))})")
        lines.append("")
        open_towers = False
        for towered, head, elements in statements:
            if towered and not open_towers:
                lines.append(f"towers {', '.join(self.plan.devices)} {{")
                open_towers = True
            elif not towered and open_towers:
                lines.extend(["}", ""])
                open_towers = False
            indent = "    " if towered else ""
            line = f"{indent}{head} = {' | '.join(elements)}"
            if len(line) > 110 and len(elements) > 1:
                line = f"{indent}{head} = {elements[0]}" + "".join(f"\n{indent}    | {e}" for e in elements[1:])
            lines.append(line)
        if open_towers:
            lines.append("}")
        lines.append("")
        lines.append(f"output {', '.join(ref(*r) for r in self.output_refs)}")
        return "\n".join(lines) + "\n", weights

    def unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self.taken or not _is_name(candidate):
            n += 1
            candidate = f"{name}_{n}"
        self.taken.add(candidate)
        return candidate

    def chain_word(self, head: str, unit: _Unit, counts: Counter, is_output: bool, reserved: set[str]) -> str | None:
        """The word that continues a chain with `unit` (its layer type or a preset), or None when the
        unit starts a statement of its own (to keep its name)."""
        if unit.op in ("concat", "add", "input", "_bias"):
            return None

        def auto(word: str) -> str:
            return f"{head}.{word}" + (f"_{counts[word] + 1}" if counts[word] else "")

        if unit.name == auto(unit.op):
            return unit.op
        prefix = head + "."
        if unit.name.startswith(prefix):
            word = unit.name[len(prefix) :]
            stem = re.sub(r"_\d+\Z", "", word)
            for candidate in dict.fromkeys((word, stem)):
                if (
                    _is_name(candidate)
                    and not re.search(r"_\d+\Z", candidate)
                    and candidate not in OPS
                    and candidate not in reserved
                    and (candidate not in self.taken or candidate in self.presets)
                    and auto(candidate) == unit.name
                    and self.presets.get(candidate, (unit.op, _frozen(unit.params))) == (unit.op, _frozen(unit.params))
                ):
                    self.presets[candidate] = (unit.op, _frozen(unit.params))
                    self.taken.add(candidate)
                    return candidate
        if not _is_name(unit.name) and unit.op not in ("conv", "fc") and not is_output:
            return unit.op
        return None


def _sanitize_file(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._\-]", "_", name)[:100]


__all__ = ["CONST_OPS", "LAYER_OPS", "MIN_OPSET", "OnnxImport", "import_onnx", "import_to_files", "max_opset"]
