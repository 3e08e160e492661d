"""The conv and fc kernels compile for the H100 (sm_90) for every AlexNet layer without spills, within
shared memory, and on tensor cores.

Layers are one tower of the two-GPU AlexNet at batch 128 and batch 1 (which pick different tiles):
conv1..conv5 (conv3 reading both towers' conv2 maps as two inputs) and fc6..fc8 (each reading both
towers), plus LeNet's 120 -> 84 fc, whose sizes are not multiples of 16, so its loads are not
vectorized. Each compiles in bf16 and in fp32 with tf32, which must use MMA instructions, and in exact
fp32 ("ieee"), where Triton does not use tensor cores, so only spills and shared memory are checked.
The specialization is the one a real launch makes: the launchers run on "meta" tensors, unit strides
become constexpr 1 and integers divisible by 16 are marked so. No GPU is needed. Run with `-s` for
the resource table.
"""

import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import pytest
import torch

from netdsl.codegen import conv as conv_module
from netdsl.codegen import fc as fc_module
from netdsl.codegen.target import SM90_MAX_SHARED_BYTES, CompileRequest, compile_sm90_many, format_table

pytestmark = pytest.mark.slow

# name -> (dtype of the tensors, input precision); "fp32" is the default exact path.
PRECISIONS = {"bf16": (torch.bfloat16, "ieee"), "tf32": (torch.float32, "tf32"), "fp32": (torch.float32, "ieee")}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}

# One tower: (input shapes, weight shape, stride, padding); two input shapes = both towers' maps.
CONV_LAYERS = {
    "conv1": ([(3, 227, 227)], (48, 3, 11, 11), 4, 0),
    "conv2": ([(48, 27, 27)], (128, 48, 5, 5), 1, 2),
    "conv3": ([(128, 13, 13), (128, 13, 13)], (192, 256, 3, 3), 1, 1),
    "conv4": ([(192, 13, 13)], (192, 192, 3, 3), 1, 1),
    "conv5": ([(192, 13, 13)], (128, 192, 3, 3), 1, 1),
}
FC_LAYERS = {
    "fc6": ([(128, 6, 6), (128, 6, 6)], (2048, 9216)),
    "fc7": ([(2048,), (2048,)], (2048, 4096)),
    "fc8": ([(2048,), (2048,)], (1000, 4096)),
    "lenet-f6": ([(120,)], (84, 120)),
}
CASES = [(layer, batch) for layer in CONV_LAYERS for batch in (128, 1)]
CASES += [(layer, batch) for layer in FC_LAYERS for batch in (128, 1)]


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def launch(layer: str, batch: int, precision: str) -> tuple[object, dict]:
    dtype, input_precision = PRECISIONS[precision]
    if layer in CONV_LAYERS:
        inputs, weight, stride, padding = CONV_LAYERS[layer]
        _, arguments = conv_module.conv2d_launch(
            [meta(batch, *shape, dtype=dtype) for shape in inputs],
            meta(*weight, dtype=dtype),
            meta(weight[0], dtype=dtype),
            stride=stride,
            padding=padding,
            activation="relu",
            input_precision=input_precision,
        )
        return conv_module.conv2d_kernel, arguments
    inputs, weight = FC_LAYERS[layer]
    _, arguments = fc_module.linear_launch(
        [meta(batch, *shape, dtype=dtype) for shape in inputs],
        meta(*weight, dtype=dtype),
        meta(weight[0], dtype=dtype),
        activation="relu",
        input_precision=input_precision,
    )
    return fc_module.linear_kernel, arguments


def specialize(kernel, arguments: dict) -> CompileRequest:
    """The request a launch with these arguments compiles: what Triton's launcher specializes, by hand."""
    options = {"num_warps": arguments.pop("num_warps"), "num_stages": arguments.pop("num_stages")}
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


@cache
def compiled() -> dict:
    """(layer, batch, precision) -> KernelResources. Identical specializations compile once; under the
    interpreter the compiles run in two child processes side by side, otherwise in this process."""
    requests = {
        (layer, batch, precision): specialize(*launch(layer, batch, precision))
        for layer, batch in CASES
        for precision in PRECISIONS
    }
    unique = {identity(request): request for request in requests.values()}
    halves = [list(unique.values())[0::2], list(unique.values())[1::2]]
    with ThreadPoolExecutor(max_workers=2 if os.environ.get("TRITON_INTERPRET") == "1" else 1) as pool:
        results = [result for half in pool.map(compile_sm90_many, halves) for result in half]
    by_identity = {identity(request): result for request, result in zip(halves[0] + halves[1], results, strict=True)}
    print("\n" + format_table(list(by_identity.values())))
    return {key: by_identity[identity(request)] for key, request in requests.items()}


def identity(request: CompileRequest) -> tuple:
    return (
        request.kernel.fn.__name__,
        tuple(request.signature.items()),
        tuple(request.constexprs.items()),
        request.num_warps,
        request.num_stages,
        request.divisible_by_16,
    )


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize(("layer", "batch"), CASES)
def test_alexnet_layer_compiles_for_sm90(layer: str, batch: int, precision: str):
    result = compiled()[(layer, batch, precision)]
    table = format_table([result])
    assert result.spill_stores == 0 and result.spill_loads == 0, table
    assert result.shared_bytes <= SM90_MAX_SHARED_BYTES, table
    if precision != "fp32":
        assert any(name in result.mma for name in ("wgmma.mma_async", "mma.sync")), table
