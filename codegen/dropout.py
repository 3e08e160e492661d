"""Inverted dropout with a counter-based random stream: nothing is stored between forward and backward.

Element i of a contiguous tensor is kept when `tl.rand(seed, offset + i) >= p` (Philox: the number is a pure
function of the seed and the counter, whatever the launch's tiling), and a kept value is scaled by 1 / (1 - p).
The backward applies the same mask and scale to the incoming gradient, so it is the same kernel run on the
gradient with the same (seed, offset): the mask is regenerated rather than saved.

`offset` lets several dropout layers (or the steps of a run) draw from one seed without sharing masks: give
each a counter range of its own, e.g. the running total of the element counts before it. p = 0 keeps every
value (an exact copy); p = 1 drops every value (all zeros: `tl.rand` is below 1).
The masks differ from PyTorch's (which draws from torch's generator); only their statistics agree.
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

import torch
import triton
import triton.language as tl


@triton.jit
def dropout_kernel(x_ptr, out_ptr, numel, seed, offset, p, scale, BLOCK: tl.constexpr):
    """Dropout of BLOCK elements of flat x: element i kept, times `scale`, where tl.rand(seed, offset + i) >= p,
    else 0. Grid: (cdiv(numel, BLOCK),)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    keep = tl.rand(seed, offset + offs) >= p
    tl.store(out_ptr + offs, tl.where(keep, x * scale, 0.0).to(out_ptr.dtype.element_ty), mask=mask)


BLOCK = 1024  # 4 warps: 8 elements a thread
# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size: few, big tiles.
INTERPRETER_BLOCK = 1 << 16

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_COUNTER = 1 << 63  # Philox takes 64-bit seeds and counters


def dropout(
    x: torch.Tensor,
    p: float,
    seed: int,
    offset: int = 0,
    *,
    out: torch.Tensor | None = None,
    kernel=None,
) -> torch.Tensor:
    """Training-time dropout of `x` (any shape; the mask follows its row-major element order): each value
    zeroed with probability `p`, the others scaled by 1 / (1 - p). The mask is a function of (seed,
    offset) alone. `out` (allocated when None) is a contiguous tensor like `x`, or `x` itself."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dropout supports {SUPPORTED_DTYPES}, got {x.dtype}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"the dropout rate must be in [0, 1], got {p}")
    if not (0 <= seed < MAX_COUNTER and offset >= 0 and offset + x.numel() <= MAX_COUNTER):
        raise ValueError(f"seed and offset + numel must be in [0, 2**63), got seed {seed}, offset {offset}")
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}, expected a contiguous "
            f"{tuple(x.shape)} {x.dtype} on {x.device}"
        )
    if x.numel() == 0:
        return out
    block = INTERPRETER_BLOCK if x.device.type == "cpu" else BLOCK
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    (kernel or dropout_kernel)[(triton.cdiv(x.numel(), block),)](
        x, out, x.numel(), seed, offset, float(p), scale, BLOCK=block, num_warps=4
    )
    return out


def dropout_backward(
    grad: torch.Tensor,
    p: float,
    seed: int,
    offset: int = 0,
    *,
    out: torch.Tensor | None = None,
    kernel=None,
) -> torch.Tensor:
    """The gradient of `dropout(x, p, seed, offset)` on x, given the gradient on its output: the forward's
    mask and scale applied to `grad`, regenerated from (seed, offset)."""
    return dropout(grad, p, seed, offset, out=out, kernel=kernel)
