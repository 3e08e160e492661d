"""The processes of a data-parallel run: who this process is, and the process group they share.

Launched by `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment), each
process trains one shard of every batch and DistributedDataParallel averages the gradients (gloo on
the CPU, NCCL on GPUs; several machines through torchrun's rendezvous). Without torchrun there is one
process and no group. Every collective waits at most `timeout` seconds, so a rank that dies ends the
others with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from netdsl.errors import NetError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # the processes on this machine (torchrun's LOCAL_WORLD_SIZE)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """The process that writes files and prints (rank 0)."""
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> World:
        if not os.environ.get("WORLD_SIZE"):
            return cls()
        missing = [name for name in LAUNCH_VARIABLES if not os.environ.get(name)]
        if missing:
            raise NetError(
                f"WORLD_SIZE is set but `{missing[0]}` is not",
                where="torchrun",
                hint="launch with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT",
            )
        try:
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local = int(os.environ.get("LOCAL_RANK", rank))
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        except ValueError:
            raise NetError(
                "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole numbers",
                where="torchrun",
                hint="start the processes with torchrun, which sets them",
            ) from None
        if size < 1 or not 0 <= rank < size:
            raise NetError(
                f"rank {rank} is outside a world of {size}",
                where="torchrun",
                hint="start the processes with torchrun, which sets RANK below WORLD_SIZE",
            )
        return cls(rank, size, local, max(1, local_size))

    def join(self, timeout: float) -> None:
        """Joins the process group (`backend()`)."""
        if not self.distributed or dist.is_initialized():
            return
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        try:
            dist.init_process_group(backend(), timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as error:
            raise NetError(
                f"cannot join the process group: {_first_line(error)}",
                where="torchrun",
                hint="check MASTER_ADDR and MASTER_PORT, and that every process started (torchrun --nproc-per-node N)",
            ) from None

    # Each collective below that fails (another rank died, or stopped answering within the timeout) is the
    # run's error saying so, wherever the run is: at its start, at a step's log line or at an epoch's end.

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over every rank (the values themselves with one process)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        with _answered():
            dist.all_reduce(tensor)
        return tensor.tolist()

    def largest(self, value: int) -> int:
        """The largest of every rank's `value` (`value` itself with one process)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        with _answered():
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def gather(self, value: object) -> list[object]:
        """Every rank's `value`, in rank order (a list of one with one process)."""
        if not self.distributed:
            return [value]
        result: list[object] = [None] * self.size
        with _answered():
            dist.all_gather_object(result, value)
        return result

    def barrier(self) -> None:
        if self.distributed:
            with _answered():
                dist.barrier()

    def device_map(self, graph, devices: dict[str, str] | str | None) -> dict[str, str] | str:
        """The torch device of each logical device of `graph`: as given (`--devices`), else every partition
        on this process's GPU(s) (rank r of a run with k devices per net takes GPUs r*k .. r*k+k-1) or the
        CPU."""
        if devices is not None:
            return devices
        logical = list(dict.fromkeys(item.device for item in (graph.nodes[n]["layer"] for n in graph.nodes)))
        if not torch.cuda.is_available():
            return "cpu"
        count = torch.cuda.device_count()
        return {name: f"cuda:{(self.local_rank * len(logical) + i) % count}" for i, name in enumerate(logical)}


def backend() -> str:
    """gloo for the tensors on the CPU, and NCCL for those on GPUs where there are some: DDP averages gradients on
    the GPUs, while the sums, the gathers and the stop of a run (`World`) travel as CPU tensors, which NCCL alone
    cannot carry ("No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def _answered():
    try:
        yield
    except RuntimeError as error:  # gloo's and NCCL's errors (DistBackendError among them) are RuntimeErrors
        raise lost_rank_error(error) from None


def collective_failure(error: RuntimeError) -> bool:
    """Whether an error raised inside a step (DDP's averaging in the backward pass) is a collective's that
    failed: another rank died or stopped answering."""
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def lost_rank_error(error: BaseException) -> NetError:
    """What a process says when a collective failed: another rank died or stopped answering."""
    return NetError(
        f"another process of the run stopped answering ({_first_line(error)})",
        where="torchrun",
        hint="look at the other ranks' output for the first error; resume with --resume RUN",
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
