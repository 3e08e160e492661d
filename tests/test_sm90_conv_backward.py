"""The conv backward kernels (codegen/conv_backward.py) compile for the H100 (sm_90) at AlexNet's shapes without
spills, within shared memory, and dgrad and wgrad on tensor cores.

Layers are one tower at batch 8: conv1 (3 -> 48, 11 x 11 at stride 4 on 227 x 227: dgrad in 16 stride phases,
3 input channels padded to a 16-row MMA tile, which takes mma.sync rather than wgmma), conv2 (48 -> 128, 5 x 5,
pad 2 on 27 x 27) and conv4 (192 -> 192, 3 x 3, pad 1 on 13 x 13: the wide tiles), with ReLU and a bias; and
VGG-16's first conv (3 -> 64, 3 x 3, pad 1 on 224 x 224: wgrad's narrowest tile, 32 columns). Each
compiles in bf16 and in fp32 with tf32, which must use MMA instructions, and in exact fp32
("ieee"), where Triton does not use tensor cores, so only spills and shared memory are checked; the split-K
reduction (no MMA) is checked for spills in each output dtype. The specialization is the one a real launch
makes: the launchers run on "meta" tensors (tests/test_sm90_conv.py: `specialize`). No GPU is needed; run with
`-s` for the resource table.
"""

from functools import cache

import pytest
import torch
from test_sm90_conv import PRECISIONS, identity, meta, specialize

from netdsl.codegen import conv_backward
from netdsl.codegen.target import SM90_MAX_SHARED_BYTES, compile_sm90_many, format_table

pytestmark = pytest.mark.slow

BATCH = 8
# One tower: (input shape, weight shape, stride, padding)
LAYERS = {
    "conv1": ((3, 227, 227), (48, 3, 11, 11), 4, 0),
    "conv2": ((48, 27, 27), (128, 48, 5, 5), 1, 2),
    "conv4": ((192, 13, 13), (192, 192, 3, 3), 1, 1),
    "vgg16_s1_x_1": ((3, 224, 224), (64, 3, 3, 3), 1, 1),  # 28 im2col columns: the narrow wgrad tile
}
KERNELS = ("dgrad", "wgrad", "reduce")
CASES = [(layer, kernel, precision) for layer in LAYERS for kernel in KERNELS for precision in PRECISIONS]


def launches(layer: str, precision: str) -> dict[str, tuple[object, dict]]:
    """kernel name -> (kernel, keyword arguments) of one layer's backward, as the launchers build them."""
    shape, weight, stride, padding = LAYERS[layer]
    dtype, input_precision = PRECISIONS[precision]
    x = meta(BATCH, *shape, dtype=dtype)
    y_shape = torch.nn.functional.conv2d(x, meta(*weight, dtype=dtype), stride=stride, padding=padding).shape
    grad_out, out = meta(*y_shape, dtype=dtype), meta(*y_shape, dtype=dtype)
    options = {"stride": stride, "padding": padding, "activation": "relu", "input_precision": input_precision}
    _, dgrad = conv_backward.conv2d_dgrad_launch(grad_out, out, meta(*weight, dtype=dtype), x.shape, **options)
    (_, wgrad), (_, reduce) = conv_backward.conv2d_wgrad_launch(grad_out, out, x, weight, bias=True, **options)
    return {
        "dgrad": (conv_backward.conv2d_dgrad_kernel, dgrad),
        "wgrad": (conv_backward.conv2d_wgrad_kernel, wgrad),
        "reduce": (conv_backward.conv2d_wgrad_reduce_kernel, reduce),
    }


@cache
def compiled() -> dict:
    """(layer, kernel, precision) -> KernelResources, every specialization in one compile_sm90_many call
    (identical ones once: the reduction does not depend on the layer's geometry beyond its sizes)."""
    requests = {}
    for layer in LAYERS:
        for precision in PRECISIONS:
            for name, (kernel, arguments) in launches(layer, precision).items():
                requests[layer, name, precision] = specialize(kernel, dict(arguments))
    unique = {identity(request): request for request in requests.values()}
    results = dict(zip(unique, compile_sm90_many(list(unique.values())), strict=True))
    print("\n" + format_table(list(results.values())))
    return {key: results[identity(request)] for key, request in requests.items()}


@pytest.mark.parametrize(("layer", "kernel", "precision"), CASES)
def test_backward_compiles_for_sm90(layer: str, kernel: str, precision: str):
    result = compiled()[layer, kernel, precision]
    table = format_table([result])
    assert result.spill_stores == 0 and result.spill_loads == 0 and result.stack_bytes == 0, table
    assert result.shared_bytes <= SM90_MAX_SHARED_BYTES, table
    if kernel != "reduce" and precision != "fp32":
        assert any(name in result.mma for name in ("wgmma.mma_async", "mma.sync")), table
