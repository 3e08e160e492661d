"""AlexNet (or VGG-16) forward on a GPU: netdsl's generated kernels vs PyTorch eager (cuDNN) vs torch.compile.

    python bench/alexnet_gpu.py [--runs 50] [--batches 1,32,128] [--precisions fp32,tf32x3,tf32,bf16]
                                [--systems netdsl,netdsl-graph,netdsl-nchw,netdsl-s2d-graph,netdsl-one-stream,
                                           netdsl-grouped,netdsl-grouped-graph,netdsl-split-graph,
                                           netdsl-grouped-split-graph,netdsl-tuned-graph,eager,compile,
                                           max-autotune]
                                [--net alexnet|vgg16] [--tuning tuning.json]

For batch 1, 32 and 128 in fp32, TF32 and bf16: throughput (images/s) and latency (ms), timed with
CUDA events, the median of `--runs` runs after warm-up, and the ratio to the roofline floor of the
fused plan on an H100 (netdsl.compiler.cost). Every device of the net (both of AlexNet's towers, two streams)
runs on the one GPU; `--net vgg16` times VGG-16 (larger convs: the second net against the same anchors);
`netdsl-graph` replays the whole pass as one CUDA graph; `netdsl-nchw` keeps every map NCHW and every
conv on conv.py (`layout="nchw"`, what netdsl did before channels-last convs); `netdsl-s2d-graph` is
`netdsl-graph` with conv1 lowered by space-to-depth onto the channels-last conv (`space_to_depth=True`,
issue 13); `netdsl-one-stream` runs the towers' steps on one shared stream (`streams="device"`): against
`netdsl`, whether the two streams overlap at all; `netdsl-grouped` merges the towers into one grouped launch per
layer on one stream (`merge_towers=True`, netdsl.compiler.merge_towers; `-graph`: in a CUDA graph): against both,
whether to plan AlexNet that way on one GPU; `-split` lets the channels-last convs share a tile's taps among
programs where the batch leaves most SMs idle (`split_k=True`); `-tuned` takes the tiles of `--tuning` (a file of
`netdsl tune`). Precision `tf32x3` is fp32 with three TF32 tensor-core
products in netdsl's kernels (`precision="tf32x3"`) and exact fp32 in PyTorch's. The PyTorch model is the
hand-written one of the golden tests (tests/golden/models.py); `compile` and `max-autotune` are torch.compile's
default and max-autotune modes (minutes of compiling each). Each row is printed as soon as it is
measured (and appended to `--tsv`, under a comment with the command, the machine and the date, and the
column names when the file is new), the table at the end. Without a GPU it says so and exits with status 4.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from arguments import joined, positive_int, positive_ints  # noqa: E402
from timing import no_gpu  # noqa: E402

NETS = ("alexnet", "vgg16")  # nets/<name>.net, each with its hand-written model in tests/golden/models.py
PRECISIONS = {
    "fp32": ("fp32", torch.float32), "tf32x3": ("fp32", torch.float32), "tf32": ("tf32", torch.float32),
    "bf16": ("bf16", torch.bfloat16),
}  # fmt: skip


def time_ms(fn, runs: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def floor_ms(net: Path, batch: int, dtype: str) -> float:
    from netdsl.compiler.cost import fused_costs
    from netdsl.compiler.passes import Options, run_pipeline
    from netdsl.lang.build import build
    from netdsl.lang.parse import parse_file

    program, _ = run_pipeline(build(parse_file(net)), Options(batch=batch, dtype=dtype))
    kernels = [c for c in fused_costs(program, batch, dtype) if c.kind not in ("input", "view", "transfer")]
    return sum(c.seconds for c in kernels) * 1e3


SYSTEMS = {
    "netdsl": "netdsl",
    "netdsl-graph": "netdsl, CUDA graph",
    "netdsl-nchw": "netdsl, all NCHW",
    "netdsl-s2d-graph": "netdsl, conv1 space-to-depth, CUDA graph",
    "netdsl-one-stream": "netdsl, both towers on one stream",
    "netdsl-grouped": "netdsl, towers merged into grouped launches",
    "netdsl-grouped-graph": "netdsl, towers merged, CUDA graph",
    "netdsl-split-graph": "netdsl, split-K convs, CUDA graph",
    "netdsl-grouped-split-graph": "netdsl, towers merged, split-K convs, CUDA graph",
    "netdsl-tuned-graph": "netdsl, tiles of netdsl tune, CUDA graph",
    "eager": "eager (cuDNN)",
    "compile": "torch.compile",
    "max-autotune": "torch.compile max-autotune",
}


def make_system(
    name: str, net: Path, devices: list[str], weights, model: torch.nn.Module, batch: int, dtype: str,
    precision: str | None = None, tuning: str | None = None,
):  # fmt: skip
    """A function of one input running one forward pass of `name`; every logical device on cuda:0."""
    if name.startswith("netdsl"):
        import netdsl

        ours = netdsl.load(
            net,
            backend="triton",
            dtype=dtype,
            weights=weights,
            batch=batch,
            devices=dict.fromkeys(devices, "cuda:0"),
            cuda_graph=name.endswith("-graph"),
            layout="nchw" if name == "netdsl-nchw" else "auto",
            precision=precision,
            space_to_depth="-s2d" in name,
            streams="device" if name == "netdsl-one-stream" else "partition",
            merge_towers="-grouped" in name,
            split_k="-split" in name,
            tuning=tuning if "-tuned" in name else None,
        )
        return ours
    if name == "eager":
        return model
    if name == "compile":
        return torch.compile(model)
    return torch.compile(model, mode="max-autotune")


HEADER = ("net", "batch", "precision", "system", "latency ms", "images/s", "x floor", "warm-up s")


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, every setting spelt out."""
    words = ["python", "bench/alexnet_gpu.py", "--runs", str(args.runs), "--batches", joined(args.batches),
             "--precisions", args.precisions, "--systems", args.systems, "--net", args.net]  # fmt: skip
    if args.tuning:
        words += ["--tuning", args.tuning]
    if args.tsv:
        words += ["--tsv", args.tsv]
    if args.warm_only:
        words.append("--warm-only")
    return shlex.join(words)


class TsvFile:
    """`--tsv`: rows appended as they are measured, the first under a comment naming the command, the machine
    and the date (several runs append to one file: each block says where it came from), and the column names
    first of all when the file is new."""

    def __init__(self, path: str, preamble: list[str]) -> None:
        self.path, self.preamble = path, preamble

    def append(self, row: tuple[str, ...]) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            if self.preamble:
                if file.tell() == 0:
                    file.write("# " + "\t".join(HEADER) + "\n")
                file.writelines(f"# {line}\n" for line in self.preamble)
                self.preamble = []
            file.write("\t".join(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=positive_int, default=50, help="timed runs per row (the median)")
    parser.add_argument("--batches", type=positive_ints, default=(1, 32, 128), help="comma-separated")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--systems", default="netdsl,netdsl-graph,eager,compile,max-autotune")
    parser.add_argument("--tsv", help="append each row to this file as it is measured")
    parser.add_argument("--net", default="alexnet", choices=NETS, help="the net of nets/ to time")
    parser.add_argument("--tuning", help="the tuning file of `netdsl tune` the -tuned systems take")
    parser.add_argument(
        "--warm-only",
        action="store_true",
        help="compile every chosen system once and exit: fills Triton's and Inductor's caches on disk",
    )
    args = parser.parse_args(argv)
    chosen = args.systems.split(",")
    unknown = [name for name in chosen + args.precisions.split(",") if name not in {**SYSTEMS, **PRECISIONS}]
    if unknown:
        parser.error(f"unknown system or precision: {', '.join(unknown)} (systems: {', '.join(SYSTEMS)})")
    if any("-tuned" in name for name in chosen) and not args.tuning:
        parser.error("the -tuned systems take the tiles of a tuning file: give --tuning FILE (netdsl tune)")
    command = command_line(args)
    print(f"# {command}")
    if not torch.cuda.is_available():
        return no_gpu()
    import time

    import triton
    from golden.models import MODELS

    import netdsl
    from netdsl.ir import layers
    from netdsl.runtime.weights import init_weights
    from netdsl.tables import format_table

    net = ROOT / "nets" / f"{args.net}.net"
    model_class, shape = MODELS[args.net]
    graph = netdsl.load_graph(net)
    devices = sorted({item.device for item in layers(graph)})
    weights = init_weights(graph, seed=0)
    machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    print(f"device: {machine}")
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    tsv = TsvFile(args.tsv, [command, f"{machine}; {today}"]) if args.tsv else None
    rows = []
    for batch in args.batches:
        for name in args.precisions.split(","):
            dtype, torch_dtype = PRECISIONS[name]
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
            x = torch.randn(batch, *shape, device="cuda", dtype=torch_dtype)
            floor = floor_ms(net, batch, dtype)
            model = model_class()
            model.load(weights)
            model = model.to("cuda", torch_dtype).eval()
            for system in chosen:
                began = time.perf_counter()
                with torch.no_grad():
                    precision = "tf32x3" if name == "tf32x3" else None
                    run = make_system(system, net, devices, weights, model, batch, dtype, precision, args.tuning)
                    for _ in range(3):  # compiles (Triton, Inductor) and captures happen here
                        run(x)
                    torch.cuda.synchronize()
                    warm = time.perf_counter() - began
                    if args.warm_only:
                        print(f"warmed {system} batch {batch} {name} in {warm:.1f} s", flush=True)
                        continue
                    ms = time_ms(lambda run=run, x=x: run(x), args.runs)
                row = (args.net, str(batch), name, SYSTEMS[system], f"{ms:.3f}", f"{batch / ms * 1e3:,.0f}",
                       f"{ms / floor:.1f}", f"{warm:.1f}")  # fmt: skip
                rows.append(row)
                print("\t".join(row), flush=True)
                if tsv:
                    tsv.append(row)
                del run
                torch.cuda.empty_cache()

    print("\n".join(format_table(HEADER, rows, left={0, 2, 3})))
    print(f"floor: the fused plan's roofline time on an H100 (netdsl.compiler.cost); {args.runs} timed runs each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
