"""fp32 on tensor cores with three TF32 products (`input_precision="tf32x3"`, issue 13): every AlexNet layer's
kernel compiles for the H100 (sm_90) without spills, within shared memory, and on tensor cores. Triton splits each
fp32 operand into a TF32 head (`cvt.rna.tf32.f32`) and tail before its MMA passes, so each dot becomes three TF32
MMAs: wgmma where the tile has a warp group's 64 rows, mma.sync for the batch-1 fc's 32-unit tiles.

The layers are those of tests/test_sm90_conv.py (conv1 on conv.py, conv2..conv5 channels-last on conv_nhwc.py,
fc6..fc8 and LeNet's 120 -> 84 fc) at batch 128 and 1, and the one-kernel conv + ReLU + LRN + max-pool stage for
conv1 and conv2. The launchers run on "meta" tensors, so the specialization is a real launch's. No GPU is needed;
run with `-s` for the resource table.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import pytest
import torch
from test_sm90_conv import CONV_LAYERS, FC_LAYERS, identity, meta, specialize
from test_sm90_conv_nhwc import LAYERS as NHWC_LAYERS

from netdsl.codegen import conv, conv_lrn_pool, conv_nhwc, fc
from netdsl.codegen.target import SM90_MAX_SHARED_BYTES, CompileRequest, compile_sm90_many, format_table

pytestmark = pytest.mark.slow

F32 = torch.float32
BATCHES = (128, 1)
ALEXNET_LRN = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0}
CASES = [("conv", "conv1", batch) for batch in BATCHES]
CASES += [("conv_nhwc", layer, batch) for layer in NHWC_LAYERS for batch in BATCHES]
CASES += [("fc", layer, batch) for layer in FC_LAYERS for batch in BATCHES]
CASES += [("conv_lrn_pool", layer, 128) for layer in ("conv1", "conv2")]


def channels_last(*shape: int) -> torch.Tensor:
    return meta(*shape, dtype=F32).contiguous(memory_format=torch.channels_last)


def request(family: str, layer: str, batch: int) -> CompileRequest:
    """The compile request of one launch in tf32x3, as the launcher makes it."""
    if family == "conv":
        (shape,), weight, stride, padding = CONV_LAYERS[layer]
        _, arguments = conv.conv2d_launch(
            meta(batch, *shape, dtype=F32), meta(*weight, dtype=F32), meta(weight[0], dtype=F32), stride, padding,
            activation="relu", input_precision="tf32x3",
        )  # fmt: skip
        kernel = conv.conv2d_kernel
    elif family == "conv_nhwc":
        shape, weight, stride, padding = NHWC_LAYERS[layer]
        _, arguments = conv_nhwc.conv2d_nhwc_launch(
            channels_last(batch, *shape), channels_last(*weight), meta(weight[0], dtype=F32), stride, padding,
            activation="relu", input_precision="tf32x3",
        )  # fmt: skip
        kernel = conv_nhwc.conv2d_nhwc_kernel
    elif family == "fc":
        inputs, weight = FC_LAYERS[layer]
        _, arguments = fc.linear_launch(
            [meta(batch, *shape, dtype=F32) for shape in inputs], meta(*weight, dtype=F32), meta(weight[0], dtype=F32),
            activation="relu", input_precision="tf32x3",
        )  # fmt: skip
        kernel = fc.linear_kernel
    else:
        (shape,), weight, stride, padding = CONV_LAYERS[layer]
        _, arguments = conv_lrn_pool.conv_lrn_maxpool_launch(
            meta(batch, *shape, dtype=F32), meta(*weight, dtype=F32), meta(weight[0], dtype=F32), stride, padding, 1,
            1, *ALEXNET_LRN.values(), 3, 2, input_precision="tf32x3",
        )  # fmt: skip
        kernel = conv_lrn_pool.conv_lrn_pool_kernel
    plain = specialize(kernel, arguments)
    return CompileRequest(
        plain.kernel, plain.signature, plain.constexprs, plain.num_warps, plain.num_stages, sass=True,
        divisible_by_16=plain.divisible_by_16,
    )  # fmt: skip


@cache
def compiled() -> dict:
    """(family, layer, batch) -> KernelResources; identical specializations compile once, in two child processes
    side by side under the interpreter."""
    requests = {case: request(*case) for case in CASES}
    unique = list({identity(r): r for r in requests.values()}.values())
    halves = [unique[0::2], unique[1::2]]
    with ThreadPoolExecutor(max_workers=2 if os.environ.get("TRITON_INTERPRET") == "1" else 1) as pool:
        results = [result for half in pool.map(compile_sm90_many, halves) for result in half]
    by_identity = {identity(r): result for r, result in zip(halves[0] + halves[1], results, strict=True)}
    print("\n" + format_table(list(by_identity.values())))
    return {case: by_identity[identity(r)] for case, r in requests.items()}


@pytest.mark.parametrize(("family", "layer", "batch"), CASES)
def test_tf32x3_compiles_for_sm90_on_tensor_cores_without_spills(family: str, layer: str, batch: int):
    result = compiled()[family, layer, batch]
    table = format_table([result])
    assert result.constexprs["INPUT_PRECISION"] == "tf32x3", table
    assert result.spill_stores == 0 and result.spill_loads == 0 and result.stack_bytes == 0, table
    assert result.shared_bytes <= SM90_MAX_SHARED_BYTES, table
    # wgmma where the tile allows (a warp group's 64 rows), mma.sync for the batch-1 fc's 32-unit tiles.
    assert {"wgmma.mma_async", "mma.sync"} & set(result.mma) and {"HGMMA", "HMMA"} & set(result.mma), table
    # Three MMAs per product where tf32 issues one: the split really happened (and was not folded away).
    assert result.ptx.count("cvt.rna.tf32.f32") > 0, table
