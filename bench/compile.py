"""Compile-time and roofline tables for `netdsl compile`.

    python bench/compile.py

1. Wall time of `netdsl compile` for each net in nets/ and for generated nets of 100 and 1,000 layers:
   front end, passes, emission and writing the build directory. Triton's own JIT and the optional
   sm_90 build are excluded (they happen when a kernel first runs, or with `compile` without --no-sm90).
2. AlexNet's fused plan against an unfused one (one kernel per layer): bytes moved and the sum of
   per-kernel roofline floors on one H100 SXM, at batch 1 and 128, in fp32 and bf16.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from frontend import generated_net  # noqa: E402

from netdsl.build import build  # noqa: E402
from netdsl.compile import compile_net, write_build  # noqa: E402
from netdsl.cost import fused_costs, unfused_costs  # noqa: E402
from netdsl.parse import parse_file  # noqa: E402
from netdsl.passes import Options, run_pipeline  # noqa: E402
from netdsl.tables import format_table  # noqa: E402


def time_compile(path: Path, runs: int) -> tuple[float, int]:
    times, kernels = [], 0
    with tempfile.TemporaryDirectory() as out:
        for _ in range(runs):
            start = time.perf_counter()
            compiled = compile_net(path, Options())
            write_build(compiled, out)
            times.append(time.perf_counter() - start)
            kernels = len(compiled.kernels)
    return statistics.median(times) * 1e3, kernels


def compile_table() -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        nets = sorted((ROOT / "nets").glob("*.net"))
        for size in (100, 1000):
            path = Path(scratch) / f"generated_{size}.net"
            path.write_text(generated_net(size))
            nets.append(path)
        for path in nets:
            runs = 3 if "1000" in path.stem else 5
            layers = len(build(parse_file(path)).nodes)
            ms, kernels = time_compile(path, runs)
            rows.append((path.stem, f"{layers:,}", f"{kernels:,}", f"{ms:,.1f}", f"{ms / layers * 1e3:,.0f}"))
    header = ("net", "layers", "kernels", "compile ms (median)", "us / layer")
    return format_table(header, rows, left={0})


def roofline_table() -> list[str]:
    graph = build(parse_file(ROOT / "nets/alexnet.net"))
    program, _ = run_pipeline(graph, Options())
    rows = []
    for batch in (1, 128):
        for dtype in ("fp32", "bf16"):
            fused = [c for c in fused_costs(program, batch, dtype) if c.kind not in ("input", "view", "transfer")]
            unfused = unfused_costs(graph, batch, dtype)
            fb, ub = sum(c.bytes for c in fused), sum(c.bytes for c in unfused)
            ft, ut = sum(c.seconds for c in fused), sum(c.seconds for c in unfused)
            rows.append(
                (
                    str(batch),
                    dtype,
                    str(len(fused)),
                    str(len(unfused)),
                    f"{fb / 1e6:,.1f}",
                    f"{ub / 1e6:,.1f}",
                    f"{100 * (1 - fb / ub):.1f}%",
                    f"{ft * 1e6:,.1f}",
                    f"{ut * 1e6:,.1f}",
                    f"{ft * 1e6 / batch:,.2f}",
                )
            )
    header = (
        "batch",
        "dtype",
        "kernels",
        "unfused",
        "MB fused",
        "MB unfused",
        "bytes saved",
        "floor us fused",
        "floor us unfused",
        "us / image",
    )
    return format_table(header, rows, left={1})


def main() -> int:
    print("# python bench/compile.py")
    print("## compile time (front end + passes + emission + writing; no Triton JIT, no sm_90 build)")
    print("\n".join(compile_table()))
    print()
    print("## AlexNet (nets/alexnet.net), fused vs unfused: bytes moved and roofline floor on one H100 SXM,")
    print("## summed over both towers' kernels (transfers between the GPUs excluded)")
    print("\n".join(roofline_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
