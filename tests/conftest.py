"""Test-wide set-up: without a GPU, Triton kernels run under Triton's interpreter on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")
