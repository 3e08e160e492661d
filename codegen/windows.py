"""Sliding windows along one axis: where a conv's or a pool's windows sit, how many there are, and what an
average divides by. Plain integer arithmetic, shared by the shape rules (netdsl.ir.ops), the PyTorch reference,
the kernel launchers and ONNX import and export, so that all of them place every window alike.

Padding is `(top, left, bottom, right)`; a `.net` file may write it as n, (h, w), (top, left, bottom, right),
`valid`, or `same` / `same_lower`, which depend on the input's size. The rules are ONNX's (and onnxruntime's),
which for padding alike on both sides are also PyTorch's and Caffe's:

- a window of `kernel` taps `dilation` apart spans `dilation * (kernel - 1) + 1` positions; the windows start
  at `-begin`, `-begin + stride`, ...: floor((n + begin + end - span) / stride) + 1 of them, or with `ceil`
  the ceiling, less one if the last would then start in the end padding;
- `same` is TensorFlow's SAME and ONNX's SAME_UPPER: ceil(n / stride) windows, padded by
  max((out - 1) * stride + span - n, 0) in all, the odd one at the end; `same_lower` (ONNX's SAME_LOWER)
  puts the odd one at the beginning;
- an average divides by the taps inside the input (`count_pad` false) or inside the padded input
  [-begin, n + end) (`count_pad` true: the padding counts, the overhang of a ceil-mode window does not).
"""

from __future__ import annotations

from math import gcd

Pads = tuple[int, int, int, int]  # top, left, bottom, right
SAME_WORDS = ("same", "same_lower")


def same_padding(n: int, kernel: int, stride: int, dilation: int = 1, lower: bool = False) -> tuple[int, int]:
    """(begin, end) padding of TensorFlow's SAME (ONNX's SAME_UPPER), or of SAME_LOWER with `lower`."""
    span = dilation * (kernel - 1) + 1
    total = max((-(-n // stride) - 1) * stride + span - n, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if lower else (small, big)


def four_pads(pad, size=None, kernel=(1, 1), stride=(1, 1), dilation=(1, 1)) -> Pads:
    """`pad` (n, (h, w), (top, left, bottom, right), `valid`, `same` or `same_lower`) as (top, left, bottom,
    right). The `same` words need the input's `size` (h, w) and the window's `kernel`, `stride`, `dilation`."""
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0, 0, 0)
        if pad not in SAME_WORDS:
            raise ValueError(f"unknown padding {pad!r}")
        (top, bottom), (left, right) = (
            same_padding(n, k, s, d, lower=pad == "same_lower")
            for n, k, s, d in zip(size, kernel, stride, dilation, strict=True)
        )
        return (top, left, bottom, right)
    if isinstance(pad, int):
        return (pad, pad, pad, pad)
    if len(pad) == 2:
        return (int(pad[0]), int(pad[1]), int(pad[0]), int(pad[1]))
    if len(pad) == 4:
        return tuple(int(p) for p in pad)
    raise ValueError(f"padding must be n, (h, w) or (top, left, bottom, right), got {pad!r}")


def compact(pads: Pads) -> tuple[int, ...]:
    """(h, w) when each axis is padded alike at both ends, else (top, left, bottom, right)."""
    top, left, bottom, right = pads
    return (top, left) if (top, left) == (bottom, right) else tuple(pads)


def output_length(n: int, kernel: int, stride: int, begin: int, end: int, dilation: int = 1, ceil: bool = False) -> int:
    """Windows along an axis of `n` positions padded by `begin` and `end` (0 when not even one fits)."""
    room = n + begin + end - (dilation * (kernel - 1) + 1)
    if room < 0:
        return 0
    if not ceil:
        return room // stride + 1
    count = -(-room // stride) + 1
    if (count - 1) * stride >= n + begin:  # the last window must start inside the input or the begin padding
        count -= 1
    return count


def counted_taps(start: int, kernel: int, dilation: int, low: int, high: int) -> int:
    """How many of the taps start, start + dilation, ... (`kernel` of them) lie in [low, high)."""
    first = max(-(-(low - start) // dilation), 0)
    last = min(-(-(high - start) // dilation), kernel)
    return max(last - first, 0)


def divisors(n: int, kernel: int, stride: int, begin: int, end: int, dilation: int, count: int, count_pad: bool):
    """What each of the `count` windows of an average pool along one axis divides by (its counted taps)."""
    low, high = (-begin, n + end) if count_pad else (0, n)
    return [counted_taps(i * stride - begin, kernel, dilation, low, high) for i in range(count)]


def empty_window(n: int, kernel: int, stride: int, begin: int, dilation: int, count: int | None = None) -> int | None:
    """The first window along an axis that reads no input position (every tap in the padding), or None; of the
    `count` windows there are (`output_length`), or of as many as could start in the begin padding when None.

    With each pad below the kernel size only a window starting in the begin padding can be empty, and only
    when the taps step over the whole input (n < dilation); such windows repeat with period
    dilation / gcd(stride, dilation), so a few cover all of them."""
    if dilation <= n:
        return None
    starting_in_pad = -(-begin // stride)
    limit = min(starting_in_pad, dilation // gcd(stride, dilation))
    for i in range(limit if count is None else min(limit, count)):
        if counted_taps(i * stride - begin, kernel, dilation, 0, n) == 0:
            return i
    return None
