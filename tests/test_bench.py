"""The benchmark scripts keep working between GPU leases: their CPU paths run here (no timing is judged)."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conv_sweep_smoke(capsys):
    """Every layer's shape at a tiny size under the interpreter: the kernel agrees with F.conv2d."""
    assert script("conv_sweep").main(["--smoke", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "WRONG" not in out and "Error" not in out
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        assert f"\n{layer} " in out
    assert out.count(" nhwc ") == 4  # the channels-last variant for every layer but conv1 (3 channels)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_gpu_benchmarks_say_there_is_no_gpu(capsys):
    assert script("alexnet_gpu").main(["--batches", "1"]) == 0
    assert script("conv_sweep").main([]) == 0
    assert capsys.readouterr().out.count("no CUDA GPU here") == 2
