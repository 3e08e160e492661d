"""Every kernel that the nets in nets/ produce builds for the H100 (Triton's CUDA backend for
GPUTarget("cuda", 90, 32), no GPU needed): no spills, registers and shared memory within an SM's
limits, and AlexNet's conv and fc kernels use tensor-core MMA instructions in bf16 and TF32."""

from pathlib import Path

import pytest

from netdsl.codegen.target import SM90_MAX_REGISTERS, SM90_MAX_SHARED_BYTES
from netdsl.compiler.compile import compile_net, write_build
from netdsl.compiler.launches import record_launches, sm90_resources
from netdsl.compiler.passes import Options

ROOT = Path(__file__).resolve().parent.parent
NETS = sorted((ROOT / "nets").glob("*.net"))

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NETDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "sm90-cache"))


def resources(tmp_path: Path, net: Path, batch: int, dtype: str):
    compiled = compile_net(net, Options(batch=batch, dtype=dtype), "tf32" if dtype == "tf32" else "ieee")
    out = write_build(compiled, tmp_path / net.stem)
    launches = record_launches(sorted((out / "kernels").glob("*.py")), batch, dtype)
    return compiled.program, sm90_resources(launches)


@pytest.mark.parametrize("net", NETS, ids=lambda p: p.stem)
def test_every_kernel_builds_without_spills(tmp_path, net):
    _, built = resources(tmp_path, net, 1, "fp32")
    assert built
    for step, r in built.items():
        assert r["spill_stores"] == r["spill_loads"] == 0, (step, r)
        assert 0 < r["registers"] <= SM90_MAX_REGISTERS, (step, r)
        assert r["shared_bytes"] <= SM90_MAX_SHARED_BYTES, (step, r)


@pytest.mark.parametrize("dtype", ["bf16", "tf32"])
def test_alexnet_conv_and_fc_use_tensor_cores(tmp_path, dtype):
    program, built = resources(tmp_path, ROOT / "nets/alexnet.net", 128, dtype)
    for step, r in built.items():
        kind = program.nodes[step]["step"].kind
        assert r["spill_stores"] == r["spill_loads"] == 0, (step, r)
        if kind in ("conv", "fc"):
            assert any(name in r["mma"] for name in ("wgmma.mma_async", "mma.sync")), (step, r["mma"])


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_alexnet_builds_without_spills_at_batch_128(tmp_path, dtype):
    """The other two dtypes at the batch size the tiles were tuned for (exact fp32's dot keeps its
    operands in registers: the widest tiles spill there)."""
    _, built = resources(tmp_path, ROOT / "nets/alexnet.net", 128, dtype)
    for step, r in built.items():
        assert r["spill_stores"] == r["spill_loads"] == 0, (step, r)
        assert r["shared_bytes"] <= SM90_MAX_SHARED_BYTES, (step, r)


@pytest.mark.parametrize("batch", [128, 32])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_merged_towers_build_without_spills(tmp_path, dtype, batch):
    """AlexNet's towers merged into grouped launches (--merge-towers): conv3 and the fcs twice as wide, conv2,
    conv4 and conv5 of two groups (whose tiles count together when the tile size is picked)."""
    options = Options(batch=batch, dtype=dtype, merge_towers=True)
    compiled = compile_net(ROOT / "nets/alexnet.net", options, "ieee")
    out = write_build(compiled, tmp_path / "merged")
    built = sm90_resources(record_launches(sorted((out / "kernels").glob("*.py")), batch, dtype))
    assert len(built) == 12
    for step, r in built.items():
        assert r["spill_stores"] == r["spill_loads"] == 0, (step, r)
        assert r["shared_bytes"] <= SM90_MAX_SHARED_BYTES, (step, r)
        if dtype == "bf16" and compiled.program.nodes[step]["step"].kind in ("conv", "fc"):
            assert any(name in r["mma"] for name in ("wgmma.mma_async", "mma.sync")), (step, r["mma"])
