"""The element types a net runs in, by the names the command line and the API use.

`tf32` stores fp32 tensors and multiplies them on TF32 tensor cores; the others are what they say.
How an fp32 net's matrix products are computed is its precision (`dot_precision`): "ieee" (exact products, on
the FMA units), or "tf32x3" (three TF32 tensor-core products whose error is close to fp32's; docs/performance.md).
This module does not import torch (the front end runs without it); `torch_dtype` does, when called.
"""

from __future__ import annotations

from netdsl.errors import NetError

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}
TORCH_NAMES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPES = tuple(DTYPE_BYTES)
FP32_PRECISIONS = ("ieee", "tf32x3")  # what `precision` may say, for dtype fp32 only
FP32_DEFAULT_PRECISION = "ieee"  # tf32x3's error and speed are not yet measured on a GPU (docs/performance.md)


def dot_precision(dtype: str, precision: str | None = None, where: str = "precision") -> str:
    """The `input_precision` of the kernels' `tl.dot` for a net of `dtype`: `precision` (or the default) for fp32,
    "tf32" for tf32; "ieee" for 16-bit types, whose products Triton computes alike whatever it is told. A
    precision given for another dtype, or unknown, is a NetError blaming `where`."""
    if precision is None:
        return {"fp32": FP32_DEFAULT_PRECISION, "tf32": "tf32"}.get(dtype, "ieee")
    if dtype != "fp32":
        raise NetError(
            f"a precision applies to fp32 nets only, not {dtype}",
            where=where,
            hint="leave the precision out, or use dtype fp32 (dtype tf32 is one TF32 product per multiply)",
        )
    if precision not in FP32_PRECISIONS:
        raise NetError(
            f"unknown precision `{precision}`", where=where, hint=f"precisions: {', '.join(FP32_PRECISIONS)}"
        )
    return precision


def torch_dtype(name: str):
    """The torch element type of tensors in a net of dtype `name` (`torch.float32` for tf32)."""
    import torch

    return getattr(torch, TORCH_NAMES[name])
