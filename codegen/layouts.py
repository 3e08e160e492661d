"""Memory layouts of feature maps: NCHW, or channels-last ("nhwc": N x C x H x W tensors whose channels
are adjacent in memory). Every kernel takes explicit strides, so a layout is only how a tensor is made."""

import torch

LAYOUTS = ("nchw", "nhwc")


def to_layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """`tensor` (N x C x H x W, or anything else, which stays as it is) laid out as `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if tensor.dim() != 4:
        return tensor.contiguous()
    memory = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    return tensor.contiguous(memory_format=memory)


def view_as_layout(flat: torch.Tensor, batch: int, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """A [batch, *shape] view of the 1-D `flat`, with its elements in `layout` order."""
    if layout == "nhwc" and len(shape) == 3:
        channels, height, width = shape
        return flat.view(batch, height, width, channels).permute(0, 3, 1, 2)
    return flat.view(batch, *shape)
