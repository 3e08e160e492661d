"""How much memory does a training step take, with its batch whole and in parts (`--accumulate`), and with
layers computed again in the backward pass (`--recompute`)?

    python bench/train_memory.py                                 # CPU: AlexNet (one device) at batch 64
    python bench/train_memory.py --net nets/simplenet.net --batch 128 --parts 1,2,4
    python bench/train_memory.py --parts 1 --recompute none,cheap,all
    python bench/train_memory.py --gpu                           # on a GPU: its allocator's peak
    python bench/train_memory.py --smoke                         # tiny sizes: the code path runs

Each row is a fresh process that runs `netdsl train` for one step on seeded random images (an .npz written
once) and measures that step alone: on the CPU (Linux) the resident high-water mark over the step (VmHWM,
reset before it through /proc/self/clear_refs) less the memory resident before it; on a GPU
`torch.cuda.max_memory_allocated` over the step less what was allocated before it. The first step
allocates the gradients and the optimizer's state, the same for every row (twice the weights for SGD with
momentum); what the parts save is the activations the backward pass keeps, about in proportion to the
part's size, and what `recompute` saves is what the layers it runs again would have kept. The step time
is the first step's, allocation included: a rough figure (bench/train.py times steps properly).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

from arguments import positive_int, positive_ints, recompute_modes, settle_smoke  # noqa: E402
from timing import no_gpu  # noqa: E402


def _resident(field: str) -> int:
    """A figure of /proc/self/status in bytes: VmRSS (resident now) or VmHWM (its high-water mark); elsewhere
    than Linux, the high-water mark of getrusage (bytes on macOS), which cannot be reset."""
    status = Path("/proc/self/status")
    if not status.is_file():
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_high_water() -> None:
    """Linux: the high-water mark starts again from the memory resident now."""
    with contextlib.suppress(OSError):  # no /proc: the figure is the high-water mark's rise over the step
        Path("/proc/self/clear_refs").write_text("5")


def child(net: str, data: str, batch: int, parts: int, recompute: str, gpu: bool) -> None:
    """One row: a run of one step, the step measured; prints a JSON line."""
    import torch

    from netdsl.cli.main import main
    from netdsl.train import loop

    real = loop.Trainer._train_step
    found: dict = {}

    def measured(self, x, y):
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _resident("VmRSS")
            reset_high_water()
        started = time.perf_counter()
        result = real(self, x, y)
        if gpu:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _resident("VmHWM")
        found.update(step_bytes=peak - before, seconds=time.perf_counter() - started)
        return result

    loop.Trainer._train_step = measured
    with tempfile.TemporaryDirectory() as out:
        args = [
            "train", net, "--data", data, "--batch", str(batch), "--steps", "1", "--accumulate", str(parts),
            "--recompute", recompute,
            "--workers", "0", "--val-fraction", "0", "--mean", "none", "--keep-best", "0", "--out", f"{out}/run",
        ]  # fmt: skip
        code = main(args)
    if code != 0 or not found:
        sys.exit(code or 1)
    print(json.dumps(found))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", help="the .net file (default nets/alexnet_1gpu.net)")
    parser.add_argument("--batch", type=positive_int, help="images per step (default 64)")
    parser.add_argument("--parts", type=positive_ints, help="numbers of parts, one row each (default 1,2,4,8,16)")
    parser.add_argument(
        "--recompute",
        type=recompute_modes,
        help="recompute settings, one row each with every number of parts (default none)",
    )
    parser.add_argument("--gpu", action="store_true", help="measure on the GPU (its allocator's peak)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="LeNet-5 at batch 8, whole and in 2 parts, recompute none and all: the code path",
    )
    parser.add_argument(
        "--child", nargs=5, metavar=("DATA", "BATCH", "PARTS", "RECOMPUTE", "GPU"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        data, batch, parts, recompute, gpu = args.child
        child(args.net, data, int(batch), int(parts), recompute, gpu == "1")
        return 0
    defaults = {
        "net": str(ROOT / "nets" / "alexnet_1gpu.net"), "batch": 64, "parts": (1, 2, 4, 8, 16), "recompute": ("none",)
    }  # fmt: skip
    settle_smoke(parser, args, defaults, "the net, the batch, the parts and recompute")
    if args.smoke:
        args.net, args.batch, args.parts, args.recompute = str(ROOT / "nets" / "lenet5.net"), 8, (1, 2), ("none", "all")
    uneven = [count for count in args.parts if args.batch % count]
    if uneven:
        parser.error(f"a batch of {args.batch} does not split into {uneven[0]} equal parts")
    command = shlex.join(["python", "bench/train_memory.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# {command}")
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            return no_gpu("--gpu: run this on a machine with one, or leave out --gpu for the CPU's figures")

    from netdsl.ir import layer
    from netdsl.lang.frontend import load_graph

    graph = load_graph(args.net)
    shape = layer(graph, graph.graph["inputs"][0]).shape
    classes = layer(graph, graph.graph["outputs"][0]).shape[0]
    where = "the GPU's allocator" if args.gpu else "the CPU process's resident memory"
    print(f"# a training step's memory ({where}), {Path(args.net).name} at batch {args.batch}, whole and in parts")
    print("| parts | images a part | recompute | step's memory (MiB) | against the first row | first step (s) |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "images.npz"
        np.savez(
            data,
            x=rng.standard_normal((args.batch, *shape)).astype(np.float32),
            y=rng.integers(0, classes, args.batch),
        )
        whole = None
        for count, recompute in [(count, mode) for count in args.parts for mode in args.recompute]:
            row = [sys.executable, __file__, "--net", args.net, "--child", str(data), str(args.batch), str(count)]
            row += [recompute, "1" if args.gpu else "0"]
            done = subprocess.run(row, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            found = json.loads(done.stdout.strip().splitlines()[-1])
            megabytes = found["step_bytes"] / 2**20
            whole = whole if whole is not None else megabytes
            ratio = f"{megabytes / whole:.2f}" if whole > 0 else "-"
            cells = [count, args.batch // count, recompute, f"{megabytes:,.0f}", ratio, f"{found['seconds']:.2f}"]
            print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
