"""Compile-time and roofline tables for `netdsl compile`.

    python bench/compile.py           # every net in nets/ and generated nets of 100 and 1,000 layers
    python bench/compile.py --smoke   # the nets in nets/ only, one run each (what the tests run)

1. Wall time of `netdsl compile --no-sm90` for each net in nets/ and for generated nets of 100 and
   1,000 layers, in two parts that add up to what a user waits for: netdsl's compile (front end, passes,
   emission, writing the build directory) and the launch recording that puts each kernel's grid and
   block configuration into plan.json (each kernel file imported and its launcher run on meta tensors).
   Triton's own JIT (when a kernel first runs) and the optional sm_90 build are excluded.
2. AlexNet's fused plan against an unfused one (one kernel per layer): bytes moved and the sum of
   per-kernel roofline floors on one H100 SXM, at batch 1 and 128, in fp32 and bf16; each row is fused
   at its own batch and dtype, as the cost model's choices (the conv + LRN + max-pool stage) depend on both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from frontend import generated_net  # noqa: E402

from netdsl.compiler.compile import compile_net, write_build  # noqa: E402
from netdsl.compiler.cost import fused_costs, unfused_costs  # noqa: E402
from netdsl.compiler.launches import record_launches  # noqa: E402
from netdsl.compiler.passes import Options, run_passes  # noqa: E402
from netdsl.lang.build import build  # noqa: E402
from netdsl.lang.parse import parse_file  # noqa: E402
from netdsl.tables import format_table  # noqa: E402

GENERATED_SIZES = (100, 1000)
ROOFLINE_SETTINGS = ((1, "fp32"), (1, "bf16"), (128, "fp32"), (128, "bf16"))  # (batch, dtype) per row


def time_compile(path: Path, runs: int, options: Options) -> tuple[float, float, int]:
    """Median milliseconds of the compile and of the launch recording, and the number of kernels."""
    compile_ms, record_ms, kernels = [], [], 0
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        for _ in range(runs):
            start = time.perf_counter()
            compiled = compile_net(path, options)
            write_build(compiled, out)
            compiled_at = time.perf_counter()
            record_launches([out / "kernels" / name for name in compiled.kernels], options.batch, options.dtype)
            compile_ms.append((compiled_at - start) * 1e3)
            record_ms.append((time.perf_counter() - compiled_at) * 1e3)
            kernels = len(compiled.kernels)
    return statistics.median(compile_ms), statistics.median(record_ms), kernels


def compile_table(smoke: bool = False) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        nets = sorted((ROOT / "nets").glob("*.net"))
        for size in () if smoke else GENERATED_SIZES:
            path = Path(scratch) / f"generated_{size}.net"
            path.write_text(generated_net(size))
            nets.append(path)
        for path in nets:
            runs = 1 if smoke else 3 if "1000" in path.stem else 5
            layers = len(build(parse_file(path)).nodes)
            compile_ms, record_ms, kernels = time_compile(path, runs, Options())
            total = compile_ms + record_ms
            rows.append(
                (
                    path.stem,
                    f"{layers:,}",
                    f"{kernels:,}",
                    f"{compile_ms:,.1f}",
                    f"{record_ms:,.1f}",
                    f"{total:,.1f}",
                    f"{total / layers * 1e3:,.0f}",
                )
            )
    header = ("net", "layers", "kernels", "compile ms", "launch recording ms", "total ms", "us / layer")
    return format_table(header, rows, left={0})


def roofline_table(settings: tuple[tuple[int, str], ...] = ROOFLINE_SETTINGS) -> list[str]:
    rows = []
    for batch, dtype in settings:
        after = run_passes(build(parse_file(ROOT / "nets/alexnet.net")), Options(batch=batch, dtype=dtype))
        program, graph = after["plan_memory"], after["shapes"]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the nets in nets/ only, one run each")
    args = parser.parse_args(argv)
    print(f"# python bench/compile.py{' --smoke' if args.smoke else ''}")
    print("## compile time of `netdsl compile --no-sm90` (median ms, batch 1, fp32): front end + passes +")
    print("## emission + writing the build, then launch recording (each kernel's launcher run on meta tensors")
    print("## for the grids in plan.json); total = what a user waits for. No Triton JIT, no sm_90 build.")
    print("\n".join(compile_table(args.smoke)))
    print()
    print("## AlexNet (nets/alexnet.net), fused vs unfused: bytes moved and roofline floor on one H100 SXM,")
    print("## summed over both towers' kernels (transfers between the GPUs excluded); each row fused at its")
    print("## own batch and dtype")
    print("\n".join(roofline_table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
