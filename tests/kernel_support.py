"""What the kernel and training tests share: tolerances per dtype, random inputs, a small two-tower net
and the activation reference (the interpreter work-around for bfloat16 dots is in conftest.py)."""

import os

import numpy as np
import torch
import torch.nn.functional as F

from netdsl.runtime.weights import init_weights

TOLERANCES = {
    "fp32": {"rtol": 1e-4, "atol": 1e-4},  # exact fp32 products ("ieee")
    "tf32": {"rtol": 1e-2, "atol": 1e-2},  # opt-in: 10-bit mantissa products on the GPU
    "fp16": {"rtol": 2e-3, "atol": 2e-3},  # fp32 accumulation, output rounded to fp16
    "bf16": {"rtol": 1.6e-2, "atol": 1.6e-2},  # fp32 accumulation, output rounded to bf16
}
PRECISIONS = {
    "fp32": (torch.float32, "ieee"),
    "tf32": (torch.float32, "tf32"),
    "fp16": (torch.float16, "ieee"),
    "bf16": (torch.bfloat16, "ieee"),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def random(generator: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).float()


def activate(y: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, slope)
    return y


def onnx_length(n: int, kernel: int, stride: int, begin: int, end: int, dilation: int, ceil_mode: bool) -> int:
    """Windows along one axis by ONNX's formula (onnxruntime's, in ceil mode: a last window that would start in
    the end padding is dropped); 0 when none fits."""
    room = n + begin + end - dilation * (kernel - 1) - 1
    if room < 0:
        return 0
    count = (room + (stride - 1 if ceil_mode else 0)) // stride + 1
    return count - 1 if ceil_mode and (count - 1) * stride >= n + begin else count


def explicit_pool(x, kind, size, stride, pads, dilation=(1, 1), ceil_mode=False, count_include_pad=True):
    """Max or average pooling as ONNX defines it, where PyTorch's pooling cannot say it (padding that differs at
    the two ends or reaches past half the window; a dilated average), in float64: the input padded explicitly
    (F.pad: -inf for a max, zeros for an average) out to the last window's reach, every window unfolded
    (F.unfold), an average divided by its taps inside the input, or inside the padded input with
    `count_include_pad`. `pads` is (top, left, bottom, right)."""
    top, left, bottom, right = pads
    height, width = x.shape[2], x.shape[3]
    out_h = onnx_length(height, size[0], stride[0], top, bottom, dilation[0], ceil_mode)
    out_w = onnx_length(width, size[1], stride[1], left, right, dilation[1], ceil_mode)
    reach_h = (out_h - 1) * stride[0] + dilation[0] * (size[0] - 1) + 1
    reach_w = (out_w - 1) * stride[1] + dilation[1] * (size[1] - 1) + 1
    overhang = (0, max(reach_w - width - left - right, 0), 0, max(reach_h - height - top - bottom, 0))

    def windows(t: torch.Tensor, value: float, beyond: float) -> torch.Tensor:
        """Every window's taps of `t` padded with `value`, and past the padding with `beyond`."""
        padded = F.pad(F.pad(t, (left, right, top, bottom), value=value), overhang, value=beyond)
        cols = F.unfold(padded, size, dilation=dilation, stride=stride)
        rows = (padded.shape[2] - reach_h) // stride[0] + out_h
        return cols.reshape(t.shape[0], t.shape[1], size[0] * size[1], rows, -1)[..., :out_h, :out_w]

    if kind == "max":
        return windows(x.double(), float("-inf"), float("-inf")).amax(dim=2)
    ones = torch.ones(1, 1, height, width, dtype=torch.float64, device=x.device)
    counted = windows(ones, 1.0 if count_include_pad else 0.0, 0.0).sum(dim=2)
    return windows(x.double(), 0.0, 0.0).sum(dim=2) / counted


def four_pads(padding) -> bool:
    """Whether `padding` is (top, left, bottom, right) rather than n or (h, w)."""
    return isinstance(padding, tuple) and len(padding) == 4


def explicitly_padded(x: torch.Tensor, padding) -> torch.Tensor:
    """`x` padded with zeros by F.pad when `padding` is (top, left, bottom, right), which PyTorch's conv2d cannot
    take; else `x` itself (conv2d pads it)."""
    if not four_pads(padding):
        return x
    top, left, bottom, right = padding
    return F.pad(x, (left, right, top, bottom))


# AlexNet's shape in miniature (two towers, LRN + max-pool stages, a cross-tower conv and fcs) for the training tests.
SMALL_ALEXNET = """\
net small_alexnet
device gpu0, gpu1
input image: 3 x 27 x 27
const norm = lrn(size=5, alpha=1e-4, beta=0.75, k=2)

towers gpu0, gpu1 {
    conv1 = conv(image, 8, size=5, stride=2) | relu | norm | maxpool(3, stride=2)
    conv2 = conv(conv1, 12, size=3, pad=1)   | relu | norm | maxpool(3, stride=2)
    conv3 = conv(all conv2, 12, size=3, pad=1) | relu
    fc6   = fc(all conv3, 32) | relu | dropout(0.5)
}
fc8  = fc(all fc6, 10) on gpu0
prob = softmax(fc8)
output prob
"""


def fresh_weights(graph, seed: int = 0) -> dict[str, np.ndarray]:
    """He's initialization, with the tensors it leaves constant drawn too: biases and batch norm shifts
    and means N(0, 0.1^2), batch norm scales and variances U(0.5, 1.5)."""
    weights = init_weights(graph, seed=seed, scheme="he")
    rng = np.random.default_rng(seed + 1)
    for name, value in weights.items():
        tensor = name.rsplit(".", 1)[1]
        if tensor == "running_var" or (tensor == "weight" and value.ndim == 1):
            weights[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif tensor in ("bias", "running_mean"):
            weights[name] = (0.1 * rng.standard_normal(value.shape)).astype(np.float32)
    return weights
