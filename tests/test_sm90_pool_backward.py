"""The pooling backward kernels, the max pool's training forward (codegen/pool_backward.py) and the activation
backward (codegen/elementwise_backward.py) compile for the H100 (sm_90) without spills and within shared memory.

Shapes are one AlexNet tower's: pool1 (3x3/2 max on 48 x 55 x 55), pool2 (128 x 27 x 27) and pool5 (128 x 13 x 13),
each at batch 128 and 1 (which pick different blocks), in bf16 and fp32, NCHW, and pool5 channels-last as well;
the average backward of a 3x3/1 pad-1 window (a divisor per window) and of a dilated 3x3/2 one with ceil mode
and asymmetric padding, a global average over 13 x 13, and the ReLU backward of conv1's output. The
specialization is the one a real launch makes: the launchers run on "meta" tensors, unit strides and sizes become
constexpr 1 and integers divisible by 16 are marked so (tests/test_sm90_backward.py: `specialize`). All requests
go to one `compile_sm90_many` call. No GPU is needed. Run with `-s` for the resource table.
"""

import pytest
import torch
from test_sm90_backward import assert_fits, compile_cases, specialize

from netdsl.codegen import elementwise_backward, pool_backward
from netdsl.codegen.pool import pool_geometry
from netdsl.codegen.target import CompileRequest, KernelResources

pytestmark = pytest.mark.slow

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BATCHES = (128, 1)
# (channels, height, width) entering AlexNet's 3x3/2 max-pools, one tower
POOLS = {"pool1": (48, 55, 55), "pool2": (128, 27, 27), "pool5": (128, 13, 13)}


def meta(*shape: int, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=layout)


def max_pool_requests(pool: str, batch: int, dtype: str, channels_last: bool = False) -> list[CompileRequest]:
    x = meta(batch, *POOLS[pool], dtype=DTYPES[dtype], channels_last=channels_last)
    (out, argmax), _, forward = pool_backward.max_pool2d_train_launch(x, 3, 2)
    _, _, backward = pool_backward.max_pool2d_backward_launch(torch.empty_like(out), argmax, x.shape, 3, 2)
    return [
        specialize(pool_backward.max_pool2d_train_kernel, forward),
        specialize(pool_backward.pool2d_backward_kernel, backward),
    ]


def avg_pool_requests(pool: str, batch: int, dtype: str) -> list[CompileRequest]:
    """3x3/1 pad 1 without the padding in the divisor; 3x3/2 dilated 2, padded (0, 1, 2, 1), ceil mode; global."""
    shape = (batch, *POOLS[pool])
    grad_out = meta(*shape, dtype=DTYPES[dtype])
    _, _, same = pool_backward.avg_pool2d_backward_launch(grad_out, shape, 3, 1, 1, count_include_pad=False)
    pooled = pool_geometry(shape[2], shape[3], (3, 3), (2, 2), (0, 1, 2, 1), (2, 2), True)
    grad_out = meta(*shape[:2], *pooled, dtype=DTYPES[dtype])
    _, _, dilated = pool_backward.avg_pool2d_backward_launch(grad_out, shape, 3, 2, (0, 1, 2, 1), True, dilation=2)
    grad_out = meta(*shape[:2], 1, 1, dtype=DTYPES[dtype])
    _, _, whole = pool_backward.global_avg_pool2d_backward_launch(grad_out, shape)
    return [specialize(pool_backward.pool2d_backward_kernel, arguments) for arguments in (same, dilated, whole)]


def relu_requests(batch: int, dtype: str) -> list[CompileRequest]:
    y = meta(batch, 48, 55, 55, dtype=DTYPES[dtype])
    _, _, arguments = elementwise_backward.activation_backward_launch(torch.empty_like(y), y, "relu")
    return [specialize(elementwise_backward.activation_backward_kernel, arguments)]


def requests_of(case: tuple[str, str, int, str]) -> list[CompileRequest]:
    kind, layer, batch, dtype = case
    if kind == "relu":
        return relu_requests(batch, dtype)
    if kind == "avg":
        return avg_pool_requests(layer, batch, dtype)
    return max_pool_requests(layer, batch, dtype, channels_last=kind == "max-channels-last")


# (kind, layer, batch, dtype)
CASES = [("max", pool, batch, dtype) for pool in POOLS for batch in BATCHES for dtype in DTYPES]
CASES += [("max-channels-last", "pool5", batch, dtype) for batch in BATCHES for dtype in DTYPES]
CASES += [("avg", "pool5", batch, dtype) for batch in BATCHES for dtype in DTYPES]
CASES += [("relu", "conv1", batch, dtype) for batch in BATCHES for dtype in DTYPES]


@pytest.fixture(scope="module")
def compiled() -> dict[tuple, list[KernelResources]]:
    return compile_cases({case: requests_of(case) for case in CASES})


@pytest.mark.parametrize("case", list(CASES), ids=lambda case: "-".join(map(str, case)))
def test_compiles_for_sm90_without_spills(case, compiled):
    for result in compiled[case]:
        assert_fits(result)


def test_every_kernel_is_built(compiled):
    names = {result.name for results in compiled.values() for result in results}
    for kernel in ("max_pool2d_train", "pool2d_backward", "activation_backward"):
        assert any(name.startswith(kernel) for name in names), f"{kernel} was not compiled: {sorted(names)}"
