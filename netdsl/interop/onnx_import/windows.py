"""Padding, window for window: ONNX's `pads` (or `auto_pad`) as netdsl's `pad`. netdsl places windows by ONNX's
own rules (netdsl/codegen/windows.py), so every ONNX padding has a netdsl form; the shortest that gives the
same windows at the same places is written.
"""

from __future__ import annotations

from netdsl.codegen.windows import divisors, output_length, same_padding
from netdsl.errors import NetError, did_you_mean
from netdsl.interop.onnx_import.read import shown

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")
NOT_2D_HINT = "netdsl imports 2-D layers only: 1-D and 3-D ones are not supported (docs/onnx.md, Not supported)"


def netdsl_window(
    file: str, where: str, op: str, attrs: dict, size, kernel, stride, dilation, ceil_mode: bool, count_pad=None
) -> tuple[tuple[int, ...], bool]:
    """netdsl's (pad, ceil) for the window of node `where` (a netdsl `op`: conv, maxpool or avgpool) over an
    input of `size` (h, w), or an error (about `file`). `pad` is (h, w) where both ends of each axis are padded
    alike, or where the extra end padding is never read (nor, for an average counting its padding, counted);
    (top, left, bottom, right) otherwise."""
    auto = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto == "NOTSET":
        pads = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))]
        if len(pads) != 4:
            raise NetError(
                f"{where}: pads has {len(pads)} values; netdsl layers are 2-D (4 pads)", where=file, hint=NOT_2D_HINT
            )
        if min(pads) < 0:
            raise NetError(
                f"{where}: negative pads {pads} are not supported",
                where=file,
                hint="negative pads crop the input, which netdsl layers do not: export the model without cropping",
            )
        pairs = [(pads[0], pads[2]), (pads[1], pads[3])]
    elif auto == "VALID":
        pairs = [(0, 0), (0, 0)]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pairs = same_pairs(file, where, auto, size, kernel, stride, dilation)
        ceil_mode = False  # SAME fixes the output at ceil(n / stride), which these pads give by the floor rule
    else:
        hint = did_you_mean(auto, AUTO_PADS) or f"auto_pad is one of {', '.join(AUTO_PADS)}"
        raise NetError(f"{where}: unknown auto_pad `{shown(auto)}`", where=file, hint=hint)
    ceil = ceil_mode and op != "conv"
    axes = list(zip(size, kernel, stride, dilation, pairs))
    if all(_begin_alike(n, k, s, d, begin, end, ceil, count_pad) for n, k, s, d, (begin, end) in axes):
        return (pairs[0][0], pairs[1][0]), ceil
    return (pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]), ceil


def _begin_alike(n, k, s, d, begin, end, ceil, count_pad) -> bool:
    """Whether padding `begin` at both ends gives the windows of (`begin`, `end`): as many, at the same places,
    and for an average counting its padding, each dividing by as much."""
    count = output_length(n, k, s, begin, end, d, ceil)
    if end == begin or count < 1 or output_length(n, k, s, begin, begin, d, ceil) != count:
        return end == begin
    if count_pad:
        return divisors(n, k, s, begin, begin, d, count, True) == divisors(n, k, s, begin, end, d, count, True)
    return True


def same_pairs(file: str, where: str, auto: str, size, kernel, stride, dilation) -> list[tuple[int, int]]:
    """The (begin, end) padding of `auto_pad` SAME_UPPER or SAME_LOWER along each axis of `size`. Where ONNX's
    formula gives less than none (a stride past the window, ceil(n / stride) windows needing fewer than n
    positions), ONNX leaves the meaning open: onnxruntime refuses the node and onnx.reference crops the input;
    netdsl refuses it too, rather than choose."""
    for axis, n, k, s, d in zip(("rows", "columns"), size, kernel, stride, dilation):
        needed = (-(-n // s) - 1) * s + d * (k - 1) + 1 - n
        if needed < 0:
            raise NetError(
                f"{where}: auto_pad {auto} over {n} {axis} with stride {s} and a window of {d * (k - 1) + 1} gives "
                f"negative padding ({needed}), which ONNX leaves undefined (onnxruntime refuses it)",
                where=file,
                hint="write the padding as explicit pads (TensorFlow's SAME pads 0 here)",
            )
    return [same_padding(n, k, s, d, auto == "SAME_LOWER") for n, k, s, d in zip(size, kernel, stride, dilation)]
