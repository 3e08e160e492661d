"""The element types a net runs in, by the names the command line and the API use.

`tf32` stores fp32 tensors and multiplies them on TF32 tensor cores; the others are what they say.
This module does not import torch (the front end runs without it); `torch_dtype` does, when called.
"""

from __future__ import annotations

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}
TORCH_NAMES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPES = tuple(DTYPE_BYTES)


def torch_dtype(name: str):
    """The torch element type of tensors in a net of dtype `name` (`torch.float32` for tf32)."""
    import torch

    return getattr(torch, TORCH_NAMES[name])
