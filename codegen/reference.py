"""Reference implementations of every op kind with PyTorch ops: what a layer means, independent of the
generated kernels. Used by generated files to check themselves, by the torch backend, and (with
`training=True`, under autograd) by the trainable module `netdsl.runtime.module.GraphModule`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .windows import divisors, four_pads, output_length


def lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """The paper's LRN: x / (k + alpha * sum of x^2 over `size` channels around c) ^ beta, clipped at the
    edges; the window is c - (size-1)//2 .. c + size//2. Computed in fp32 (at least), as the kernels do,
    and rounded once to the input's dtype (PyTorch has no 16-bit avg_pool3d on the CPU)."""
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    squares = F.pad(wide.pow(2).unsqueeze(1), (0, 0, 0, 0, (size - 1) // 2, size // 2))
    window_sum = F.avg_pool3d(squares, (size, 1, 1), stride=1).squeeze(1) * size
    return (wide / (k + alpha * window_sum).pow(beta)).to(x.dtype)


def _join(inputs: list[torch.Tensor]) -> torch.Tensor:
    if len(inputs) == 1:
        return inputs[0]
    if inputs[0].dim() == 2:
        return torch.cat([x.flatten(1) for x in inputs], dim=1)
    return torch.cat(inputs, dim=1)


def apply(
    op: str, params: dict, inputs: list[torch.Tensor], weights: dict[str, torch.Tensor], training: bool = False
) -> torch.Tensor:
    """One layer on a batch. Several inputs to a one-input op are joined on channels.

    `training=False` is inference, what `netdsl run` computes: dropout is the identity, batch norm uses its
    running statistics. `training=True` is a training step: dropout zeroes each value with probability
    `rate` and scales the others by 1 / (1 - rate) (PyTorch's inverted dropout, its masks drawn from
    torch's generator), batch norm normalizes with the batch's mean and biased variance and updates the
    running ones in place, `running = (1 - momentum) * running + momentum * batch` (the unbiased variance)."""
    if op == "add":
        return torch.stack(inputs).sum(0)
    if op == "concat":
        return _join(inputs)
    x = _join(inputs) if op != "fc" else torch.cat([t.flatten(1) for t in inputs], dim=1)
    if op == "conv":
        top, left, bottom, right = _pads(params, x)
        if (top, left) != (bottom, right):  # PyTorch pads both ends alike: pad the input first
            x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
        return F.conv2d(
            x,
            weights["weight"],
            weights.get("bias"),
            params["stride"],
            (top, left),
            params["dilation"],
            params["groups"],
        )
    if op == "fc":
        return F.linear(x, weights["weight"], weights.get("bias"))
    if op == "relu":
        return F.relu(x)
    if op == "leaky_relu":
        return F.leaky_relu(x, params["slope"])
    if op == "lrn":
        groups = x.chunk(params.get("groups", 1), dim=1)  # each group normalized apart, as one tower was
        return torch.cat([lrn(g, params["size"], params["alpha"], params["beta"], params["k"]) for g in groups], dim=1)
    if op in ("maxpool", "avgpool"):
        return pool(x, op, params)
    if op == "global_avgpool":
        return x.mean(dim=(2, 3), keepdim=True)
    if op == "dropout":
        return F.dropout(x, params["rate"], training=True) if training else x
    if op == "softmax":
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # float64 stays float64
        return torch.softmax(wide, dim=1).to(x.dtype)
    if op == "batchnorm" and not training:
        # the running statistics folded into a scale and shift, as the kernels fold them; not F.batch_norm, which
        # torch 2.11 refuses for eps = 0 (an imported per-channel Mul and Add is a batchnorm of eps 0)
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = weights["weight"].to(wide) * torch.rsqrt(weights["running_var"].to(wide) + params["eps"])
        shift = weights["bias"].to(wide) - weights["running_mean"].to(wide) * scale
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        return (x.to(wide) * scale.view(per_channel) + shift.view(per_channel)).to(x.dtype)
    if op == "batchnorm":
        return F.batch_norm(
            x,
            weights["running_mean"],
            weights["running_var"],
            weights["weight"],
            weights["bias"],
            training=training,
            momentum=params["momentum"],
            eps=params["eps"],
        )
    if op == "flatten":
        return x.flatten(1)
    if op == "shuffle":
        return shuffle(x, params["groups"])
    if op == "space_to_depth":  # not a layer of the language: the compiler's rewrite of a strided conv
        return space_to_depth(x, params["block"], params["pad"], params["size"], params["groups"])
    raise ValueError(f"no reference for op {op!r}")


def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: the channels seen as groups x C/groups, transposed to C/groups x groups."""
    return x.unflatten(1, (groups, x.shape[1] // groups)).transpose(1, 2).flatten(1, 2)


def space_to_depth(
    x: torch.Tensor, block: tuple[int, int], pad: tuple[int, int], size: tuple[int, int], groups: int
) -> torch.Tensor:
    """`x` cut into `size` blocks of `block` pixels, the first block's corner at (-top, -left): block channel
    ((g * sh + dy) * sw + dx) * C/groups + c holds pixel (dy, dx) of channel g * C/groups + c
    (codegen/space_to_depth.py)."""
    (sh, sw), (top, left), (rows, cols) = block, pad, size
    n, c, h, w = x.shape
    padded = F.pad(x, (left, cols * sw - w - left, top, rows * sh - h - top))  # a negative end crops
    blocks = padded.reshape(n, groups, c // groups, rows, sh, cols, sw).permute(0, 1, 4, 6, 2, 3, 5)
    return blocks.reshape(n, c * sh * sw, rows, cols)


def _pads(params: dict, x: torch.Tensor) -> tuple[int, int, int, int]:
    """A conv's or pool's (top, left, bottom, right) padding of `x`."""
    size = (x.shape[2], x.shape[3])
    return four_pads(params["pad"], size, params["size"], params["stride"], params.get("dilation", (1, 1)))


def pool(x: torch.Tensor, op: str, params: dict) -> torch.Tensor:
    """Max or average pooling with netdsl's windows (codegen/windows.py). What PyTorch's pooling can express
    (each axis padded alike, at most half the window; an average without dilation) goes to it; otherwise
    the input is padded explicitly (-inf for a max, zeros for an average) out to the last window's reach,
    and an average divides each window's sum by the taps it counts."""
    size, stride, dilation, ceil = params["size"], params["stride"], params.get("dilation", (1, 1)), params["ceil"]
    top, left, bottom, right = _pads(params, x)
    by_torch = (top, left) == (bottom, right) and 2 * top <= size[0] and 2 * left <= size[1]
    if op == "maxpool" and by_torch:
        return F.max_pool2d(x, size, stride, (top, left), dilation, ceil_mode=ceil)
    if op == "avgpool" and by_torch and dilation == (1, 1):
        return F.avg_pool2d(x, size, stride, (top, left), ceil_mode=ceil, count_include_pad=params["count_pad"])
    n_h, n_w = x.shape[2], x.shape[3]
    out_h = output_length(n_h, size[0], stride[0], top, bottom, dilation[0], ceil)
    out_w = output_length(n_w, size[1], stride[1], left, right, dilation[1], ceil)
    # Rows and columns up to the last window's reach: the padding, and a ceil-mode window's overhang past it.
    reach_h = (out_h - 1) * stride[0] + dilation[0] * (size[0] - 1) + 1
    reach_w = (out_w - 1) * stride[1] + dilation[1] * (size[1] - 1) + 1
    extent = (left, max(reach_w - n_w - left, right), top, max(reach_h - n_h - top, bottom))
    if op == "maxpool":
        padded = F.pad(x, extent, value=float("-inf"))
        return F.max_pool2d(padded, size, stride, 0, dilation)[:, :, :out_h, :out_w]
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # sums in fp32 (at least), as the kernel
    padded = F.pad(wide, extent)
    total = 0
    for kh in range(size[0]):
        rows = slice(kh * dilation[0], kh * dilation[0] + (out_h - 1) * stride[0] + 1, stride[0])
        for kw in range(size[1]):
            cols = slice(kw * dilation[1], kw * dilation[1] + (out_w - 1) * stride[1] + 1, stride[1])
            total = total + padded[:, :, rows, cols]  # the tap (kh, kw) of every window
    count_pad = params["count_pad"]
    per_row = divisors(n_h, size[0], stride[0], top, bottom, dilation[0], out_h, count_pad)
    per_col = divisors(n_w, size[1], stride[1], left, right, dilation[1], out_w, count_pad)
    count = torch.tensor(per_row, dtype=wide.dtype, device=x.device)[:, None] * torch.tensor(
        per_col, dtype=wide.dtype, device=x.device
    )
    return (total / count).to(x.dtype)


def run_layers(layers: list[tuple[str, dict]], inputs: list[torch.Tensor], weights: dict[str, torch.Tensor]):
    """A chain of layers: the first reads `inputs` and takes `weights`, each later one reads the one before."""
    x = apply(layers[0][0], layers[0][1], inputs, weights)
    for op, params in layers[1:]:
        x = apply(op, params, [x], {})
    return x
