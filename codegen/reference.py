"""Reference implementations of every op kind with PyTorch ops: what a layer means, independent of the
generated kernels. Used by generated files to check themselves, by the torch backend, and (with
`training=True`, under autograd) by the trainable module `netdsl.runtime.module.GraphModule`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
        return F.conv2d(
            x,
            weights["weight"],
            weights.get("bias"),
            params["stride"],
            params["pad"],
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
    if op == "maxpool":
        return F.max_pool2d(x, params["size"], params["stride"], params["pad"], ceil_mode=params["ceil"])
    if op == "avgpool":
        return F.avg_pool2d(
            x,
            params["size"],
            params["stride"],
            params["pad"],
            ceil_mode=params["ceil"],
            count_include_pad=params["count_pad"],
        )
    if op == "global_avgpool":
        return x.mean(dim=(2, 3), keepdim=True)
    if op == "dropout":
        return F.dropout(x, params["rate"], training=True) if training else x
    if op == "softmax":
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # float64 stays float64
        return torch.softmax(wide, dim=1).to(x.dtype)
    if op == "batchnorm":
        return F.batch_norm(
            x,
            weights["running_mean"],
            weights["running_var"],
            weights["weight"],
            weights["bias"],
            training=training,
            momentum=params["momentum"] if training else 0.0,  # not read at inference
            eps=params["eps"],
        )
    if op == "flatten":
        return x.flatten(1)
    raise ValueError(f"no reference for op {op!r}")


def run_layers(layers: list[tuple[str, dict]], inputs: list[torch.Tensor], weights: dict[str, torch.Tensor]):
    """A chain of layers: the first reads `inputs` and takes `weights`, each later one reads the one before."""
    x = apply(layers[0][0], layers[0][1], inputs, weights)
    for op, params in layers[1:]:
        x = apply(op, params, [x], {})
    return x
