"""The AlexNet paper's SGD step over every parameter at once: one launch over flat buffers, updated in place.

Weights, gradients and velocities are flat buffers, each parameter a segment of them at the same place. Per
element, with lr = base lr * the segment's lr_mult and decay = weight_decay * its decay_mult (Caffe's
multipliers; netdsl.train.optim.PaperSGD's parameter groups):

    v <- momentum * v - decay * lr * w - lr * g
    w <- w + v                                        (nesterov: w + momentum * v - lr * (g + decay * w))

The multipliers come from a small table of segments (where each starts, its lr_mult, its decay_mult), so a
schedule changing the base rate changes one scalar argument; a new rate scales new gradients only, as in the
paper (netdsl.train.optim explains how that differs from torch.optim.SGD). Each program updates BLOCK
consecutive elements; an element takes the multipliers of the last segment that starts at or before it.
Weights and velocities are fp32; gradients may be fp32, fp16 or bf16 (read as fp32).
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def paper_sgd_kernel(
    weight_ptr, grad_ptr, velocity_ptr,
    starts_ptr, lr_mults_ptr, decay_mults_ptr,
    numel, num_segments,
    lr, momentum, weight_decay,
    NESTEROV: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """The paper's SGD on BLOCK elements of the flat weight, gradient and velocity buffers, lr and weight_decay
    times the multipliers of each element's segment: v = momentum * v - weight_decay * lr * w - lr * g, then
    w += v (NESTEROV: the Nesterov step). Grid: (cdiv(numel, BLOCK),)."""
    block_start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = block_start + tl.arange(0, BLOCK)
    mask = offs < numel

    lr_mult = tl.zeros([BLOCK], tl.float32)
    decay_mult = tl.zeros([BLOCK], tl.float32)
    for segment in range(0, num_segments):
        start = tl.load(starts_ptr + segment)
        if start < block_start + BLOCK:  # starts ascend: a segment starting past the block covers none of it
            inside = offs >= start
            lr_mult = tl.where(inside, tl.load(lr_mults_ptr + segment), lr_mult)
            decay_mult = tl.where(inside, tl.load(decay_mults_ptr + segment), decay_mult)
    rate = lr * lr_mult
    decay = weight_decay * decay_mult

    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(velocity_ptr + offs, mask=mask, other=0.0)
    v = momentum * v - (decay * rate) * w - rate * g
    step = v
    if NESTEROV:
        step = momentum * v - rate * (g + decay * w)
    w = w + step
    tl.store(velocity_ptr + offs, v, mask=mask)
    tl.store(weight_ptr + offs, w, mask=mask)


BLOCK = 1024  # 4 warps: 8 elements a thread
# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size: few, big tiles.
INTERPRETER_BLOCK = 1 << 16

GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Segments:
    """Where each parameter lies in the flat buffers, and its multipliers, on the buffers' device."""

    starts: torch.Tensor  # int64 [S], ascending, the first 0
    lr_mults: torch.Tensor  # fp32 [S]
    decay_mults: torch.Tensor  # fp32 [S]
    numel: int  # the buffers' length: the sum of the sizes

    def __len__(self) -> int:
        return len(self.starts)


def segments(
    sizes: Sequence[int],
    lr_mults: Sequence[float],
    decay_mults: Sequence[float],
    device: torch.device | str = "cpu",
) -> Segments:
    """The table for parameters of `sizes` elements laid end to end, in that order, each with its lr_mult and
    decay_mult (one per parameter, or per group of consecutive parameters given as one size). Made once per
    layout: the base rate and weight decay are arguments of each step."""
    if not (len(sizes) == len(lr_mults) == len(decay_mults)) or not sizes:
        raise ValueError(
            f"segments need one size, lr_mult and decay_mult each per segment, got {len(sizes)} sizes, "
            f"{len(lr_mults)} lr_mults and {len(decay_mults)} decay_mults"
        )
    if any(size < 0 for size in sizes):
        raise ValueError(f"segment sizes must be >= 0, got {list(sizes)}")
    if any(not value >= 0 for value in [*lr_mults, *decay_mults]):
        raise ValueError("lr_mult and decay_mult must be numbers >= 0")
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    return Segments(
        starts=torch.tensor(starts, dtype=torch.int64, device=device),
        lr_mults=torch.tensor(lr_mults, dtype=torch.float32, device=device),
        decay_mults=torch.tensor(decay_mults, dtype=torch.float32, device=device),
        numel=sum(sizes),
    )


def paper_sgd_step(
    weights: torch.Tensor,
    grads: torch.Tensor,
    velocities: torch.Tensor,
    table: Segments,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0005,
    nesterov: bool = False,
    block: int | None = None,
    kernel=None,
) -> None:
    """One step of the paper's SGD on flat `weights` and `velocities` (fp32, updated in place) with the flat
    `grads` of the batch's loss; `table` (from `segments`) gives each parameter's multipliers. Velocities
    start as zeros. `block` overrides the elements per program."""
    for name, buffer in (("weights", weights), ("velocities", velocities)):
        if buffer.dtype != torch.float32:
            raise TypeError(f"paper_sgd_step keeps {name} in float32, got {buffer.dtype}")
    if grads.dtype not in GRAD_DTYPES:
        raise TypeError(f"paper_sgd_step takes gradients of {GRAD_DTYPES}, got {grads.dtype}")
    for name, buffer in (("weights", weights), ("grads", grads), ("velocities", velocities)):
        if buffer.dim() != 1 or not buffer.is_contiguous() or buffer.numel() != table.numel:
            raise ValueError(
                f"paper_sgd_step takes flat contiguous buffers of the table's {table.numel} elements, "
                f"got {name} of shape {tuple(buffer.shape)}"
            )
        if buffer.device != table.starts.device:
            raise ValueError(f"{name} is on {buffer.device}, the segment table on {table.starts.device}")
    if not lr > 0:
        raise ValueError(f"the learning rate must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"the momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"the weight decay must be >= 0, got {weight_decay}")
    if nesterov and momentum == 0:
        raise ValueError("Nesterov momentum needs a momentum above 0")
    if table.numel == 0:
        return
    block = block or (INTERPRETER_BLOCK if weights.device.type == "cpu" else BLOCK)
    (kernel or paper_sgd_kernel)[(triton.cdiv(table.numel, block),)](
        weights, grads, velocities,
        table.starts, table.lr_mults, table.decay_mults,
        table.numel, len(table),
        float(lr), float(momentum), float(weight_decay),
        NESTEROV=nesterov, BLOCK=block, num_warps=4,
    )  # fmt: skip
