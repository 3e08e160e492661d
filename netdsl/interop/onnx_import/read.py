"""Reading an ONNX file and checking it: a protobuf `ModelProto`, a supported opset, only supported ops (one
error lists every unsupported node), its external data, `onnx.checker`. Also the small readers the later steps
share: a node's attributes, a tensor as a numpy array, a name from the file made safe to print.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from netdsl.errors import NetError, os_hint
from netdsl.interop.onnx_import.patterns import fold_torch_lrn

MIN_OPSET = 7
_SHOWN = 12  # unsupported nodes listed before "and N more"

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


def max_opset() -> int:
    """The newest opset this importer reads: the newest the installed `onnx` package knows."""
    import onnx.defs

    return int(onnx.defs.onnx_opset_version())


def read_model(path: Path):
    """The checked `ModelProto` at `path`, with PyTorch's LRN subgraphs already one node each and its external
    data loaded."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise NetError("importing ONNX models needs onnx", where="import", hint="pip install 'netdsl[onnx]'") from None

    where = str(path)
    if not path.exists():
        raise NetError("ONNX file not found", where=where, hint="check the path; `netdsl export` writes ONNX files")
    if path.is_dir():
        raise NetError("the ONNX path is a folder, not a file", where=where, hint="name the .onnx file inside it")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise NetError(
            f"cannot read the ONNX file: {error.strerror or error}", where=where, hint=os_hint(error)
        ) from None
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


def opset_of(model) -> int | None:
    """The model's version of the default (ai.onnx) domain, None when it declares none."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return int(versions[0]) if versions else None


def _check_opset(model, where: str) -> None:
    newest = max_opset()
    supported = f"netdsl imports ONNX opsets {MIN_OPSET} to {newest}"
    opset = opset_of(model)
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
    name = shown(node.name)
    return f"node '{name}', #{index}" if name else f"node #{index}"


def node_where(node, index: int) -> str:
    """How errors name a node: its op, its name and its position in the file (`Conv node 'c1', #3`)."""
    return f"{node.op_type} {_node_text(node, index)}"


def shown(text: str, limit: int = 60) -> str:
    """A name from the file, safe to print: no control characters, not too long."""
    clean = "".join(c if c.isprintable() else "?" for c in str(text))
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _check_ops(model, where: str) -> None:
    bad = []
    for index, node in enumerate(model.graph.node):
        standard = node.domain in ("", "ai.onnx")
        if not standard or node.op_type not in SUPPORTED_OPS:
            op = node.op_type if standard else f"{node.domain}.{node.op_type}"
            bad.append(f"{shown(op, 40)} ({_node_text(node, index)})")
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
        reason = shown(lines[0] if lines else type(error).__name__, 300)
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
        location_shown = shown(location)
        try:
            missing = not (base / location).exists()
        except (OSError, ValueError):
            missing = False
        if missing:
            raise NetError(
                f"the external data file '{location_shown}' of tensor '{shown(tensor.name)}' is missing",
                where=str(path),
                hint=f"copy it next to the model, into {base}",
            )
        try:
            load_external_data_for_tensor(tensor, str(base))
        except (OSError, ValueError, RuntimeError, ValidationError) as error:
            reason = shown(str(error).splitlines()[0] if str(error) else type(error).__name__, 200)
            raise NetError(
                f"cannot read the external data '{location_shown}' of tensor '{shown(tensor.name)}': {reason}",
                where=str(path),
                hint=os_hint(error) if isinstance(error, OSError) else "the file may be truncated: copy it again",
            ) from None


def attributes(node, where: str) -> dict:
    """A node's attributes by name, as Python values (strings decoded); subgraphs are refused."""
    from onnx import AttributeProto, helper

    attrs = {}
    for attr in node.attribute:
        if attr.ref_attr_name:
            raise NetError(
                f"{where}: attribute `{attr.name}` refers to a function attribute",
                hint="inline the model's functions first: onnx.inliner.inline_local_functions(model)",
            )
        if attr.type == AttributeProto.GRAPH or attr.type == AttributeProto.GRAPHS:
            raise NetError(
                f"{where}: attribute `{attr.name}` holds a subgraph, which netdsl does not import",
                hint="export the model without control flow (If, Loop, Scan): docs/onnx.md, Not supported",
            )
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if attr.type in (AttributeProto.FLOAT, AttributeProto.FLOATS) and not np.isfinite(value).all():
            raise NetError(
                f"{where}: attribute `{attr.name}` is {value}, not a finite number",
                hint="check the hyperparameter the model was exported with, and export it again",
            )
        attrs[attr.name] = value
    return attrs


def to_array(tensor, where: str) -> np.ndarray:
    """A `TensorProto` of numbers as a numpy array."""
    from onnx import numpy_helper

    try:
        array = numpy_helper.to_array(tensor)
    except (ValueError, TypeError, RuntimeError, KeyError) as error:
        raise NetError(
            f"{where}: tensor '{shown(tensor.name)}' cannot be read ({shown(str(error), 200)})",
            hint="the tensor's data may be damaged or truncated: export the model again",
        ) from None
    if array.dtype == object or array.dtype.kind in "USO":
        raise NetError(
            f"{where}: tensor '{shown(tensor.name)}' holds strings, not numbers",
            hint="netdsl weights are numbers: export the model without its string tensors",
        )
    return array
