"""AlexNet forward on a GPU: netdsl's generated kernels vs PyTorch eager (cuDNN) vs torch.compile.

    python bench/alexnet_gpu.py [--runs 50] [--batches 1,32,128]

For batch 1, 32 and 128 in fp32, TF32 and bf16: throughput (images/s) and latency (ms), timed with
CUDA events, the median of `--runs` runs after warm-up, and the ratio to the roofline floor of the
fused plan on an H100 (netdsl.cost). Both of AlexNet's towers run on the one GPU (two streams).
The PyTorch model is the hand-written one of the golden tests (tests/golden/models.py). Without a
GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

NET = ROOT / "nets" / "alexnet.net"
PRECISIONS = {"fp32": ("fp32", torch.float32), "tf32": ("tf32", torch.float32), "bf16": ("bf16", torch.bfloat16)}


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


def floor_ms(batch: int, dtype: str) -> float:
    from netdsl.build import build
    from netdsl.cost import fused_costs
    from netdsl.parse import parse_file
    from netdsl.passes import Options, run_pipeline

    program, _ = run_pipeline(build(parse_file(NET)), Options(batch=batch, dtype=dtype))
    kernels = [c for c in fused_costs(program, batch, dtype) if c.kind not in ("input", "view", "transfer")]
    return sum(c.seconds for c in kernels) * 1e3


def systems(ours, model: torch.nn.Module, x: torch.Tensor) -> dict:
    """What is timed: each a function of no arguments running one forward pass on `x`."""
    compiled = torch.compile(model)
    tuned = torch.compile(model, mode="max-autotune")
    return {
        "netdsl": lambda: ours(x),
        "eager (cuDNN)": lambda: model(x),
        "torch.compile": lambda: compiled(x),
        "torch.compile max-autotune": lambda: tuned(x),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--batches", default="1,32,128")
    args = parser.parse_args(argv)
    print(f"# python bench/alexnet_gpu.py --runs {args.runs} --batches {args.batches}")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to time (run this on a machine with one)")
        return 0
    from golden.models import AlexNet

    import netdsl
    from netdsl.weights import init_weights

    graph = netdsl.load_graph(NET)
    weights = init_weights(graph, seed=0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    header = ("batch", "precision", "system", "latency ms", "images/s", "x floor")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name, (dtype, torch_dtype) in PRECISIONS.items():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
            x = torch.randn(batch, 3, 227, 227, device="cuda", dtype=torch_dtype)
            floor = floor_ms(batch, dtype)
            ours = netdsl.load(
                NET,
                backend="triton",
                dtype=dtype,
                weights=weights,
                batch=batch,
                devices={"gpu0": "cuda:0", "gpu1": "cuda:0"},
            )
            model = AlexNet()
            model.load(weights)
            model = model.to("cuda", torch_dtype).eval()
            with torch.no_grad():
                for system, fn in systems(ours, model, x).items():
                    ms = time_ms(fn, args.runs)
                    rows.append(
                        (str(batch), name, system, f"{ms:.3f}", f"{batch / ms * 1e3:,.0f}", f"{ms / floor:.1f}")
                    )
    from netdsl.tables import format_table

    print("\n".join(format_table(header, rows, left={1, 2})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
