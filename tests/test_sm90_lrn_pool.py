"""The LRN, LRN + max-pool and pooling kernels compile for the H100 (sm_90) without spills and within shared memory.

Shapes are one AlexNet tower's: LRN1 + pool1 on 48 x 55 x 55, LRN2 + pool2 on 128 x 27 x 27, pool5 on 128 x 13 x 13,
each at batch 1 and 128 (which pick different tiles); and both towers' LRNs in one launch (96 and 256 channels in
2 groups: the towers merged), with a case whose tiles straddle groups (6 groups of 8). No GPU is needed: Triton's
CUDA backend compiles here.
Run with `-s` to see the resource table.
"""

import inspect

import pytest

from netdsl.codegen import lrn as lrn_module
from netdsl.codegen import pool as pool_module
from netdsl.codegen.pool import pooled_size
from netdsl.codegen.target import SM90_MAX_SHARED_BYTES, CompileRequest, compile_sm90_many, format_table

DTYPES = ("fp32", "bf16")
BATCHES = (1, 128)
# (channels, height, width, groups) entering a fused LRN + 3x3/2 max-pool, and (channels, height, width) pool5's.
LRN_POOL_SHAPES = ((48, 55, 55, 1), (128, 27, 27, 1), (96, 55, 55, 2), (256, 27, 27, 2), (48, 55, 55, 6))
POOL5_SHAPE = (128, 13, 13)


def signature(kernel, dtype: str, constexprs: dict, floats: tuple[str, ...] = ()) -> dict[str, str]:
    """Triton types for every argument, the way a launch with contiguous tensors specializes them."""
    fn = getattr(kernel, "fn", kernel)
    types = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = f"*{dtype}"
        else:
            types[name] = "fp32" if name in floats else "i32"
    return types


def lrn_requests() -> list[CompileRequest]:
    requests = {}
    for (channels, height, width, groups), batch, dtype, pool in (
        (shape, batch, dtype, pool)
        for shape in LRN_POOL_SHAPES
        for batch in BATCHES
        for dtype in DTYPES
        for pool in (True, False)
    ):
        pixels = pooled_size(height, 3, 2, 0, False) * pooled_size(width, 3, 2, 0, False) if pool else height * width
        config = lrn_module.pick_config(batch, channels, pixels)
        constexprs = {
            "stride_xw": 1,
            "stride_ow": 1,
            "SIZE": 5,
            "POOL": pool,
            "POOL_KH": 3 if pool else 1,
            "POOL_KW": 3 if pool else 1,
            "RELU_FIRST": True,
            "GROUPING": lrn_module.grouping(channels, groups, config["BLOCK_C"]),
            "BLOCK_C": config["BLOCK_C"],
            "BLOCK_P": config["BLOCK_P"],
        }
        types = signature(lrn_module.lrn_pool_kernel, dtype, constexprs, floats=("alpha", "beta", "k"))
        key = (dtype, *constexprs.values(), config["num_warps"])
        requests[key] = CompileRequest(lrn_module.lrn_pool_kernel, types, constexprs, config["num_warps"])
    return list(requests.values())


def pool_requests() -> list[CompileRequest]:
    requests = {}
    channels, height, width = POOL5_SHAPE
    outputs = channels * pooled_size(height, 3, 2, 0, False) * pooled_size(width, 3, 2, 0, False)
    for batch in BATCHES:
        for dtype in DTYPES:
            for mode in ("max", "avg"):
                config = pool_module.pick_config(batch * outputs)
                constexprs = {
                    "stride_xw": 1,
                    "stride_ow": 1,
                    "KH": 3,
                    "KW": 3,
                    "MODE": mode,
                    "COUNT_INCLUDE_PAD": True,
                    "BLOCK": config["BLOCK"],
                }
                types = signature(pool_module.pool2d_kernel, dtype, constexprs)
                key = (dtype, *constexprs.values(), config["num_warps"])
                requests[key] = CompileRequest(pool_module.pool2d_kernel, types, constexprs, config["num_warps"])
    return list(requests.values())


@pytest.fixture(scope="module")
def compiled():
    results = compile_sm90_many(lrn_requests() + pool_requests())
    print("\n" + format_table(results))
    return results


@pytest.mark.slow
def test_no_spills_and_shared_memory_fits(compiled):
    table = format_table(compiled)
    for result in compiled:
        assert result.spills == 0, f"{result.name} spills:\n{table}"
        assert result.local_bytes == 0, f"{result.name} uses local memory:\n{table}"
        assert result.shared_bytes <= SM90_MAX_SHARED_BYTES, f"{result.name} needs too much shared memory:\n{table}"


@pytest.mark.slow
def test_every_variant_was_compiled(compiled):
    names = {result.name for result in compiled}
    assert any(name.startswith("lrn_pool_kernel") for name in names)
    assert any(name.startswith("pool2d_kernel") for name in names)
    fused = [r for r in compiled if r.constexprs.get("POOL") is True]
    plain = [r for r in compiled if r.constexprs.get("POOL") is False]
    assert {r.signature["x_ptr"] for r in fused} == {"*fp32", "*bf16"}
    assert {r.signature["x_ptr"] for r in plain} == {"*fp32", "*bf16"}
    assert {r.constexprs.get("GROUPING") for r in fused} == {"none", "tile", "channel"}
