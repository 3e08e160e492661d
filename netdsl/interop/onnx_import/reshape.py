"""What a Reshape of the activations may be: the same shape (nothing), a flatten, or a part of ShuffleNet's
channel shuffle as exporters write it, three nodes on the activations:

    Reshape  N x C x H x W -> N x g x C/g x H x W       (x.view(N, g, C // g, H, W))
    Transpose perm [0, 2, 1, 3, 4]                      (.transpose(1, 2))
    Reshape  -> N x C x H x W                           (.view(N, -1, H, W))

read as one `shuffle(g)`. The pixels may be split otherwise (N x g x C/g x H*W with perm [0, 2, 1, 3]): the
transpose leaves them in order. The converter (convert.py) remembers the first two results, which only the next
node of the pattern may read, and adds the layer at the last Reshape; the shapes may hold the batch as a symbol
(Shape -> Gather -> Unsqueeze -> Concat), 0 (copied from the input) or -1, as netdsl's Reshape reads them.
"""

from __future__ import annotations

import math

from netdsl.interop.onnx_import.fold import BATCH


def reshaped(shape: tuple[int, ...], target: list[int], zero: bool, batch: int | None) -> tuple[int, ...] | None:
    """The per-image shape a Reshape of N x `shape` to `target` gives when it keeps the batch (as the symbol
    BATCH, 0 where `zero` copies it, -1, or `batch`, the inputs' fixed batch), else None."""
    if not target:
        return None
    size, first = math.prod(shape), target[0]
    rest = [shape[i] if d == 0 and zero and i < len(shape) else d for i, d in enumerate(target[1:])]
    fixed = all(d == -1 or d > 0 for d in rest) and rest.count(-1) <= 1
    if first == BATCH or (first == 0 and zero) or (batch is not None and first == batch):
        keeps_batch = fixed
    else:
        keeps_batch = first == -1 and fixed and -1 not in rest and math.prod(rest) == size
    known = math.prod(d for d in rest if d != -1) if fixed else 0
    if not (keeps_batch and known and size % known == 0):
        return None
    rest = [size // known if d == -1 else d for d in rest]
    return tuple(rest) if math.prod(rest) == size else None


def target_text(target: list[int]) -> str:
    """A Reshape's target shape for a message, the batch symbol as N: `[N, 2, 6, 5, 5]`."""
    return "[" + ", ".join("N" if d == BATCH else str(d) for d in target) + "]"


def shuffle_groups(shape: tuple[int, ...], grouped: tuple[int, ...]) -> int | None:
    """The groups g when the per-image `grouped` is a C x H x W `shape` seen as g x C/g x (the pixels, in
    order), else None."""
    if len(shape) != 3 or len(grouped) < 2:
        return None
    channels, height, width = shape
    split = grouped[0] * grouped[1] == channels and math.prod(grouped[2:]) == height * width
    return grouped[0] if split else None


def swaps_groups(perm: list[int], rank: int) -> bool:
    """Whether a Transpose's `perm` of a rank-`rank` tensor (batch included) swaps axes 1 and 2 and nothing else."""
    return perm == [0, 2, 1, *range(3, rank)]


def swapped(grouped: tuple[int, ...]) -> tuple[int, ...]:
    """The per-image shape after the transpose: C/g x g x (the pixels)."""
    return (grouped[1], grouped[0], *grouped[2:])


def reading(op: str) -> str:
    """Why a remembered tensor of the pattern cannot be read by anything but the pattern's next node."""
    return (
        f"a channel shuffle's {op} can be read only by the next node of the pattern Reshape [N, g, C/g, H, W] -> "
        "Transpose [0, 2, 1, 3, 4] -> Reshape [N, C, H, W] (netdsl reads the three as one shuffle layer)"
    )
