"""Softmax cross-entropy on logits [N, K]: each row's loss and the gradient on the logits in one kernel.

With label smoothing eps (PyTorch's `F.cross_entropy(label_smoothing=eps)`) the target of row n is
(1 - eps) * onehot(y_n) + eps / K, so with lse = log(sum_k exp(x_k)):

    loss_n = lse - (1 - eps) * x[y_n] - eps * mean_k(x_k)
    dloss / dx = (softmax(x) - (1 - eps) * onehot(y_n) - eps / K) / N     (for the batch mean of the losses)

Each program owns BLOCK_N rows and walks the classes in BLOCK_K chunks twice, as codegen/softmax.py does:
first an online max and sum of exp (and the sum of the logits), then the gradient written out. Any number of
classes works; math is fp32 whatever the storage dtype. The batch mean is a second, one-program launch that
adds the per-row losses in a fixed order, so the loss is the same bits on every run (no atomics).
A target outside [0, K) gives a NaN loss for its row rather than a read out of bounds.

A target may instead be a row of K weights t_n (a mixed batch's: lam * onehot(a) + (1 - lam) * onehot(b);
any row, as PyTorch's `F.cross_entropy` takes probabilities); smoothing then makes it
t' = (1 - eps) * t + eps / K, and

    loss_n = sum_k t'_k * (lse - x_k)
    dloss / dx = (softmax(x) * sum_k t'_k - t') / N

(`soft_cross_entropy_kernel`: the first walk also sums t, the second the loss beside the gradient).
"""

# ruff: noqa: N803  (Triton convention: sizes and constexprs are upper case)

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def cross_entropy_kernel(
    logits_ptr, target_ptr, loss_ptr, grad_ptr,
    N, K,
    stride_ln, stride_lk,
    stride_gn, stride_gk,
    smoothing, grad_scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """For BLOCK_N rows of logits [N, K], the label-smoothed cross entropy of each row and its gradient on the
    logits times grad_scale, BLOCK_K classes at a time. Grid: (cdiv(N, BLOCK_N),)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_starts = logits_ptr + offs_n.to(tl.int64) * stride_ln
    logit_rows = row_starts[:, None]
    grad_rows = grad_ptr + offs_n.to(tl.int64)[:, None] * stride_gn

    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    logit_sum = tl.zeros([BLOCK_N], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k[None, :] < K)
        x = tl.load(logit_rows + offs_k[None, :] * stride_lk, mask=mask, other=0.0).to(tl.float32)
        logit_sum += tl.sum(x, axis=1)
        # Padding is a huge finite negative, not -inf: a row of pure padding then gives exp(0), not NaN.
        x = tl.where(mask, x, -3.0e38)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
    log_sum_exp = running_max + tl.log(running_sum)

    target = tl.load(target_ptr + offs_n, mask=mask_n, other=0)
    target_ok = (target >= 0) & (target < K)
    target_logit = tl.load(row_starts + target * stride_lk, mask=mask_n & target_ok, other=float("nan")).to(tl.float32)
    loss = log_sum_exp - (1.0 - smoothing) * target_logit - smoothing * logit_sum / K
    tl.store(loss_ptr + offs_n, loss, mask=mask_n)

    inv_sum = 1.0 / running_sum
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k[None, :] < K)
        x = tl.load(logit_rows + offs_k[None, :] * stride_lk, mask=mask, other=float("-inf")).to(tl.float32)
        probability = tl.exp(x - running_max[:, None]) * inv_sum[:, None]
        wanted = tl.where(offs_k[None, :] == target[:, None], 1.0 - smoothing, 0.0) + smoothing / K
        grad = (probability - wanted) * grad_scale
        tl.store(grad_rows + offs_k[None, :] * stride_gk, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def soft_cross_entropy_kernel(
    logits_ptr, target_ptr, loss_ptr, grad_ptr,
    N, K,
    stride_ln, stride_lk,
    stride_tn, stride_tk,
    stride_gn, stride_gk,
    smoothing, grad_scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """As `cross_entropy_kernel`, against a row of K target weights (fp32) per row of logits."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    logit_rows = logits_ptr + offs_n.to(tl.int64)[:, None] * stride_ln
    target_rows = target_ptr + offs_n.to(tl.int64)[:, None] * stride_tn
    grad_rows = grad_ptr + offs_n.to(tl.int64)[:, None] * stride_gn

    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    target_sum = tl.zeros([BLOCK_N], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k[None, :] < K)
        x = tl.load(logit_rows + offs_k[None, :] * stride_lk, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x, -3.0e38)  # padding after the cast: fp16 holds no -3e38
        target_sum += tl.sum(tl.load(target_rows + offs_k[None, :] * stride_tk, mask=mask, other=0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
    log_sum_exp = running_max + tl.log(running_sum)
    wanted_sum = (1.0 - smoothing) * target_sum + smoothing

    inv_sum = 1.0 / running_sum
    loss = tl.zeros([BLOCK_N], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k[None, :] < K)
        # padding as in the first walk: its probability is 0 (1 in a row of pure padding, which is not stored)
        x = tl.load(logit_rows + offs_k[None, :] * stride_lk, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x, -3.0e38)
        target = tl.load(target_rows + offs_k[None, :] * stride_tk, mask=mask, other=0.0)
        wanted = tl.where(mask, (1.0 - smoothing) * target + smoothing / K, 0.0)
        loss += tl.sum(wanted * tl.where(mask, log_sum_exp[:, None] - x, 0.0), axis=1)
        probability = tl.exp(x - running_max[:, None]) * inv_sum[:, None]
        grad = (probability * wanted_sum[:, None] - wanted) * grad_scale
        tl.store(grad_rows + offs_k[None, :] * stride_gk, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + offs_n, loss, mask=mask_n)


@triton.jit
def fixed_order_mean_kernel(values_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """out[0] = mean(values[:N]) in one program: BLOCK running sums, then one tree sum, the same order every run."""
    partial = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        partial += tl.load(values_ptr + offs, mask=offs < N, other=0.0)
    tl.store(out_ptr, tl.sum(partial, axis=0) / N)


@dataclass(frozen=True)
class CrossEntropyConfig:
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int


# About 1024 to 4096 logits per tile: many rows of few classes (10 digits, 15 scenes, 100) or few rows of many
# (AlexNet's 1000); past 4096 classes a row loops over its chunks.
CONFIGS = [
    CrossEntropyConfig(BLOCK_N=64, BLOCK_K=16, num_warps=4),
    CrossEntropyConfig(BLOCK_N=16, BLOCK_K=128, num_warps=8),
    CrossEntropyConfig(BLOCK_N=2, BLOCK_K=1024, num_warps=4),
    CrossEntropyConfig(BLOCK_N=1, BLOCK_K=4096, num_warps=8),
]
# Under Triton's interpreter (CPU tensors) a program costs about the same whatever its size: few, big tiles.
INTERPRETER_CONFIG = CrossEntropyConfig(BLOCK_N=64, BLOCK_K=1024, num_warps=4)
MEAN_BLOCK = 1024

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pick_config(classes: int, on_cpu: bool = False) -> CrossEntropyConfig:
    """The smallest tile that holds a whole row of `classes` logits; the widest one (looping) past that."""
    if on_cpu:
        return INTERPRETER_CONFIG
    return next((config for config in CONFIGS if classes <= config.BLOCK_K), CONFIGS[-1])


class CrossEntropy(NamedTuple):
    loss: torch.Tensor  # fp32 scalar: the batch mean of `losses`
    losses: torch.Tensor  # fp32 [N]: each row's loss
    grad: torch.Tensor  # [N, K] in the logits' dtype: d loss / d logits


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    grad: torch.Tensor | None = None,
    config: CrossEntropyConfig | None = None,
    kernel=None,
    mean_kernel=None,
) -> CrossEntropy:
    """The mean softmax cross-entropy of `logits` [N, K] against class indices `target` [N] (integers) or
    target weights [N, K] (fp32, `soft_cross_entropy_kernel`), each row's loss, and the gradient of the mean on
    the logits, written into `grad` (allocated when None; any strided [N, K] view of the logits' dtype).
    `config` overrides `pick_config`; `kernel` and `mean_kernel` are copies of `cross_entropy_kernel` (or
    `soft_cross_entropy_kernel`) and `fixed_order_mean_kernel` to run instead."""
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"cross_entropy takes logits [N, K] with N, K >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"cross_entropy supports {SUPPORTED_DTYPES}, got {logits.dtype}")
    rows, classes = logits.shape
    soft = target.dtype == torch.float32 and target.shape == (rows, classes)
    hard = target.dtype in (torch.int32, torch.int64) and target.shape == (rows,)
    if not (soft or hard) or target.device != logits.device:
        raise ValueError(
            f"target must be class indices (int32 or int64) of shape ({rows},) or fp32 weights of shape "
            f"({rows}, {classes}) on {logits.device}, got {target.dtype} {tuple(target.shape)} on {target.device}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if grad is None:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    elif grad.shape != logits.shape or grad.dtype != logits.dtype or grad.device != logits.device:
        raise ValueError(
            f"grad is {tuple(grad.shape)} {grad.dtype} on {grad.device}, "
            f"expected {tuple(logits.shape)} {logits.dtype} on {logits.device}"
        )
    target = target.contiguous()
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    loss = torch.empty((), dtype=torch.float32, device=logits.device)

    config = config or pick_config(classes, on_cpu=logits.device.type == "cpu")
    target_strides = (target.stride(0), target.stride(1)) if soft else ()
    (kernel or (soft_cross_entropy_kernel if soft else cross_entropy_kernel))[(triton.cdiv(rows, config.BLOCK_N),)](
        logits, target, losses, grad,
        rows, classes,
        logits.stride(0), logits.stride(1),
        *target_strides,
        grad.stride(0), grad.stride(1),
        float(label_smoothing), 1.0 / rows,
        BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K,
        num_warps=config.num_warps,
    )  # fmt: skip
    (mean_kernel or fixed_order_mean_kernel)[(1,)](losses, loss, rows, BLOCK=MEAN_BLOCK, num_warps=4)
    return CrossEntropy(loss, losses, grad)
