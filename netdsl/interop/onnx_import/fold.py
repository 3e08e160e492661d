"""Constants folded with numpy: initializers and Constant nodes are read, and the few ops that exporters apply to
constants (shape arithmetic, reshaped or transposed weights, normalization constants) are computed here, so that
every weight a layer reads is one array. Nothing from the file is executed.

The batch size is not known while folding: `Shape` of an activation gives `BATCH` for it, a symbol that may flow
through Gather -> Unsqueeze -> Concat into a Reshape's target shape, and nowhere else.
"""

from __future__ import annotations

import math

import numpy as np

from netdsl.errors import NetError
from netdsl.interop.onnx_import.read import CONST_OPS, shown, to_array

MAX_FOLDED = 1 << 26  # elements of a folded constant
BATCH = np.int64(-(2**62) + 12345)  # the batch size while folding Shape -> ... -> Reshape
FOLDABLE = frozenset(CONST_OPS) | {"Reshape", "Concat", "Add", "Sum", "Identity", "Dropout", "Flatten", "Squeeze"}
_SYMBOLIC_OK = frozenset({"Gather", "Unsqueeze", "Squeeze", "Concat", "Identity", "Cast"})
# Hints of the errors below (docs/onnx.md, Supported ops, lists what is folded).
_BATCH_HINT = (
    "the batch size may reach only a Reshape (Shape -> Gather -> Unsqueeze -> Concat -> Reshape): "
    "export e.g. x.flatten(1), or with a fixed batch size"
)
_TOO_MANY = f"netdsl folds constants of up to {MAX_FOLDED} values; the model may be damaged: export it again"
_DAMAGED = "the model's constants do not fit together: check it with onnx.checker, or export it again"


def fold(op: str, attrs: dict, values: list, symbolic: bool, where: str, file: str) -> tuple[np.ndarray, bool]:
    """The value of node `where` (an `op` in FOLDABLE) whose inputs are the constants `values` (None for an
    omitted input), and whether that value holds the batch size. `symbolic`: some input holds it."""
    if symbolic and op not in _SYMBOLIC_OK:
        raise NetError(
            f"{where}: computes with the batch size, which netdsl nets do not fix", where=file, hint=_BATCH_HINT
        )
    try:
        result = _fold_op(op, attrs, values, where, file)
    except (ValueError, TypeError, IndexError, KeyError, ArithmeticError, MemoryError) as error:
        raise NetError(
            f"{where}: cannot fold this constant ({shown(str(error), 200)})", where=file, hint=_DAMAGED
        ) from None
    result = np.asarray(result)
    if symbolic and result.dtype.kind != "i":
        raise NetError(
            f"{where}: computes with the batch size, which netdsl nets do not fix", where=file, hint=_BATCH_HINT
        )
    if result.size > MAX_FOLDED:
        raise NetError(
            f"{where}: the folded constant would have {result.size} values, too many", where=file, hint=_TOO_MANY
        )
    return result, bool(symbolic and result.dtype.kind == "i" and np.any(result == BATCH))


def _fold_op(op: str, attrs: dict, v: list, where: str, file: str):
    from onnx import helper, numpy_helper

    if op == "Constant":
        return _constant(attrs, where, file)
    if op == "ConstantOfShape":
        shape = [int(d) for d in np.asarray(v[0]).reshape(-1)]
        if any(d < 0 for d in shape) or math.prod(shape) > MAX_FOLDED:
            hint = "a shape's sizes are 0 or more" if any(d < 0 for d in shape) else _TOO_MANY
            raise NetError(f"{where}: cannot make a constant of shape {shape}", where=file, hint=hint)
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
    if op in ("Add", "Sum", "Sub", "Mul", "Div"):  # sized before computing: two small constants can broadcast
        shapes = [x.shape for x in v if x is not None]
        try:  # into a huge one
            size = math.prod(np.broadcast_shapes(*shapes))
        except ValueError:
            raise NetError(
                f"{where}: the shapes {[list(s) for s in shapes]} do not broadcast", where=file, hint=_DAMAGED
            ) from None
        if size > MAX_FOLDED:
            raise NetError(
                f"{where}: the folded constant would have {size} values, too many", where=file, hint=_TOO_MANY
            )
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
    raise NetError(f"{where}: {op} cannot be folded", where=file, hint=_DAMAGED)  # pragma: no cover - FOLDABLE: above


def _constant(attrs: dict, where: str, file: str) -> np.ndarray:
    if "value" in attrs:
        return to_array(attrs["value"], where)
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    if "sparse_value" in attrs:
        raise NetError(
            f"{where}: sparse constants are not supported", where=file, hint="store the constant dense, as `value`"
        )
    raise NetError(
        f"{where}: a constant of strings is not supported (netdsl weights are numbers)",
        where=file,
        hint="export the model without its string constants (labels, for instance, belong outside the net)",
    )
