"""What the conv and fc kernel tests share: tolerances per dtype, random inputs
and the activation reference (the interpreter work-around for bfloat16 dots is in conftest.py)."""

import os

import torch
import torch.nn.functional as F

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
