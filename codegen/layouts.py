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


def stride_arguments(prefix: str, tensor: torch.Tensor, axes: str = "nchw") -> dict[str, int]:
    """A kernel's stride arguments for `tensor`, one per axis: {"stride_<prefix><axis>": stride}."""
    return {f"stride_{prefix}{axis}": step for axis, step in zip(axes, tensor.stride(), strict=True)}


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether channels are `t`'s innermost axis (N x C x H x W), so a kernel walking it should step channel fastest.
    A map of one pixel (N x C x 1 x 1, a global pool's) is both layouts at once: taken as NCHW."""
    return t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1 and t.stride(1) == 1


def empty_like_layout(t: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of `shape` laid out as `t` is: channels-last when t is, else contiguous NCHW."""
    memory_format = torch.channels_last if is_channels_last(t) else torch.contiguous_format
    return torch.empty(tuple(shape), dtype=dtype, device=t.device, memory_format=memory_format)
