"""One partition per process: a net's logical devices run in the ranks of a torch.distributed job.

Rank r owns the r-th logical device of the net in sorted order (`gpu0` -> rank 0, `gpu1` -> rank 1),
and the world size must equal the number of logical devices. Every rank compiles the whole net with
`netdsl.runtime.net.Net` (which also holds the weights), then walks the runtime's global step order
(`_run_order`), doing only:

- its own steps (inputs are copied in locally: every rank is given the same input);
- for a `transfer` step on its device, a `dist.recv` from the rank owning the source device;
- after a step of its own that a step on another device reads, a `dist.isend` of a copy of the output
  to that device's rank (one per reading device; a copy because the memory plan reuses arena space).

Sends never block and every recv's matching send comes earlier in the one global order that all
ranks follow, so no rank waits on a rank that waits on it. The net's outputs are returned on the
rank owning them (None elsewhere).

Launch (two logical devices -> two processes):

    torchrun --nproc-per-node 2 -m netdsl.runtime.distributed nets/alexnet.net --random 1 --save out.npy

The process group is `gloo` on the CPU and `nccl` when CUDA is available (rank r uses
`cuda:<LOCAL_RANK>`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from netdsl.errors import NetError

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
        raise NetError("RANK and WORLD_SIZE must be integers", where="distributed") from None


def _local_device() -> torch.device:
    """`cuda:<LOCAL_RANK>` under NCCL (or, before there is a group, when CUDA is available), else the CPU."""
    nccl = dist.get_backend() == "nccl" if dist.is_initialized() else torch.cuda.is_available()
    if not nccl:
        return torch.device("cpu")
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    index = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _rank_net(local: torch.device):
    """`Net` with every logical device on this process's device: only this rank's partition runs here
    (the others' weights and arena space are held too, unused)."""
    from netdsl.runtime.net import Net

    class RankNet(Net):
        def _map_devices(self, devices):
            return {name: local for name in self._partitions}

    return RankNet


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
):
    """Runs this rank's partition of the net at `path` on the input `x` (the same on every rank).

    Returns the net's output (a dict of this rank's outputs when the net has several) on the rank
    owning it, None on the others. Joins the default process group (env://; NCCL when CUDA is
    available, else gloo) when there is none yet; the caller destroys it."""
    rank, world = _world()
    local = _local_device()
    net = _rank_net(local)(path, backend=backend, weights=weights, seed=seed, init=init, dtype=dtype, layout=layout)
    logical = sorted(net.program.graph["partitions"])
    if world != len(logical):
        raise NetError(
            f"the net has {len(logical)} devices ({', '.join(logical)}), but the world size is {world}",
            where="distributed",
            hint=f"launch one process per device: torchrun --nproc-per-node {len(logical)} ...",
        )
    if not 0 <= rank < world:
        raise NetError(f"rank {rank} is outside the world of {world}", where="distributed")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if local.type == "cuda" else "gloo")
    mine = logical[rank]
    rank_of = {name: i for i, name in enumerate(logical)}
    steps = net._steps
    tags = {name: i for i, name in enumerate(net._order)}  # a send's tag: its step's place in the order

    inputs, batch = net._take_inputs(x)
    views = net.views(batch)
    sends = []  # (work, payload): each payload stays alive until its isend completed
    with torch.no_grad():
        for name in net._order:
            step = steps[name]
            if step.device != mine:
                continue
            if step.kind == "transfer":
                source = step.inputs[0]
                out = views[name]
                buffer = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
                dist.recv(buffer, src=rank_of[steps[source].device], tag=tags[source])
                if buffer is not out:
                    out.copy_(buffer)
            else:
                net._run_step(name, views, inputs)
            for device in sorted({steps[reader].device for reader in net.program.successors(name)} - {mine}):
                # A copy: the memory plan may reuse this buffer before the send completes.
                payload = views[name].contiguous().clone()
                sends.append((dist.isend(payload, dst=rank_of[device], tag=tags[name]), payload))
        for work, _ in sends:
            work.wait()
        outputs = {
            output: views[name].clone() for output, name in net.output_steps.items() if steps[name].device == mine
        }
    if not outputs:
        return None
    return next(iter(outputs.values())) if len(net.output_steps) == 1 else outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netdsl.runtime.distributed",
        description="Run a net with one partition per process (launch under torchrun, one process per device).",
    )
    parser.add_argument("net", type=Path, help="the .net file")
    parser.add_argument("--random", type=int, default=1, metavar="N", help="N random images (the same on every rank)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input and the default weights")
    parser.add_argument("--weights", type=Path, help="a safetensors file of weights")
    parser.add_argument("--init", choices=("paper", "he"), default="paper", help="default weights' scheme")
    parser.add_argument("--backend", choices=("torch", "triton"), default="torch")
    parser.add_argument("--save", type=Path, help="save the output (N x classes) as .npy, from the owning rank")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.backend == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from netdsl.ir import layer
        from netdsl.lang.frontend import load_graph

        graph = load_graph(args.net)
        if len(graph.graph["inputs"]) != 1:
            raise NetError("`python -m netdsl.runtime.distributed` feeds nets with one input", where=str(args.net))
        shape = layer(graph, graph.graph["inputs"][0]).shape
        generator = np.random.default_rng(args.seed)
        x = generator.standard_normal((args.random, *shape), dtype=np.float32)
        y = run_distributed(
            args.net, torch.from_numpy(x), backend=args.backend, weights=args.weights, seed=args.seed, init=args.init
        )
        if dist.is_initialized():
            dist.barrier()  # every rank's sends are received before the group goes away
    except NetError as error:
        if args.debug:
            raise
        print(error.format(), file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if y is not None:
        if isinstance(y, dict):
            y = next(iter(y.values()))
        scores = y.float().reshape(y.shape[0], -1).cpu()
        top = scores.argmax(dim=1).tolist()
        print(f"rank {os.environ.get('RANK', '0')}: top-1 class per input: {top}")
        if args.save:
            from netdsl.cli.run import _save

            _save(args.save, scores.numpy())
    return 0


if __name__ == "__main__":
    sys.exit(main())
