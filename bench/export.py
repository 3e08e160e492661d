"""How long does `netdsl export` take, and where? Times each stage of `export_onnx` for bundled nets: building
the ModelProto (`build_onnx`: the weights checked and copied in, the structure checked without them), deciding
whether the weights go to external data, serializing and writing the file (atomically), and onnx.checker's
full check of the written file; against the anchor, onnx's own `onnx.save` of the same model.

    python bench/export.py                      # lenet5, alexnet and vgg16, 3 runs each
    python bench/export.py --nets vgg16 --runs 5

Each figure is the median of `--runs` in seconds (files written to a temporary folder and removed). VGG-16's
138 million weights are 553 MB, so its rows show what the copying of weights costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

from arguments import positive_int  # noqa: E402

NETS = ("lenet5", "alexnet", "vgg16")


def _nets(text: str) -> tuple[str, ...]:
    names = tuple(word.strip() for word in text.split(","))
    bundled = {path.stem for path in (ROOT / "nets").glob("*.net")}
    unknown = [name for name in names if name not in bundled]
    if unknown:  # an empty name too: "".split(",") is [""]
        raise argparse.ArgumentTypeError(f"not a bundled net: {unknown[0]!r} (bundled: {', '.join(sorted(bundled))})")
    return names


def stage_times(name: str, runs: int, folder: Path) -> dict[str, float]:
    """The median seconds of each stage of exporting nets/NAME.net with He weights, over `runs`."""
    import onnx

    from netdsl.files import write_atomic_bytes
    from netdsl.interop import onnx_export
    from netdsl.lang.frontend import load_graph
    from netdsl.runtime.weights import init_weights

    graph = load_graph(ROOT / "nets" / f"{name}.net")
    weights = init_weights(graph, seed=0, scheme="he")
    path, anchor = folder / f"{name}.onnx", folder / f"{name}_onnx_save.onnx"
    times: dict[str, list[float]] = {}

    def timed(stage: str, fn):
        start = time.perf_counter()
        result = fn()
        times.setdefault(stage, []).append(time.perf_counter() - start)
        return result

    for _ in range(runs):
        model = timed("build", lambda: onnx_export.build_onnx(graph, weights))
        if timed("size test", lambda m=model: onnx_export._past_protobuf_limit(m)):
            raise SystemExit(f"{name}: past protobuf's 2 GiB; this benchmark times models written whole")
        timed("write", lambda m=model: write_atomic_bytes(path, m.SerializeToString()))
        timed("check", lambda: onnx.checker.check_model(os.fspath(path), full_check=True))
        timed("onnx.save", lambda m=model: onnx.save(m, os.fspath(anchor)))
        del model
    stages = {stage: statistics.median(values) for stage, values in times.items()}
    stages["MB"] = path.stat().st_size / 1e6
    for written in (path, anchor):
        written.unlink()
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", type=_nets, default=NETS, help="bundled nets (default lenet5,alexnet,vgg16)")
    parser.add_argument("--runs", type=positive_int, default=3, help="runs per net (default 3); medians shown")
    args = parser.parse_args(argv)
    print(f"# python bench/export.py --nets {','.join(args.nets)} --runs {args.runs}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    header = ("net", "MB", "build s", "size test s", "write s", "check s", "export s", "onnx.save s", "write/save")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        stage_times("lenet5", 1, Path(folder))  # untimed: the imports (torch, onnx) and their first calls
        for name in args.nets:
            t = stage_times(name, args.runs, Path(folder))
            total = t["build"] + t["size test"] + t["write"] + t["check"]
            rows.append((name, f"{t['MB']:.3g}", *(f"{t[s]:.3f}" for s in ("build", "size test", "write", "check")),
                         f"{total:.3f}", f"{t['onnx.save']:.3f}", f"{t['write'] / t['onnx.save']:.2f}x"))  # fmt: skip
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for line in (header, *rows):
        print("  ".join(str(cell).rjust(width) for cell, width in zip(line, widths)))
    print("export s: build + size test + write + check (netdsl export's own stages); write/save: netdsl's atomic "
          "write of the serialized model against onnx.save of it")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
