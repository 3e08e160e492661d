"""What the tile pickers ask beyond a layer's sizes: whether a tile builds for sm_90 without spilling registers
depends on the Triton that builds it and on whether fp32 products are exact.

Triton 3.6 (what the H200 machines have) keeps the gathered operand of an implicit GEMM in registers where 3.9
stages it in shared memory, and its ptxas (CUDA 12.8; 3.9 assembles sm_90 with 13.x) allocates registers less
tightly. Exact fp32 products run on the FMA units with their operands in registers, so those kernels take smaller
tiles than the tensor-core paths. Every tile the pickers choose builds without spills under both versions:
tests/test_sm90_*.py check the Triton installed, CI runs them under 3.6 too (.ci/triton36), and
bench/triton_compat.sh compiles every net under the GPU machines' Triton and PyTorch.
"""

import torch
import triton


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0" or "3.9.0+git1234"."""
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2])
    return major, minor


TRITON_VERSION = _version(triton.__version__)
# 128 x 128 tiles of a gathered operand (the NCHW conv's pixels, dgrad's) build without spills from Triton 3.9 on;
# before it (3.7 and 3.8 unmeasured) they spill, and those convs take half-width tiles.
SQUARE_TILES = TRITON_VERSION >= (3, 9)


def exact_fp32(dtype: torch.dtype, input_precision: str) -> bool:
    """Whether a kernel's products are exact fp32 ("ieee" on fp32 tensors): on the FMA units, not tensor cores."""
    return dtype == torch.float32 and input_precision == "ieee"
