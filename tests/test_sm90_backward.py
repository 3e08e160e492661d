"""The backward kernels (codegen/fc_backward.py, codegen/lrn_pool_backward.py) compile for the H100 (sm_90) without
spills and within shared memory, the fc dgrad and wgrad kernels on tensor cores.

Layers are one tower of the two-GPU AlexNet at batch 128 and batch 1 (which pick different tiles): fc6 reading
both towers' 128 x 6 x 6 maps, fc8, LeNet's 120 -> 84 fc (sizes not multiples of 16; at batch 128 its wgrad
splits the batch, which adds the reduction kernel), and the LRN + 3x3/2 max-pool steps on 48 x 55 x 55 and
128 x 27 x 27 (training forward and backward). Each compiles in bf16 and fp32; the fc kernels also in fp32 with
tf32. bf16 and tf32 dots must use MMA instructions; exact fp32 ("ieee") does not use tensor cores. The
specialization is the one a real launch makes: the launchers run on "meta" tensors, unit strides become
constexpr 1 and integers divisible by 16 are marked so. All requests go to one `compile_sm90_many` call. No GPU
is needed. Run with `-s` for the resource table.
"""

import inspect

import pytest
import torch

from netdsl.codegen import fc_backward, lrn_pool_backward
from netdsl.codegen.target import (
    SM90_MAX_SHARED_BYTES,
    CompileRequest,
    KernelResources,
    compile_sm90_many,
    format_table,
)

pytestmark = pytest.mark.slow

# name -> (dtype of the tensors, input precision)
PRECISIONS = {"bf16": (torch.bfloat16, "ieee"), "tf32": (torch.float32, "tf32"), "fp32": (torch.float32, "ieee")}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8"}
BATCHES = (128, 1)
# (per-sample input shapes, weight shape)
FC_LAYERS = {
    "fc6": ([(128, 6, 6), (128, 6, 6)], (2048, 9216)),
    "fc8": ([(2048,), (2048,)], (1000, 4096)),
    "lenet-f6": ([(120,)], (84, 120)),
}
# (channels, height, width) entering LRN(5) + max-pool 3x3/2, after a ReLU
LRN_POOL_LAYERS = {"lrn1-pool1": (48, 55, 55), "lrn2-pool2": (128, 27, 27)}
LRN = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0, "pool_size": 3, "pool_stride": 2, "relu_first": True}


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def specialize(kernel, arguments: dict) -> CompileRequest:
    """The request a launch with these arguments compiles: what Triton's launcher specializes, by hand."""
    arguments = dict(arguments)
    options = {"num_warps": arguments.pop("num_warps"), "num_stages": arguments.pop("num_stages", 3)}
    signature, constexprs, divisible = {}, {}, []
    for name, parameter in inspect.signature(kernel.fn).parameters.items():
        value = arguments[name]
        unit = isinstance(value, int) and not isinstance(value, bool) and value == 1
        if "constexpr" in str(parameter.annotation) or unit:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = f"*{TRITON_TYPES[value.dtype]}"
            divisible.append(name)  # torch allocations are 16-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                divisible.append(name)
    return CompileRequest(kernel, signature, constexprs, **options, sass=False, divisible_by_16=tuple(divisible))


def fc_requests(layer: str, batch: int, precision: str) -> list[CompileRequest]:
    dtype, input_precision = PRECISIONS[precision]
    inputs, weight = FC_LAYERS[layer]
    _, launches = fc_backward.linear_backward_launches(
        meta(batch, weight[0], dtype=dtype),
        meta(batch, weight[0], dtype=dtype),
        [meta(batch, *shape, dtype=dtype) for shape in inputs],
        meta(*weight, dtype=dtype),
        has_bias=True,
        activation="relu",
        input_precision=input_precision,
        config=fc_backward.pick_config(batch, weight[0], weight[1], dtype),
    )
    return [specialize(launch.kernel, launch.arguments) for launch in launches]


def lrn_pool_requests(layer: str, batch: int, precision: str) -> list[CompileRequest]:
    dtype = PRECISIONS[precision][0]
    x = meta(batch, *LRN_POOL_LAYERS[layer], dtype=dtype)
    config = None  # meta tensors are not on the CPU: pick_config's GPU tiles
    (out, argmax, scale), _, forward = lrn_pool_backward.lrn_maxpool_train_launch(x, **LRN, config=config)
    _, _, backward = lrn_pool_backward.lrn_maxpool_backward_launch(torch.empty_like(out), x, argmax, scale, **LRN)
    return [
        specialize(lrn_pool_backward.lrn_pool_train_kernel, forward),
        specialize(lrn_pool_backward.lrn_pool_backward_kernel, backward),
    ]


def identity(request: CompileRequest) -> tuple:
    return (
        request.kernel.fn.__name__,
        tuple(request.signature.items()),
        tuple(request.constexprs.items()),
        request.num_warps,
        request.num_stages,
        request.divisible_by_16,
    )


CASES = {(layer, batch, precision): fc_requests for layer in FC_LAYERS for batch in BATCHES for precision in PRECISIONS}
CASES |= {
    (layer, batch, precision): lrn_pool_requests
    for layer in LRN_POOL_LAYERS
    for batch in BATCHES
    for precision in ("bf16", "fp32")
}


def compile_cases(requests: dict[tuple, list[CompileRequest]]) -> dict[tuple, list[KernelResources]]:
    """case -> the resources of its kernels; identical specializations compile once, all in one call."""
    unique = {identity(request): request for case_requests in requests.values() for request in case_requests}
    results = dict(zip(unique, compile_sm90_many(list(unique.values())), strict=True))
    print("\n" + format_table(list(results.values())))
    return {case: [results[identity(request)] for request in case_requests] for case, case_requests in requests.items()}


def assert_fits(result: KernelResources) -> str:
    """No spills, no stack or local memory, shared memory within an SM's; returns the result's table."""
    table = format_table([result])
    assert result.spill_stores == 0 and result.spill_loads == 0, table
    assert result.stack_bytes == 0 and result.local_bytes == 0, table
    assert result.shared_bytes <= SM90_MAX_SHARED_BYTES, table
    return table


@pytest.fixture(scope="module")
def compiled() -> dict[tuple, list[KernelResources]]:
    return compile_cases({case: make(*case) for case, make in CASES.items()})


@pytest.mark.parametrize("case", list(CASES), ids=lambda case: "-".join(map(str, case)))
def test_compiles_for_sm90_without_spills(case, compiled):
    for result in compiled[case]:
        table = assert_fits(result)
        gemm = result.name.startswith(("linear_dgrad_kernel", "linear_wgrad_kernel"))
        if gemm and case[2] != "fp32":
            assert any(name in result.mma for name in ("wgmma.mma_async", "mma.sync")), table


def test_every_kernel_is_built(compiled):
    names = {result.name for results in compiled.values() for result in results}
    for kernel in ("linear_dgrad", "linear_wgrad", "sum_splits", "lrn_pool_train", "lrn_pool_backward"):
        assert any(name.startswith(kernel) for name in names), f"{kernel} was not compiled: {sorted(names)}"
