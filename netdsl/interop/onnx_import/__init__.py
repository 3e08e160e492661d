"""Import an ONNX model as a readable `.net` file and a safetensors file of its weights.

`import_onnx(path, towers=False)` returns an `OnnxImport`: the text of the `.net` file, its weights
named exactly as `netdsl.runtime.weights.weight_specs` names them for that net, and notes for the user
(`text, weights = import_onnx(path)` also works). `import_to_files(path, net_path, weights_path)`
writes both files, the weights with the preprocessing record a model from `netdsl export` carries
(netdsl/interop/onnx_metadata.py). docs/onnx.md lists the supported ops and how each attribute is mapped.

How a model becomes a net, one module per step:

1. read.py: the file is read and checked: a protobuf `ModelProto`, a supported opset, only supported
   ops (one error lists every unsupported node), `onnx.checker`, inputs N x C x H x W (or N x F)
   float32 with fixed C, H, W; patterns.py first rewrites subgraphs that exporters write for one layer
   (PyTorch's LocalResponseNorm) as that layer's node;
2. fold.py: constants are folded (initializers, Constant, ConstantOfShape, and a few ops on constants,
   with numpy: nothing from the file is executed); the batch size may flow through Shape -> Gather ->
   Unsqueeze -> Concat into a Reshape as a symbol;
3. convert.py: each node becomes a netdsl layer (layers.py; or an alias: Identity, Dropout, a Flatten
   before fc), shapes are worked out with netdsl's own rules (netdsl/ir/ops.py), padding is matched
   window for window (windows.py), a channel shuffle's Reshape -> Transpose -> Reshape is one layer
   (reshape.py);
4. clean_up.py: a constant Add after a conv/fc becomes its bias, MatMul + Add an fc, Flatten before fc
   disappears (fc flattens itself), identical weightless layers are merged, unused layers dropped;
5. towers.py: with `towers=True`, parallel copies of layers (what `netdsl export` writes for `towers`)
   or the groups of grouped convolutions become `towers` blocks, one tower per copy or group;
6. write.py: the layers are written as chains (`a = conv(...) | relu | maxpool(2)`) under readable names
   (names.py), and the text is built again with netdsl to check it and to name the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from netdsl.errors import NetError
from netdsl.files import refuse_overwriting, write_atomic
from netdsl.interop.onnx_import.clean_up import clean_up
from netdsl.interop.onnx_import.convert import convert
from netdsl.interop.onnx_import.layers import UNSUPPORTED_HINT
from netdsl.interop.onnx_import.names import BUILTINS, RESERVED
from netdsl.interop.onnx_import.read import CONST_OPS, LAYER_OPS, MIN_OPSET, max_opset, read_model, shown
from netdsl.interop.onnx_import.towers import tower_plan
from netdsl.interop.onnx_import.write import OnnxImport, write
from netdsl.interop.onnx_metadata import ReadPreprocess, check_preprocess


def import_onnx(
    path: str | os.PathLike,
    towers: bool = False,
    *,
    weights_name: str | None = None,
    read_preprocess: ReadPreprocess | None = None,
) -> OnnxImport:
    """Reads the ONNX model at `path`; returns the `.net` text and its weights. `weights_name` is only
    mentioned in the text's header comment. Raises `NetError` (where: the path) for every problem.

    `read_preprocess` (netdsl.train.augment.Preprocess.from_json, which this stage cannot import) checks the
    preprocessing record the model carries, if any: a damaged one, or one for other inputs, is an error."""
    path = Path(path)
    model = None
    try:
        model = read_model(path)
        net = convert(model, str(path))
        clean_up(net, towers)
        plan = tower_plan(net) if towers else None
        result = write(net, model, path, plan, weights_name)
        if read_preprocess is not None:
            check_preprocess(result.metadata, result.inputs, read_preprocess, str(path))
        return result
    except NetError as error:
        if error.span is None and error.where is None:  # every problem names the model
            error.where = str(path)
        if error.hint is None and model is not None:  # a node netdsl cannot express: say what it can
            error.hint = UNSUPPORTED_HINT
        raise
    except UnicodeDecodeError:  # protobuf decodes string fields when they are read
        raise NetError(
            "not a readable ONNX model: a name or string in it is not UTF-8 text",
            where=str(path),
            hint="the file may be damaged; export it again",
        ) from None
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as error:  # a model this importer missed
        raise NetError(
            f"internal error while importing: {type(error).__name__}: {shown(str(error), 200)}",
            where=str(path),
            hint="please report this model (netdsl --debug import ... shows where it happened)",
        ) from error


def import_to_files(
    path: str | os.PathLike,
    net_path: str | os.PathLike,
    weights_path: str | os.PathLike | None = None,
    towers: bool = False,
    *,
    read_preprocess: ReadPreprocess | None = None,
) -> OnnxImport:
    """Imports `path` and writes the `.net` file and the safetensors file (default: the `.net` path
    with the suffix `.safetensors`), the model's preprocessing record in the latter's metadata (checked
    first with `read_preprocess`, as for `import_onnx`). The weights are written first, each file atomically."""
    from netdsl.runtime.weights import save_weights

    net_path = Path(net_path)
    weights_path = Path(weights_path) if weights_path is not None else net_path.with_suffix(".safetensors")
    if net_path.resolve() == weights_path.resolve():
        raise NetError(
            "the .net file and the weights file must differ",
            where=str(net_path),
            hint="name two files, e.g. model.net and model.safetensors (the default for the weights)",
        )
    for target in (net_path, weights_path):
        refuse_overwriting(target, [path], str(target))
    for target in (net_path, weights_path):
        if target.is_dir():
            raise NetError(
                f"cannot write {target}: it is a folder", where=str(target), hint="name a file, not a folder"
            )
        if not target.parent.is_dir():
            raise NetError(
                f"cannot write {target}: no folder {target.parent}",
                where=str(target),
                hint=f"create the folder first (mkdir -p {target.parent}), or write somewhere else",
            )
    shown_name = weights_path.name if weights_path.parent.resolve() == net_path.parent.resolve() else str(weights_path)
    result = import_onnx(path, towers, weights_name=shown_name, read_preprocess=read_preprocess)
    save_weights(weights_path, result.weights, metadata=result.metadata)
    write_atomic(net_path, result.text)
    return result


__all__ = [
    "BUILTINS",
    "CONST_OPS",
    "LAYER_OPS",
    "MIN_OPSET",
    "RESERVED",
    "OnnxImport",
    "import_onnx",
    "import_to_files",
    "max_opset",
]
