"""Backward of the elementwise layers (codegen/elementwise.py) that are not folded into another kernel.

    ReLU:        dx = dy where saved > 0, else 0
    leaky ReLU:  dx = dy where saved > 0, else slope * dy

`saved` is the activation's output or its input: with a slope >= 0 both are positive at the same places (so
the backward never needs the input kept for it: the output is usually kept anyway, as the next layer's input).
A ReLU that follows a conv or an fc is differentiated inside their backward kernels (conv_backward.py,
fc_backward.py: the mask applied to the tile they read); this kernel is for the others (a standalone
activation, the ReLU of a residual join).

What needs no kernel:
- `copy` and `add`: the gradient of x + y is the incoming gradient for x and for y, as is (the same buffer, no
  copy); with a fused activation, `activation_backward` once, then that result for both;
- `concat`: each input's gradient is its channel slice of the incoming gradient (a view);
- a map read by two layers gets the sum of their gradients: `elementwise.add` (fp32 sum, rounded once).
Batch norm is batchnorm_train.py's.

One program instance per BLOCK elements; any strides, each tensor's own, walked in the order of the written
gradient's memory (NCHW or channels-last alike, coalesced). Computed in fp32, rounded once to the dtype.
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("relu", "leaky_relu")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONFIG = {"BLOCK": 1024, "num_warps": 4}  # 8 elements a thread
# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size.
INTERPRETER_CONFIG = {"BLOCK": 8192, "num_warps": 4}


@triton.jit
def activation_backward_kernel(
    grad_out_ptr, saved_ptr, grad_x_ptr,
    D1, D2, D3, total,  # the sizes of axes 1..3 (axis 0's is total / (D1 * D2 * D3)), in the walking order
    stride_g0, stride_g1, stride_g2, stride_g3,
    stride_s0, stride_s1, stride_s2, stride_s3,
    stride_dx0, stride_dx1, stride_dx2, stride_dx3,
    slope,
    ACTIVATION: tl.constexpr,  # "relu" or "leaky_relu"
    BLOCK: tl.constexpr,
):  # fmt: skip
    """dx = dy where the saved output is positive, else 0 (relu) or dy * slope (leaky_relu), for BLOCK elements
    of the four-axis walk. Grid: (cdiv(total, BLOCK),)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    i3 = offs % D3
    rest = offs // D3
    i2 = rest % D2
    rest = rest // D2
    i1 = rest % D1
    i0 = (rest // D1).to(tl.int64)

    dy = tl.load(grad_out_ptr + i0 * stride_g0 + i1 * stride_g1 + i2 * stride_g2 + i3 * stride_g3, mask=mask, other=0.0)
    saved = tl.load(saved_ptr + i0 * stride_s0 + i1 * stride_s1 + i2 * stride_s2 + i3 * stride_s3, mask=mask, other=0.0)
    # Compared in fp32: Triton's interpreter compares bf16 as its raw bits, negatives above zero.
    positive = saved.to(tl.float32) > 0
    dy = dy.to(tl.float32)
    if ACTIVATION == "relu":
        dx = tl.where(positive, dy, 0.0)
    elif ACTIVATION == "leaky_relu":
        dx = tl.where(positive, dy, dy * slope)
    grad_x_ptrs = grad_x_ptr + i0 * stride_dx0 + i1 * stride_dx1 + i2 * stride_dx2 + i3 * stride_dx3
    tl.store(grad_x_ptrs, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)


def activation_backward(
    grad_out: torch.Tensor,
    saved: torch.Tensor,
    activation: str = "relu",
    slope: float = 0.01,
    grad_input: torch.Tensor | None = None,
    *,
    config: dict | None = None,
    kernel=None,
) -> torch.Tensor:
    """The gradient at the input of `activation` (ReLU or leaky ReLU of `slope`), given `grad_out`, the gradient at
    its output, and `saved`, its output or its input (same shape, any dtype of the three). `grad_input` (grad_out's
    shape and dtype, any strides; may be grad_out itself) by default is laid out as grad_out. `config`
    ({"BLOCK", "num_warps"}) overrides the default; `kernel`: a generated copy to run instead."""
    grad_input, grid, arguments = activation_backward_launch(grad_out, saved, activation, slope, grad_input, config)
    if arguments["total"] > 0:
        (kernel or activation_backward_kernel)[grid](**arguments)
    return grad_input


def activation_backward_launch(
    grad_out: torch.Tensor,
    saved: torch.Tensor,
    activation: str = "relu",
    slope: float = 0.01,
    grad_input: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, tuple[int], dict[str, Any]]:
    """Everything `activation_backward` does but the launch: checks, allocates the gradient and returns it with the
    grid and the kernel's keyword arguments (launch options included). Works on "meta" tensors."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation backward: activation must be one of {ACTIVATIONS}, got {activation!r} "
                         "(no activation: the gradient passes as is)")  # fmt: skip
    if activation == "leaky_relu" and slope < 0:
        raise ValueError(f"leaky ReLU backward needs a slope >= 0 (so the output's sign is the input's), got {slope}")
    if not 1 <= grad_out.dim() <= 4:
        raise ValueError(f"activation backward takes tensors of 1 to 4 axes, got shape {tuple(grad_out.shape)}")
    for name, tensor in (("grad_out", grad_out), ("saved", saved)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"activation backward supports {SUPPORTED_DTYPES}, got {name} in {tensor.dtype}")
    if saved.shape != grad_out.shape or saved.device != grad_out.device:
        raise ValueError(f"activation backward: saved is {tuple(saved.shape)} on {saved.device}, expected "
                         f"{tuple(grad_out.shape)} on {grad_out.device}")  # fmt: skip
    if grad_input is None:
        grad_input = torch.empty_like(grad_out)  # grad_out's layout, when it is dense
    if grad_input.shape != grad_out.shape or grad_input.dtype != grad_out.dtype or grad_input.device != grad_out.device:
        raise ValueError(f"activation backward: grad_input is {grad_input.dtype} {tuple(grad_input.shape)}, expected "
                         f"{grad_out.dtype} {tuple(grad_out.shape)} on {grad_out.device}")  # fmt: skip
    total = grad_out.numel()
    if total >= 2**31:
        raise ValueError(f"activation backward indexes {total} elements with 32 bits: at most 2**31 - 1")

    # Four axes (size-1 axes appended), ordered as grad_input's memory runs: outermost first.
    grad_out4, saved4, grad_input4 = (t[(..., *[None] * (4 - t.dim()))] for t in (grad_out, saved, grad_input))
    order = sorted(range(4), key=lambda axis: -grad_input4.stride(axis))
    sizes = [grad_input4.shape[axis] for axis in order]
    arguments = {
        "grad_out_ptr": grad_out, "saved_ptr": saved, "grad_x_ptr": grad_input,
        "D1": sizes[1], "D2": sizes[2], "D3": sizes[3], "total": total,
        **_strides("g", grad_out4, order), **_strides("s", saved4, order), **_strides("dx", grad_input4, order),
        "slope": float(slope) if activation == "leaky_relu" else 0.0,
        "ACTIVATION": activation,
        **(config or (INTERPRETER_CONFIG if grad_out.device.type == "cpu" else CONFIG)),
    }  # fmt: skip
    arguments = {"num_warps": 4, **arguments}
    return grad_input, (triton.cdiv(total, arguments["BLOCK"]),), arguments


def _strides(prefix: str, tensor: torch.Tensor, order: list[int]) -> dict[str, int]:
    return {f"stride_{prefix}{i}": tensor.stride(axis) for i, axis in enumerate(order)}
