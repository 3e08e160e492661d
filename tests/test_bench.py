"""The benchmark scripts keep working between GPU leases: their CPU paths run here (no timing is judged)."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import netdsl

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
    # ... which has the space-to-depth rewrite instead, checked against F.conv2d too
    assert len(re.findall(r"^conv1 +s2d \d+x\d+x\d+ ", out, flags=re.MULTILINE)) == 1


def test_step_sweep_smoke(capsys):
    """The fc and LRN + max-pool steps at tiny sizes under the interpreter: today's tiles agree with PyTorch."""
    assert script("step_sweep").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+1\s+(fc|norm)\d\s+PyTorch", line)]
    assert [row[1] for row in rows] == ["fc6", "fc7", "fc8", "norm1", "norm2"]
    for row in rows:
        assert float(row[5]) <= 1e-5, row  # relative error of today's tile against PyTorch, fp32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_gpu_benchmarks_say_there_is_no_gpu(capsys):
    assert script("alexnet_gpu").main(["--batches", "1"]) == 0
    assert script("alexnet_gpu").main(["--batches", "1", "--net", "vgg16"]) == 0
    assert script("conv_sweep").main([]) == 0
    assert script("step_sweep").main([]) == 0
    assert capsys.readouterr().out.count("no CUDA GPU here") == 4


def test_frontend_smoke(capsys):
    """The front-end benchmark at two small sizes, one run each: its table lists every net with the
    layer count asked for."""
    frontend = script("frontend")
    assert frontend.main(["--sizes", "20,200", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "reproduce: python bench/frontend.py --runs 1 --sizes 20,200" in out
    rows = re.findall(r"^(alexnet\.net|generated [\d,]+) +([\d,]+) ", out, re.MULTILINE)  # net, layers
    assert rows == [("alexnet.net", "45"), ("generated 20", "20"), ("generated 200", "200")]
    assert "stages of generated 200:" in out
    assert "target: AlexNet" in out and "Traceback" not in out


@pytest.mark.parametrize("layers", [20, 21, 25, 26, 27, 100, 1_000])
def test_frontend_generated_net_has_exactly_the_layers_asked_for(layers):
    text = script("frontend").generated_net(layers)
    assert netdsl.graph_from_text(text, f"generated_{layers}.net").number_of_nodes() == layers


def test_frontend_rejects_sizes_below_its_smallest_net(capsys):
    frontend = script("frontend")
    with pytest.raises(ValueError, match="at least 20 layers"):
        frontend.generated_net(19)
    with pytest.raises(SystemExit):
        frontend.main(["--sizes", "10,100"])
    assert "each size must be at least 20 layers" in capsys.readouterr().err


def test_train_step_benchmark_smoke(capsys):
    """netdsl's training step and the hand-written loop's, one tiny step each: the table has its row."""
    assert script("train").main(["--smoke", "--gpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^lenet5 +2 +[\d,.]+ +[\d,]+ +[\d,.]+ +[\d,]+ +[\d.]+x$", out, re.MULTILINE), out
    if not torch.cuda.is_available():
        assert "no CUDA GPU here" in out
