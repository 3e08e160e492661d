"""What only a GPU shows: the generated kernels compiled for it and run there, CUDA streams and events
between partitions, CUDA-graph capture and replay. Skipped on a machine without CUDA (the same kernels
run under Triton's interpreter in the rest of the suite).

References are independent of netdsl: the stored goldens (float64, hand-written models) for fp32, and
the hand-written models of tests/golden/models.py run in float64 on the CPU on fresh random inputs for
the other precisions. Errors are relative to the largest |reference|; the tolerances per precision:

- fp32 (exact products, "ieee"): 1e-4, as on the CPU;
- tf32 (10-bit mantissa products, fp32 accumulation): 1e-2;
- fp16 (11-bit data, fp32 accumulation): 1e-2;
- bf16 (8-bit data, fp32 accumulation): 5e-2 (a dozen layers, each rounding to 8 bits).

With NETDSL_GPU_REPORT=FILE set, each comparison appends its measured error to FILE.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from golden.models import MODELS, build, run
from golden.regenerate import golden_path, net_path

import netdsl
from netdsl import NetError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NETS = list(MODELS)
TOLERANCES = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 5e-2}
LOW_PRECISION_NETS = ["alexnet", "lenet5", "simplenet"]


def relative_error(got: torch.Tensor, want: np.ndarray) -> float:
    got = got.detach().double().cpu().numpy()
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), "non-finite outputs"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def report(what: str, error: float) -> None:
    path = os.environ.get("NETDSL_GPU_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(f"{what}\t{error:.3e}\n")


def fresh_input(net: str, batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *MODELS[net][1])).astype(np.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("net", NETS)
def test_fp32_matches_golden_on_gpu(net, backend, weights):
    with np.load(golden_path(net)) as stored:
        x, want = stored["input"], stored["output"]
    model = netdsl.load(net_path(net), backend=backend, weights=weights(net))
    assert all(device.type == "cuda" for device in model.devices.values())
    got = model(torch.from_numpy(x).cuda())
    assert got.is_cuda
    error = relative_error(got, want)
    report(f"golden fp32 {backend} {net}", error)
    assert error <= TOLERANCES["fp32"]


@pytest.mark.parametrize("dtype", ["tf32", "fp16", "bf16"])
@pytest.mark.parametrize("net", LOW_PRECISION_NETS)
def test_lower_precisions_on_gpu(net, dtype, weights):
    x = fresh_input(net, 2, seed=11)
    want = run(build(net, weights(net)), x.astype(np.float64))
    model = netdsl.load(net_path(net), backend="triton", dtype=dtype, weights=weights(net))
    got = model(torch.from_numpy(x).to("cuda", model.torch_dtype))
    error = relative_error(got, want)
    report(f"{dtype} triton {net} batch 2", error)
    assert error <= TOLERANCES[dtype]


def test_partition_streams_agree_with_one_step_at_a_time(weights):
    """Both towers of AlexNet on one GPU, one stream each with events between them, against the same
    steps run one after another (`profile`): equal bits, on many inputs (a missing wait shows here)."""
    model = netdsl.load(net_path("alexnet"), backend="triton", weights=weights("alexnet"))
    assert len(model._streams) == 2
    for seed in range(8):
        x = torch.from_numpy(fresh_input("alexnet", 3, seed)).cuda()
        concurrent = model(x)
        sequential, _ = model.profile(x)
        assert torch.equal(concurrent, sequential), seed


def test_one_stream_per_gpu_computes_what_two_streams_do(weights):
    """`streams="device"`: both towers' steps on one stream (what measures whether two streams overlap), the same
    bits as a stream each, eagerly and captured in a CUDA graph."""
    two = netdsl.load(net_path("alexnet"), backend="triton", weights=weights("alexnet"))
    one = netdsl.load(net_path("alexnet"), backend="triton", weights=weights("alexnet"), streams="device")
    graphed = netdsl.load(net_path("alexnet"), backend="triton", weights=weights("alexnet"), streams="device",
                          cuda_graph=True)  # fmt: skip
    assert len(set(one._streams.values())) == 1 and len(set(two._streams.values())) == 2
    for seed in range(4):
        x = torch.from_numpy(fresh_input("alexnet", 2, 300 + seed)).cuda()
        want = two(x)
        assert torch.equal(one(x), want) and torch.equal(graphed(x), want), seed


@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_replays_what_eager_computes(batch, weights):
    eager = netdsl.load(net_path("alexnet"), backend="triton", weights=weights("alexnet"))
    graphed = netdsl.load(net_path("alexnet"), backend="triton", weights=weights("alexnet"), cuda_graph=True)
    for seed in range(4):  # the first call runs eagerly, the second captures, later ones replay
        x = torch.from_numpy(fresh_input("alexnet", batch, 100 + seed)).cuda()
        assert torch.equal(graphed(x), eager(x)), seed
    assert batch in graphed._graphs

    # new weights: the old graph read the old tensors, so it is dropped and captured again
    changed = {name: value * 1.5 if name.endswith(".bias") else value for name, value in weights("alexnet").items()}
    eager.load_weights(changed)
    graphed.load_weights(changed)
    x = torch.from_numpy(fresh_input("alexnet", batch, 200)).cuda()
    assert torch.equal(graphed(x), eager(x))


def test_cuda_graph_needs_one_gpu():
    if torch.cuda.device_count() < 2:
        with pytest.raises(NetError, match="every partition on one GPU"):
            netdsl.load(net_path("lenet5"), devices={"gpu0": "cpu"}, cuda_graph=True)
    else:
        with pytest.raises(NetError, match="every partition on one GPU"):
            netdsl.load(net_path("alexnet"), devices={"gpu0": "cuda:0", "gpu1": "cuda:1"}, cuda_graph=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_agree_with_one(weights):
    x = torch.from_numpy(fresh_input("alexnet", 2, 7))
    one = netdsl.load(net_path("alexnet"), backend="triton", weights=weights("alexnet"),
                      devices={"gpu0": "cuda:0", "gpu1": "cuda:0"})  # fmt: skip
    two = netdsl.load(net_path("alexnet"), backend="triton", weights=weights("alexnet"),
                      devices={"gpu0": "cuda:0", "gpu1": "cuda:1"})  # fmt: skip
    assert torch.equal(one(x.cuda()).cpu(), two(x.cuda()).cpu())


def test_as_module_on_gpu(weights):
    module = netdsl.load(net_path("lenet5"), backend="triton", weights=weights("lenet5")).as_module()
    x = fresh_input("lenet5", 5, 3)
    want = run(build("lenet5", weights("lenet5")), x.astype(np.float64))
    head = torch.nn.Sequential(module, torch.nn.Softmax(dim=1))
    got = head(torch.from_numpy(x).cuda())
    assert relative_error(got, torch.softmax(torch.from_numpy(want), 1).numpy()) <= 1e-4


def test_nan_inputs_on_the_gpu_are_refused(weights):
    """Checked after the pass is enqueued (so the check does not stall the launches), still an error."""
    model = netdsl.load(net_path("lenet5"), backend="triton", weights=weights("lenet5"))
    x = torch.from_numpy(fresh_input("lenet5", 2, 4)).cuda()
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(NetError, match="contains NaN"):
        model(x)
    x[1, 0, 3, 3] = float("inf")
    with pytest.raises(NetError, match="infinite"):
        model.profile(x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_scores_on_the_gpu(backend, weights):
    """VGG's dense evaluation on the GPU (LeNet-5 over images of two sizes, the second size's net holding the
    first's tensors there): the CPU's fp32 probabilities, and under bf16 autocast within bf16's rounding."""
    from netdsl.lang.frontend import load_graph
    from netdsl.train.evaluate import DenseScores

    graph, given = load_graph(net_path("lenet5")), weights("lenet5")
    cpu = DenseScores(graph, given, devices="cpu", flip=True)
    exact = DenseScores(graph, given, devices="cuda", flip=True, backend=backend)
    half = DenseScores(graph, given, devices="cuda", flip=True, backend=backend, dtype="bf16")
    rng = np.random.default_rng(12)
    for shape in ((1, 40, 36), (1, 32, 48)):
        x = rng.standard_normal((3, *shape), dtype=np.float32)
        want = cpu.batch_scores(x).double().numpy()
        for scorer, dtype in ((exact, "fp32"), (half, "bf16")):
            error = relative_error(scorer.batch_scores(x), want)
            report(f"dense lenet5 {backend} {dtype} {shape[1]}x{shape[2]}", error)
            assert error <= TOLERANCES[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_features_on_the_gpu(backend, weights):
    """`netdsl neighbours`' values of AlexNet's last hidden layer (both towers' fc7) computed on the GPU: the
    CPU's, within fp32's rounding (the towers' copies across the one device)."""
    from netdsl.lang.frontend import load_graph
    from netdsl.train.features import Features, feature_layers

    graph, given = load_graph(net_path("alexnet")), weights("alexnet")
    names = feature_layers(graph)
    x = np.random.default_rng(13).standard_normal((2, 3, 227, 227), dtype=np.float32)
    want, scores = Features(graph, given, names, devices="cpu")(x)
    got, on_gpu = Features(graph, given, names, devices="cuda", backend=backend)(x)
    for name, error in (("fc7", relative_error(got, want.double().numpy())),
                        ("prob", relative_error(on_gpu, scores.double().numpy()))):  # fmt: skip
        report(f"features alexnet {backend} {name}", error)
        assert error <= TOLERANCES["fp32"]


JOIN_AND_SUM = """
import sys
from netdsl.train.world import World
world = World(int(sys.argv[1]), 2)
world.join(60)
assert world.sum([world.rank + 1.0]) == [3.0], "sum"
assert world.largest(15 * world.rank) == 15, "largest"
assert world.gather(world.rank) == [0, 1], "gather"
world.barrier()
print("joined and summed")
"""


def test_processes_with_a_gpu_sum_on_the_cpu(tmp_path):
    """Two processes of a run join its group as `netdsl train` does under torchrun where there is a GPU: NCCL
    for the gradients on the GPU, gloo for the CPU tensors of the sums, gathers and the agreed stop, which NCCL
    alone refuses ("No backend type associated with device type cpu"). Only CPU collectives run here, so the
    two may share one GPU."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [
        subprocess.Popen([sys.executable, "-c", JOIN_AND_SUM, str(rank)], env={**env, "RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        for rank in range(2)
    ]  # fmt: skip
    try:
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and "joined and summed" in out, err[-2000:]
