"""netdsl.runtime.distributed: one partition per process (gloo on 127.0.0.1) gives the single-process output."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from netdsl.errors import NetError
from netdsl.runtime.distributed import run_distributed
from netdsl.runtime.net import Net

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # seconds per launch: a stuck process group is killed, never waited on forever

TWO_TOWERS = """\
net two_towers
device gpu0, gpu1
input image: 3 x 35 x 35

towers gpu0, gpu1 {
    conv1 = conv(image, 8, size=5, stride=2) | relu | lrn | maxpool(3, stride=2)
    conv3 = conv(all conv1, 8, size=3, pad=1) | relu
    fc6   = fc(all conv3, 16) | relu
}

fc8  = fc(all fc6, 10) on gpu0
prob = softmax(fc8)
output prob
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(
    net: Path, out: Path, world: int, batch: int, seed: int, extra: tuple[str, ...] = ()
) -> list[subprocess.CompletedProcess]:
    """`netdsl run --distributed` once per rank, as torchrun would."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "CUDA_VISIBLE_DEVICES": "",  # gloo on the CPU even on a GPU machine
            "OMP_NUM_THREADS": "2",
        }
        command = [sys.executable, "-m", "netdsl", "run", str(net), "--distributed", "--backend", "torch"]
        command += ["--random", str(batch)]
        command += ["--seed", str(seed), "--init", "he", "--save", str(out), *extra]
        procs.append(
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _single_process(net: Path, batch: int, seed: int, dtype: str = "fp32") -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((batch, *_input_shape(net)), dtype=np.float32)
    model = Net(net, init="he", seed=seed, dtype=dtype)
    y = model(torch.from_numpy(x).to(model.torch_dtype))
    return y.reshape(batch, -1).float().numpy()


def _input_shape(net: Path) -> tuple[int, ...]:
    (shape,) = Net(net).input_shapes.values()
    return shape


@pytest.mark.parametrize("which", ["two_towers", "alexnet"])
def test_two_processes_match_one(tmp_path, which):
    if which == "alexnet":
        net = ROOT / "nets" / "alexnet.net"
    else:
        net = tmp_path / "two_towers.net"
        net.write_text(TWO_TOWERS)
    out = tmp_path / "out.npy"
    results = _launch(net, out, world=2, batch=2, seed=3)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout}\n{result.stderr}"
    assert "input 1: top 5" in results[0].stdout and "top" not in results[1].stdout  # the output is on gpu0 = rank 0
    # float32 through AlexNet: the processes' and this one's thread pools sum in other orders (a few ulps)
    np.testing.assert_allclose(np.load(out), _single_process(net, batch=2, seed=3), rtol=2e-5, atol=1e-9)


def test_wrong_world_size(tmp_path, monkeypatch):
    net = tmp_path / "two_towers.net"
    net.write_text(TWO_TOWERS)
    for key, value in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(NetError, match=r"2 devices .* world size is 3"):
        run_distributed(net, torch.zeros(1, 3, 35, 35))


def test_wrong_world_size_from_the_command_line(tmp_path):
    net = tmp_path / "two_towers.net"
    net.write_text(TWO_TOWERS)
    (result,) = _launch(net, tmp_path / "out.npy", world=1, batch=1, seed=0)
    assert result.returncode == 1
    assert "world size is 1" in result.stderr and "--nproc-per-node 2" in result.stderr
    assert not (tmp_path / "out.npy").exists()


def test_no_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(NetError, match="torchrun"):
        run_distributed(ROOT / "nets" / "alexnet.net", torch.zeros(1, 3, 227, 227))


def test_netdsl_run_distributed_matches_one_process(tmp_path):
    net = tmp_path / "two_towers.net"
    net.write_text(TWO_TOWERS)
    out = tmp_path / "out.npy"
    results = _launch(net, out, world=2, batch=2, seed=5)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout}\n{result.stderr}"
    assert "input 1: top 5" in results[0].stdout and "top" not in results[1].stdout
    np.testing.assert_allclose(np.load(out), _single_process(net, batch=2, seed=5), rtol=2e-5, atol=1e-7)


def test_distributed_in_bfloat16_matches_one_process(tmp_path):
    """--dtype reaches every rank: bf16 maps cross the process boundary and give one process's bits."""
    net = tmp_path / "two_towers.net"
    net.write_text(TWO_TOWERS)
    out = tmp_path / "out.npy"
    results = _launch(net, out, world=2, batch=2, seed=6, extra=("--dtype", "bf16"))
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout}\n{result.stderr}"
    assert "bf16" not in results[1].stdout
    np.testing.assert_array_equal(np.load(out), _single_process(net, batch=2, seed=6, dtype="bf16"))
