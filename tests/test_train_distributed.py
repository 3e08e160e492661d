"""`netdsl train` under torchrun's environment: two gloo processes on 127.0.0.1, each given half of every
batch, compute the steps one process computes with the whole batch; a process that dies ends the other
with a clear error, not a hang.

The processes are started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), without torchrun itself, so that a test can kill one of them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from netdsl.cli.main import main
from netdsl.train.checkpoint import load_checkpoint, rank_sums
from netdsl.train.runs import MEASURED

ROOT = Path(__file__).resolve().parents[1]
LENET = str(ROOT / "nets" / "lenet5.net")
TIMEOUT = 120  # seconds for a whole launch: a stuck group is killed, never waited on forever


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(world: int, args: list[str], cwd: Path, command: str = "train") -> list[subprocess.Popen]:
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
            "OMP_NUM_THREADS": "1",
        }
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        procs.append(subprocess.Popen([sys.executable, "-m", "netdsl", command, *args], cwd=cwd, env=env, text=True,
                                      **pipes))  # fmt: skip
    return procs


def _finish(procs: list[subprocess.Popen], printed: list[str] | None = None) -> list[tuple[int, str]]:
    """Each process's exit status and standard error (its standard output appended to `printed`)."""
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, err))
            if printed is not None:
                printed.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture
def digits_like(tmp_path) -> Path:
    rng = np.random.default_rng(4)
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x=rng.standard_normal((64, 1, 32, 32)).astype(np.float32),
        y=rng.integers(0, 10, 64),
        x_val=rng.standard_normal((10, 1, 32, 32)).astype(np.float32),
        y_val=rng.integers(0, 10, 10),
    )
    return path


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        LENET, "--data", str(data), "--batch", "16", "--steps", "6", "--lr", "0.02", "--init", "he",
        "--mean", "none", "--workers", "0", "--log-every", "2", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("parts,recompute,early", [(1, "none", False), (2, "all", True)])
def test_two_processes_with_half_batches_equal_one_process(tmp_path, digits_like, parts, recompute, early):
    """LeNet-5 (no dropout, no batch norm): 6 steps of batch 16, as 2 x 8 (each 8 in `parts` parts, averaged
    over the processes after the last; its chains run again in the backward passes with `recompute`) and as
    1 x 16, with flips and colour noise drawn per image; weights and momentum agree to float32 rounding of
    the averaged sums. `early`: 12 steps, but every process stops after epoch 2 (of 4 steps each), as no
    epoch can beat the first by 99 points; and each process keeps an average of the weights (`ema`), which
    rank 0 saves as the weights, the live ones beside it."""
    one, two = tmp_path / "one", tmp_path / "two"
    stop = ("--steps", "12", "--early-stop", "1", "--threshold", "0.99", "--ema", "0.7") if early else ()
    assert main(["train", *_args(digits_like, one, *stop)]) == 0
    extra = ("--accumulate", str(parts), "--recompute", recompute, *stop)
    results = _finish(_start(2, _args(digits_like, two, *extra), tmp_path))
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank}:\n{err}"
    assert "2 processes" in results[0][1] and "epoch" not in results[1][1]  # rank 0 speaks for the run
    assert ("stopped early after epoch 2" in results[0][1]) is early
    single, double = (load_checkpoint(run / "checkpoints" / "last.ckpt") for run in (one, two))
    assert single.state["step"] == double.state["step"] == (8 if early else 6)
    assert single.live.keys() == double.live.keys() and bool(single.live) is early
    for name, value in [*single.weights.items(), *(("live:" + k, v) for k, v in single.live.items())]:
        got = double.live[name[5:]] if name.startswith("live:") else double.weights[name]
        np.testing.assert_allclose(got.numpy(), value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    for name, state in single.optimizer.items():
        got, want = double.optimizer[name]["velocity"].numpy(), state["velocity"].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)
    assert any(name.startswith("rank1/") for name in double.rng)  # each rank's random state is kept


def test_a_dead_rank_ends_the_run_with_an_error_not_a_hang(tmp_path, digits_like):
    args = _args(digits_like, tmp_path / "run", "--steps", "100000", "--log-every", "1", "--timeout", "30")
    procs = _start(2, args, tmp_path)
    try:
        deadline = time.monotonic() + 90
        seen = []
        for line in procs[0].stderr:  # rank 0 is training once it logs a step
            seen.append(line)
            if " step 2/" in line or time.monotonic() > deadline:  # "epoch 1/N  step 2/M  loss ..."
                break
        assert seen and " step 2/" in seen[-1], "no second step logged:\n" + "".join(seen)
        procs[1].send_signal(signal.SIGKILL)
        code = procs[0].wait(timeout=90)  # a hang guard (TimeoutExpired fails the test), not a measurement
        err = procs[0].stderr.read()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 1, err
    assert "another process of the run stopped answering" in err and "Traceback" not in err


@pytest.mark.parametrize("signalled", [0, 1])
def test_a_signal_to_one_process_stops_both_at_one_step(tmp_path, digits_like, signalled):
    """SIGTERM to one rank of two (torchrun and schedulers signal each process at its own moment): both end the
    same step, rank 0 writes its checkpoint, and both exit 143; the run resumes under two processes. (One rank
    that stopped alone left the other in the next step's averaging, and the run ended in an error.)"""
    run = tmp_path / "run"
    procs = _start(2, _args(digits_like, run, "--steps", "100000", "--log-every", "1", "--timeout", "30"), tmp_path)
    try:
        deadline, seen = time.monotonic() + 90, []
        for line in procs[0].stderr:  # rank 0 is training once it logs a step
            seen.append(line)
            if " step 2/" in line or time.monotonic() > deadline:  # "epoch 1/N  step 2/M  loss ..."
                break
        assert seen and " step 2/" in seen[-1], "no second step logged:\n" + "".join(seen)
        procs[signalled].send_signal(signal.SIGTERM)
        results = _finish(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (code, err) in enumerate(results):
        assert code == 128 + signal.SIGTERM, f"rank {rank}:\n{err}"
        assert "Traceback" not in err and "stopped answering" not in err, f"rank {rank}:\n{err}"
    stopped = int(re.search(r"stopped at step (\d+)", results[0][1]).group(1))
    assert stopped >= 2 and load_checkpoint(run / "checkpoints" / "last.ckpt").state["step"] == stopped
    more = ["--resume", str(run), "--steps", str(stopped + 2), "--workers", "0"]
    for rank, (code, err) in enumerate(_finish(_start(2, more, tmp_path))):
        assert code == 0, f"rank {rank}:\n{err}"
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").state["step"] == stopped + 2


def test_the_group_carries_cpu_tensors_where_there_are_gpus(monkeypatch):
    """Where CUDA is there the group is NCCL for GPU tensors and gloo for CPU ones (the sums, gathers and the
    agreed stop: NCCL alone refuses CPU tensors), written as torch reads a backend per device; gloo without
    CUDA. (tests/test_gpu.py joins two processes so on a GPU.)"""
    import torch.distributed as dist

    from netdsl.train.world import backend

    assert backend() == "gloo" or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist.distributed_c10d.BackendConfig(backend()).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend() == "gloo"


def test_resume_under_two_processes(tmp_path, digits_like):
    """A two-process run stopped after 3 steps (inside its first epoch of 4) and resumed by two processes ends
    as one that ran 6: the same weights, and the same epoch record, whose loss and top-1 sum each rank's share
    of the steps before the stop too. (The schedule is constant: a cosine one follows the run's planned length,
    which --steps changes.) Each process mixes its share of every batch (`mixup`), by the batch's place and the
    process's rank."""
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    mixed = ("--schedule", "constant", "--mixup", "0.4")  # each rank mixes its share: from its rank, as resumed
    for run, extra in ((straight, mixed), (parts, (*mixed, "--steps", "3"))):
        for rank, (code, err) in enumerate(_finish(_start(2, _args(digits_like, run, *extra), tmp_path))):
            assert code == 0, f"rank {rank}:\n{err}"
    resume = ["--resume", str(parts), "--steps", "6", "--workers", "0"]
    for rank, (code, err) in enumerate(_finish(_start(2, resume, tmp_path))):
        assert code == 0, f"rank {rank}:\n{err}"
    one, two = (load_checkpoint(run / "checkpoints" / "last.ckpt") for run in (straight, parts))
    assert one.state["step"] == two.state["step"] == 6
    for name, value in one.weights.items():
        np.testing.assert_array_equal(two.weights[name].numpy(), value.numpy(), err_msg=name)
    assert len(two.state["rank_sums"]) == 2
    records = [_records(run) for run in (straight, parts)]
    kinds = [[(r["kind"], r["step"]) for r in run] for run in records]
    assert kinds[0] == [("step", 2), ("step", 4), ("epoch", 4), ("step", 6), ("final", 6)]
    # the first part logged its last step, 3, and measured its last weights, so the window of step 4 differs;
    # the epoch's record does not
    assert kinds[1] == [("step", 2), ("step", 3), ("final", 3), ("step", 4), ("epoch", 4), ("step", 6), ("final", 6)]
    assert records[0][2:] == records[1][4:] and records[0][0] == records[1][0]


def _records(run: Path) -> list[dict]:
    """The run's step and epoch records without their speed (images/s), which no two runs share."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED} for line in lines]


def test_towers_inside_each_process_and_processes_across(tmp_path):
    """A two-tower net with batch norm and dropout, both towers in each of two processes: it trains, and
    rank 0's checkpoint keeps every rank's random state (each rank draws dropout masks of its own)."""
    net = tmp_path / "towers.net"
    net.write_text(
        "net towers\ndevice gpu0, gpu1\ninput image: 3 x 12 x 12\n"
        "towers gpu0, gpu1 {\n    c = conv(image, 4, size=3, pad=1) | batchnorm | relu | maxpool(2)\n"
        "    f = fc(all c, 8) | relu | dropout(0.5)\n}\nout = fc(all f, 5) on gpu0\noutput out\n"
    )
    rng = np.random.default_rng(9)
    data = tmp_path / "t.npz"
    np.savez(data, x=rng.standard_normal((32, 3, 12, 12)).astype(np.float32), y=rng.integers(0, 5, 32))
    args = [str(net), "--data", str(data), "--batch", "8", "--steps", "4", "--workers", "0"]
    args += ["--out", str(tmp_path / "run")]
    for rank, (code, err) in enumerate(_finish(_start(2, args, tmp_path))):
        assert code == 0, f"rank {rank}:\n{err}"
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert saved.state["step"] == 4 and saved.state["world"] == 2
    assert {name.split("/")[0] for name in saved.rng} == {"rank0", "rank1"}
    assert not torch.equal(saved.rng["rank0/torch"], saved.rng["rank1/torch"])  # each rank its own dropout masks
    assert all(bool(torch.isfinite(value).all()) for value in saved.weights.values())


@pytest.mark.parametrize("rank,size", [(0, 2), (1, 2), (0, 1), (0, 3), (2, 3)])
def test_loss_sums_resumed_by_another_number_of_processes(rank, size):
    """Each rank resumes its own share of the sums saved by every rank; with another number of processes rank 0
    takes their total and the others none, so the sums over the world are the run's (checked without launching
    processes: `rank_sums` reads only the rank, the world's size and the checkpoint's record)."""
    saved = [[1.5, 3.0, 8.0, 0.5, 1.0, 4.0], [2.25, 5.0, 8.0, 0.75, 2.0, 4.0]]  # two ranks' epoch and window sums
    epoch, window = rank_sums({"rank_sums": saved, "epoch_sums": saved[0][:3]}, rank, size)
    if size == 2:
        assert [*epoch, *window] == saved[rank]
    else:
        assert [*epoch, *window] == ([3.75, 8.0, 16.0, 1.25, 3.0, 8.0] if rank == 0 else [0.0] * 6)
    old = rank_sums({"epoch_sums": saved[0][:3]}, rank, size)  # before rank_sums and window_sums
    assert old == ((saved[0][:3], [0.0] * 3) if rank == 0 else ([0.0] * 3, [0.0] * 3))


@pytest.mark.parametrize(
    "flags, models",
    [(("--views", "10", "--scales", "32,36"), 1), (("--dense", "--scales", "32,40"), 1), (("--views", "1"), 2)],
    ids=["views", "dense", "ensemble"],
)
def test_eval_under_torchrun_sums_each_processs_share(tmp_path, digits_like, capsys, flags, models):
    """`netdsl eval` in two processes: each measures every second image, rank 0 prints the summed tally, the
    one process's figures (the counts exactly; the mean loss to float32 rounding, summed in another order);
    rank 1 prints nothing. With one validation image, rank 1's share is empty. An ensemble (here of a run and
    its first checkpoint) sums each model's tally too."""
    run = tmp_path / "run"
    assert main(["train", *_args(digits_like, run)]) == 0
    weights = [str(run), *sorted(map(str, (run / "checkpoints").glob("*.ckpt")))][:models]
    assert len(weights) == models
    single = np.load(digits_like)
    lone = tmp_path / "lone.npz"  # one validation image
    np.savez(lone, x=single["x"][:8], y=single["y"][:8], x_val=single["x_val"][:1], y_val=single["y_val"][:1])
    for data, split in ((digits_like, "all"), (lone, "val")):
        args = [LENET, "--weights", *weights, "--data", str(data), "--split", split, "--workers", "0", *flags]
        capsys.readouterr()
        assert main(["eval", *args, "--save", str(tmp_path / "one.npz")]) == 0
        alone = capsys.readouterr().out
        printed = []
        args += ["--timeout", "60", "--save", str(tmp_path / "two.npz")]
        results = _finish(_start(2, args, tmp_path, command="eval"), printed)
        for rank, (code, err) in enumerate(results):
            assert code == 0, f"rank {rank}:\n{err}"
        assert printed[1] == "" and f"images {74 if split == 'all' else 1} " in printed[0]
        assert ("ensemble of 2" in printed[0]) == (models == 2)
        number = r"\d+(?:\.\d+)?"  # counts and percentages alike; the words between them the same
        assert re.sub(number, "#", printed[0]) == re.sub(number, "#", alone)
        for got, want in zip(re.findall(number, printed[0]), re.findall(number, alone), strict=True):
            assert float(got) == pytest.approx(float(want), abs=2e-4)  # a loss summed in another order
        one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")  # --save: rank 0 writes them all
        assert list(two["files"]) == list(one["files"]) and len(one["files"]) == (74 if split == "all" else 1)
        assert (two["labels"] == one["labels"]).all() and (two["predicted"] == one["predicted"]).all()
        np.testing.assert_allclose(two["probabilities"], one["probabilities"], rtol=0, atol=1e-5)


def test_a_path_the_system_refuses_is_each_ranks_error_under_torchrun(tmp_path):
    """`eval --data` with a name past the file system's 255 bytes, in two processes: pathlib's look-up raises
    an OSError no command foresaw; each rank says it as the one process does (exit 1, the path named, a hint),
    not as an internal error."""
    from netdsl.lang.frontend import load_graph
    from netdsl.runtime.weights import init_weights, save_weights

    save_weights(tmp_path / "w.safetensors", init_weights(load_graph(LENET)))
    args = [LENET, "--weights", "w.safetensors", "--data", "a" * 300, "--workers", "0"]
    for code, err in _finish(_start(2, args, tmp_path, "eval")):
        assert code == 1 and "is longer than the file system takes" in err and "hint: choose a shorter name" in err
        assert "internal error" not in err and "Traceback" not in err, err
