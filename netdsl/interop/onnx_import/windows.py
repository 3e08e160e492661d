"""Padding matched window for window: netdsl pads both sides of a conv or pooling window alike, ONNX may pad each
side differently (or by `auto_pad`). An ONNX window becomes netdsl's when both give the same windows at the same
places; otherwise the model is refused.
"""

from __future__ import annotations

from netdsl.errors import NetError
from netdsl.interop.onnx_import.read import shown
from netdsl.ir.ops import window_out


def netdsl_window(
    file: str, where: str, op: str, attrs: dict, size, kernel, stride, dilation, ceil_mode: bool, count_pad=None
) -> tuple[tuple[int, int], bool]:
    """netdsl's (pad, ceil) for the window of node `where` (a netdsl `op`: conv, maxpool or avgpool) over an
    input of `size` (h, w): the same windows at the same places, or an error (about `file`).
    netdsl pads both sides alike; an ONNX padding that differs at the end is accepted when the
    extra padding is never read (or, for pooling, when ceil=true reproduces it exactly)."""
    auto = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto == "NOTSET":
        pads = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))]
        if len(pads) != 4:
            raise NetError(f"{where}: pads has {len(pads)} values; netdsl layers are 2-D (4 pads)", where=file)
        if min(pads) < 0:
            raise NetError(f"{where}: negative pads {pads} are not supported", where=file)
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
        raise NetError(f"{where}: unknown auto_pad `{shown(auto)}`", where=file)
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
    sides = [pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]]
    raise NetError(
        f"{where}: padding {sides} (top, left, bottom, right) cannot be written in netdsl, which pads both "
        "sides alike",
        where=file,
        hint="re-export the model with symmetric padding",
    )


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


