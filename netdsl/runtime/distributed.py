"""One partition per process: a net's logical devices run in the ranks of a torch.distributed job.

Rank r owns the r-th logical device of the net in sorted order (`gpu0` -> rank 0, `gpu1` -> rank 1),
and the world size must equal the number of logical devices. Every rank compiles the whole net with
`netdsl.runtime.net.Net` (which also holds the weights) with every logical device on this rank's
device, then runs its own partition with `Net.run_partition`, which walks the global step order
(`Net.order`) doing only:

- its own steps (inputs are copied in locally: every rank is given the same input);
- for a `transfer` step on its device, a `dist.recv` from the rank owning the source device;
- after a step of its own that a step on another device reads, a `dist.isend` of a copy of the output
  to that device's rank (one per reading device; a copy because the memory plan reuses arena space).

Sends never block and every recv's matching send comes earlier in the one global order that all
ranks follow, so no rank waits on a rank that waits on it. The net's outputs are returned on the
rank owning them (None elsewhere).

Launch (two logical devices -> two processes):

    torchrun --nproc-per-node 2 $(which netdsl) run nets/alexnet.net --distributed --random 1 --save out.npy

The process group is `gloo` on the CPU and `nccl` when CUDA is available (rank r uses
`cuda:<LOCAL_RANK>`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from netdsl.errors import NetError
from netdsl.runtime.net import Net

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _world() -> tuple[int, int]:
    """(rank, world size): from the process group when there is one, else from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [name for name in ENV if not os.environ.get(name)]
    if missing:
        raise NetError(
            f"no process group and no `{missing[0]}` in the environment",
            where="distributed",
            hint="launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), "
            "or call torch.distributed.init_process_group first",
        )
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise NetError(
            "RANK and WORLD_SIZE must be integers",
            where="distributed",
            hint="start the processes with torchrun, which sets them",
        ) from None


def _local_device() -> torch.device:
    """`cuda:<LOCAL_RANK>` under NCCL (or, before there is a group, when CUDA is available), else the CPU."""
    nccl = dist.get_backend() == "nccl" if dist.is_initialized() else torch.cuda.is_available()
    if not nccl:
        return torch.device("cpu")
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    index = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def run_distributed(
    path: str | Path,
    x: torch.Tensor | np.ndarray | Mapping[str, object],
    *,
    backend: str = "torch",
    weights: Mapping[str, object] | str | Path | None = None,
    seed: int = 0,
    init: str = "paper",
    dtype: str = "fp32",
    layout: str = "auto",
    precision: str | None = None,
    space_to_depth: bool = False,
    split_k: bool = False,
    tuning: str | Path | None = None,
):
    """Runs this rank's partition of the net at `path` on the input `x` (the same on every rank).

    Returns the net's output (a dict of this rank's outputs when the net has several) on the rank
    owning it, None on the others. Joins the default process group (env://; NCCL when CUDA is
    available, else gloo) when there is none yet; the caller destroys it."""
    rank, world = _world()
    local = _local_device()
    net = Net(
        path, backend=backend, weights=weights, seed=seed, init=init, dtype=dtype, layout=layout, devices=local,
        precision=precision, space_to_depth=space_to_depth, split_k=split_k, tuning=tuning,
    )  # fmt: skip
    logical = sorted(net.program.graph["partitions"])
    if world != len(logical):
        raise NetError(
            f"the net has {len(logical)} devices ({', '.join(logical)}), but the world size is {world}",
            where="distributed",
            hint=f"launch one process per device: torchrun --nproc-per-node {len(logical)} ...",
        )
    if not 0 <= rank < world:
        raise NetError(
            f"rank {rank} is outside the world of {world}",
            where="distributed",
            hint="start the processes with torchrun, which sets RANK below WORLD_SIZE",
        )
    if not dist.is_initialized():
        dist.init_process_group("nccl" if local.type == "cuda" else "gloo")
    rank_of = {name: i for i, name in enumerate(logical)}
    device_of = {name: net.program.nodes[name]["step"].device for name in net.program.nodes}
    tags = {name: i for i, name in enumerate(net.order)}  # a send's tag: its step's place in the order
    sends = []  # (work, payload): each payload stays alive until its isend completed

    def receive(source: str, out: torch.Tensor) -> None:
        buffer = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
        dist.recv(buffer, src=rank_of[device_of[source]], tag=tags[source])
        if buffer is not out:
            out.copy_(buffer)

    def send(name: str, output: torch.Tensor, devices: list[str]) -> None:
        for device in devices:
            payload = output.contiguous().clone()  # the memory plan may reuse the buffer before the send completes
            sends.append((dist.isend(payload, dst=rank_of[device], tag=tags[name]), payload))

    outputs = net.run_partition(logical[rank], x, receive, send)
    for work, _ in sends:
        work.wait()
    if not outputs:
        return None
    return next(iter(outputs.values())) if len(net.output_steps) == 1 else outputs
