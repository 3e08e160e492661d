"""The channel shuffle kernel builds for the H100 (sm_90) without spills: as a net launches it (NCHW and
channels-last maps, recorded from the generated files' own launchers) and for maps whose height and width do not
fold into one axis, in every dtype. No GPU needed: Triton's CUDA backend runs on the CPU."""

from pathlib import Path

import pytest

from netdsl.codegen import shuffle
from netdsl.codegen.target import SM90_MAX_REGISTERS, CompileRequest, compile_sm90_many, format_table
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.launches import record_launches, sm90_resources
from netdsl.compiler.passes import Options

# A shuffle between channels-last convs (32 channels), and one on an NCHW map (3 channels in, 12 out).
NET = """
net shuffles
input image: 3 x 17 x 17
a = conv(image, 12, size=3) | relu | shuffle(3) | maxpool(2)
b = conv(image, 32, size=3) | relu | shuffle(4)
c = conv(b, 32, size=3, groups=2)
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NETDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "sm90-cache"))


def fits(report: dict) -> bool:
    return report["spill_stores"] == report["spill_loads"] == 0 and 0 < report["registers"] <= SM90_MAX_REGISTERS


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_shuffles_of_a_net_build_without_spills(tmp_path: Path, dtype):
    path = tmp_path / "shuffles.net"
    path.write_text(NET)
    compiled = compile_net(path, Options(batch=8, dtype=dtype))
    steps = [compiled.program.nodes[name]["step"] for name in compiled.program]
    assert {step.layout for step in steps if step.kind == "shuffle"} == {"nchw", "nhwc"}
    out = write_build(compiled, tmp_path / "build")
    files = sorted((out / "kernels").glob("*_shuffle.py"))
    assert len(files) == 2
    built = sm90_resources(record_launches(files, 8, dtype))
    assert len(built) == 2
    for step, report in built.items():
        assert fits(report), (step, report)
        assert report["mma"] == [], (step, report)


def test_the_unfolded_pixel_addressing_builds_without_spills():
    """FOLD_HW=False (rows and columns worked out per pixel), with runtime strides, in 16-bit types."""
    arguments = shuffle.shuffle_kernel.arg_names
    requests = []
    for dtype in ("fp16", "bf16", "fp32"):
        for config in (shuffle.CONFIGS[0], shuffle.CONFIGS[5], shuffle.CONFIGS[-1]):
            constexprs = {"FOLD_HW": False, "BLOCK_C": config.BLOCK_C, "BLOCK_S": config.BLOCK_S}
            signature = {
                name: "constexpr" if name in constexprs else f"*{dtype}" if name.endswith("_ptr") else "i32"
                for name in arguments
            }
            requests.append(CompileRequest(shuffle.shuffle_kernel, signature, constexprs, config.num_warps, sass=False))
    for result in compile_sm90_many(requests):
        table = format_table([result])
        assert result.spill_stores == result.spill_loads == result.local_bytes == 0, table
        assert 0 < result.registers <= SM90_MAX_REGISTERS, table
        assert result.mma == (), table
