"""Test-wide set-up: without a GPU, Triton kernels run under Triton's interpreter on the CPU."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """Triton's interpreter stores bfloat16 as raw uint16 bits and its tl.dot multiplies the bits
    (triton-lang/triton#11584; bf16 is unsupported there). Widen bf16 dot operands to fp32 first,
    which is what a tensor core computes: exact products, fp32 accumulation."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot_widened(self, a, b, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot_widened)
