"""The training kernels (cross-entropy, dropout, batch norm in training, the paper's SGD) compile for the H100
(sm_90) within its register and shared memory budgets, without spills.

No GPU needed: Triton's CUDA backend and the NVIDIA tools in its wheel run on the CPU. All specializations
go to `compile_sm90_many` at once, so that under the interpreter a single child process compiles them.
Each is what a launch on contiguous tensors compiles: unit strides as constexprs, sizes i32, dropout's seed
and counter offset i64 (any 64-bit value), per-channel vectors and optimizer buffers fp32.
"""

import pytest
import torch

from netdsl.codegen import batchnorm_train, cross_entropy, dropout, optimizer
from netdsl.codegen.source import device_functions
from netdsl.codegen.target import (
    SM90_MAX_REGISTERS,
    SM90_MAX_SHARED_BYTES,
    CompileRequest,
    KernelResources,
    compile_sm90_many,
    format_table,
)

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = (torch.float32, torch.bfloat16)


def request(
    kernel, constexprs: dict, num_warps: int, pointers: dict[str, str], scalars: dict[str, str] | None = None
) -> CompileRequest:
    """A compile request: `pointers` gives each pointer argument's Triton type, `scalars` the non-i32 scalars;
    every other argument is an i32 or a constexpr of `constexprs`."""
    scalars = scalars or {}

    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return pointers[name]
        return scalars.get(name, "i32")

    signature = {name: arg_type(name) for name in kernel.arg_names}
    return CompileRequest(kernel, signature, constexprs, num_warps=num_warps, sass=False)


def cross_entropy_requests(dtype: torch.dtype) -> dict[str, CompileRequest]:
    t = TRITON_TYPES[dtype]
    pointers = {"logits_ptr": f"*{t}", "target_ptr": "*i64", "loss_ptr": "*fp32", "grad_ptr": f"*{t}"}
    requests = {}
    for config in cross_entropy.CONFIGS:
        constexprs = {"stride_lk": 1, "stride_gk": 1, "BLOCK_N": config.BLOCK_N, "BLOCK_K": config.BLOCK_K}
        requests[f"cross_entropy-{config.BLOCK_N}x{config.BLOCK_K}-{t}"] = request(
            cross_entropy.cross_entropy_kernel,
            constexprs,
            config.num_warps,
            pointers,
            {"smoothing": "fp32", "grad_scale": "fp32"},
        )
        soft = {**constexprs, "stride_tk": 1}
        requests[f"soft_cross_entropy-{config.BLOCK_N}x{config.BLOCK_K}-{t}"] = request(
            cross_entropy.soft_cross_entropy_kernel,
            soft,
            config.num_warps,
            {**pointers, "target_ptr": "*fp32"},
            {"smoothing": "fp32", "grad_scale": "fp32"},
        )
    return requests


def dropout_request(dtype: torch.dtype) -> CompileRequest:
    t = TRITON_TYPES[dtype]
    return request(
        dropout.dropout_kernel,
        {"BLOCK": dropout.BLOCK},
        4,
        {"x_ptr": f"*{t}", "out_ptr": f"*{t}"},
        {"seed": "i64", "offset": "i64", "p": "fp32", "scale": "fp32"},
    )


def batch_norm_requests(dtype: torch.dtype) -> dict[str, CompileRequest]:
    """The forward and backward launches on a map of 13 x 13 planes (S, the plane, is an i32) with the most
    chunks a channel may have (BLOCK_SPLIT = MAX_SPLIT) and with one, one channel a program (as pick_config gives a
    GPU)."""
    t = TRITON_TYPES[dtype]
    maps = {"x_ptr": f"*{t}", "dy_ptr": f"*{t}", "y_ptr": f"*{t}", "dx_ptr": f"*{t}"}
    vectors = ("weight", "bias", "mean", "invstd", "running_mean", "running_var", "sums", "products")
    pointers = {**maps, **{f"{name}_ptr": "*fp32" for name in (*vectors, "dweight", "dbias")}}
    block = batchnorm_train.GPU_BLOCK
    requests = {}
    for has_dy in (False, True):
        requests[f"batchnorm_partials-{'backward' if has_dy else 'forward'}-{t}"] = request(
            batchnorm_train.batchnorm_partials_kernel, {"HAS_DY": has_dy, "CHANNELS": 1, "BLOCK": block}, 4, pointers
        )
    for block_split in (1, batchnorm_train.MAX_SPLIT):
        constexprs = {"CHANNELS": 1, "BLOCK": block, "BLOCK_SPLIT": block_split}
        requests[f"batchnorm_forward-{block_split}-{t}"] = request(
            batchnorm_train.batchnorm_forward_kernel, constexprs, 4, pointers, {"eps": "fp32", "momentum": "fp32"}
        )
        requests[f"batchnorm_backward-{block_split}-{t}"] = request(
            batchnorm_train.batchnorm_backward_kernel, constexprs, 4, pointers
        )
    return requests


def paper_sgd_requests(grad_dtype: torch.dtype) -> dict[str, CompileRequest]:
    t = TRITON_TYPES[grad_dtype]
    pointers = {
        "weight_ptr": "*fp32",
        "grad_ptr": f"*{t}",
        "velocity_ptr": "*fp32",
        "starts_ptr": "*i64",
        "lr_mults_ptr": "*fp32",
        "decay_mults_ptr": "*fp32",
    }
    scalars = {"lr": "fp32", "momentum": "fp32", "weight_decay": "fp32"}
    return {
        f"paper_sgd-{'nesterov' if nesterov else 'momentum'}-{t}": request(
            optimizer.paper_sgd_kernel, {"NESTEROV": nesterov, "BLOCK": optimizer.BLOCK}, 4, pointers, scalars
        )
        for nesterov in (False, True)
    }


def all_requests() -> dict[str, CompileRequest]:
    requests = {}
    for dtype in DTYPES:
        requests.update(cross_entropy_requests(dtype))
        requests[f"dropout-{TRITON_TYPES[dtype]}"] = dropout_request(dtype)
        requests.update(batch_norm_requests(dtype))
        requests.update(paper_sgd_requests(dtype))
    requests["fixed_order_mean"] = request(
        cross_entropy.fixed_order_mean_kernel,
        {"BLOCK": cross_entropy.MEAN_BLOCK},
        4,
        {"values_ptr": "*fp32", "out_ptr": "*fp32"},
    )
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
    assert result.local_bytes == 0 and result.stack_bytes == 0, table
    assert 0 < result.registers <= SM90_MAX_REGISTERS, table
    assert result.shared_bytes <= SM90_MAX_SHARED_BYTES, table
    assert result.mma == (), table  # no tensor cores in these kernels
    assert f".entry {result.name}(" in result.ptx


@pytest.mark.parametrize(
    "kernel",
    [
        cross_entropy.cross_entropy_kernel,
        cross_entropy.soft_cross_entropy_kernel,
        cross_entropy.fixed_order_mean_kernel,
        dropout.dropout_kernel,
        batchnorm_train.batchnorm_partials_kernel,
        batchnorm_train.batchnorm_forward_kernel,
        batchnorm_train.batchnorm_backward_kernel,
        optimizer.paper_sgd_kernel,
    ],
    ids=lambda kernel: kernel.fn.__name__,
)
def test_kernel_can_be_copied_into_a_generated_file(kernel):
    """The emitter copies a kernel and its device functions into a file that imports only Triton (source.py)."""
    functions = device_functions(kernel)
    assert functions[0] is kernel.fn
