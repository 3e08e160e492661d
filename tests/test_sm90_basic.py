"""Softmax and elementwise kernels compile for the H100 (sm_90) within its register and shared memory budgets.

No GPU needed: Triton's CUDA backend and the NVIDIA tools in its wheel run on the CPU. All specializations
go to `compile_sm90_many` at once, so that under the interpreter a single child process compiles them.
"""

import pytest
import torch

from netdsl.codegen import elementwise, softmax
from netdsl.codegen.target import (
    SM90_MAX_REGISTERS,
    SM90_MAX_SHARED_BYTES,
    CompileRequest,
    KernelResources,
    compile_sm90,
    compile_sm90_many,
    format_table,
)

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def request(kernel, dtype: torch.dtype, constexprs: dict, num_warps: int) -> CompileRequest:
    """What a launch on contiguous tensors compiles: pointers of `dtype` (per-channel vectors in fp32),
    unit strides and sizes of 1 as constexprs, the other integers i32, the leaky slope fp32."""

    def arg_type(name: str) -> str:
        if name in ("scale_ptr", "shift_ptr"):
            return "*fp32"
        if name.endswith("_ptr"):
            return f"*{TRITON_TYPES[dtype]}"
        return "fp32" if name == "slope" else "i32"

    signature = {name: "constexpr" if name in constexprs else arg_type(name) for name in kernel.arg_names}
    return CompileRequest(kernel, signature, constexprs, num_warps=num_warps, sass=False)


def softmax_request(config: softmax.SoftmaxConfig, dtype: torch.dtype) -> CompileRequest:
    # Feature rows ([N, F], so S == 1) are contiguous along channels; maps along the spatial axis.
    if config.BLOCK_S == 1:
        unit = {"S": 1, **{f"stride_{t}{axis}": 1 for t in "xo" for axis in "cs"}}
    else:
        unit = {f"stride_{t}s": 1 for t in "xo"}
    constexprs = {**unit, "BLOCK_C": config.BLOCK_C, "BLOCK_S": config.BLOCK_S}
    return request(softmax.softmax_kernel, dtype, constexprs, config.num_warps)


def elementwise_request(
    op: str, activation: str, config: elementwise.ElementwiseConfig, dtype: torch.dtype
) -> CompileRequest:
    # Feature rows ([N, F], so S == 1) are contiguous along channels; maps along the spatial axis.
    if config.BLOCK_S == 1:
        unit = {"S": 1, **{f"stride_{t}{axis}": 1 for t in "xyo" for axis in "cs"}}
    else:
        unit = {f"stride_{t}s": 1 for t in "xyo"}
    constexprs = {
        **unit,
        "OP": op,
        "ACTIVATION": activation,
        "BLOCK_C": config.BLOCK_C,
        "BLOCK_S": config.BLOCK_S,
    }
    return request(elementwise.elementwise_kernel, dtype, constexprs, config.num_warps)


def all_requests() -> dict[str, CompileRequest]:
    requests = {}
    for config in softmax.CONFIGS:
        requests[f"softmax-{config.BLOCK_C}x{config.BLOCK_S}-fp16"] = softmax_request(config, torch.float16)
    for dtype in (torch.float32, torch.bfloat16):
        requests[f"softmax-4096x1-{TRITON_TYPES[dtype]}"] = softmax_request(softmax.CONFIGS[2], dtype)
    map_tile = elementwise.pick_config(13 * 13)
    for op in elementwise.OPS:
        for activation in elementwise.ACTIVATIONS:
            name = f"elementwise-{op}-{activation}-{map_tile.BLOCK_C}x{map_tile.BLOCK_S}-bf16"
            requests[name] = elementwise_request(op, activation, map_tile, torch.bfloat16)
    for config, dtype in ((elementwise.CONFIGS[0], torch.float32), (elementwise.CONFIGS[-1], torch.float16)):
        name = f"elementwise-affine-leaky_relu-{config.BLOCK_C}x{config.BLOCK_S}-{TRITON_TYPES[dtype]}"
        requests[name] = elementwise_request("affine", "leaky_relu", config, dtype)
    return requests


REQUESTS = all_requests()


@pytest.fixture(scope="module")
def resources() -> dict[str, KernelResources]:
    return dict(zip(REQUESTS, compile_sm90_many(list(REQUESTS.values())), strict=True))


@pytest.mark.parametrize("name", REQUESTS)
def test_kernel_fits_sm90(name, resources):
    result = resources[name]
    table = format_table([result])
    assert result.spill_stores == 0 and result.spill_loads == 0, table
    assert result.local_bytes == 0, table
    assert 0 < result.registers <= SM90_MAX_REGISTERS, table
    assert result.shared_bytes <= SM90_MAX_SHARED_BYTES, table
    assert result.mma == (), table  # no tensor cores in these kernels
    assert f".entry {result.name}(" in result.ptx


def test_compile_sm90_reads_sass_and_formats_a_table():
    config = elementwise.CONFIGS[0]
    single = elementwise_request("add", "relu", config, torch.float32)
    result = compile_sm90(single.kernel, single.signature, single.constexprs, num_warps=config.num_warps)
    assert result.name == "elementwise_kernel"
    assert result.sass is not None and "FMNMX" in result.sass  # the ReLU
    table = format_table([result])
    assert "elementwise_kernel" in table.splitlines()[2]
    assert "OP=add ACTIVATION=relu" in table
