"""`netdsl tune`: times each kernel's candidate tiles on a device and writes the winners to a tuning file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from netdsl.cli.flags import add_plan_flags, plan_options
from netdsl.codegen.interpret import use_interpreter
from netdsl.errors import NetError
from netdsl.files import refuse_overwriting
from netdsl.ir.dtypes import DTYPES
from netdsl.tables import format_table

TUNE_HELP = "time each kernel's candidate tiles on a device and write the fastest to a tuning file"


def add_command(commands, positive) -> None:
    """The `tune` subcommand (`positive`: the CLI's whole-number type)."""
    tune = commands.add_parser("tune", help=TUNE_HELP, description=TUNE_HELP)
    tune.add_argument("net", nargs="?", type=Path, help="a .net file (default: the bundled alexnet.net)")
    tune.add_argument("--batch", type=positive, default=1, metavar="N", help="images per batch to tune for")
    tune.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="element type to tune for")
    tune.add_argument(
        "--device",
        default=None,
        help="the device to time on, every partition on it (default: cuda:0, or the CPU under Triton's interpreter, "
        "which proves the mechanism but whose times mean nothing for a GPU)",
    )
    tune.add_argument(
        "--steps", metavar="PATTERNS", help="only the steps matching these comma-separated patterns, e.g. 'conv*,fc6*'"
    )
    tune.add_argument(
        "--runs", type=positive, default=20, metavar="N",
        help="timed samples per tile, the median kept (on a GPU each a CUDA graph of ten launches)",
    )  # fmt: skip
    tune.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("tuning.json"),
        metavar="FILE",
        help="the tuning file (default: tuning.json; one that exists keeps its other batch sizes)",
    )
    add_plan_flags(tune, tuning=False)
    tune.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def tune_command(path: Path, args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        place = torch.device(device)
    except RuntimeError:
        raise NetError(f"unknown device `{device}`", where="--device", hint="e.g. cuda:0, or cpu") from None
    if place.type == "cuda" and not torch.cuda.is_available():
        raise NetError(f"no CUDA GPU for `{device}`", where="--device", hint="tune on a machine with a GPU")
    if place.type == "cpu":
        use_interpreter()
        print("note: timing on the CPU under Triton's interpreter; the tiles found say nothing about a GPU",
              file=sys.stderr)  # fmt: skip

    from netdsl.compiler.tuning import option_flags
    from netdsl.runtime.tune import check_output, tune, write_tuning

    refuse_overwriting(args.output, [path, getattr(args, "given", None)], "--output")
    check_output(args.output, place)  # before minutes of timing: a file it could not add to is an error now
    options = {name: value for name, value in plan_options(args).items() if name != "tuning"}

    notes: list[str] = []

    def save(tuning: dict) -> None:  # after every step: a run cut short keeps what it measured
        notes.extend(note for note in write_tuning(args.output, tuning) if note not in notes)

    try:
        tuning, found = tune(
            path, batch=args.batch, dtype=args.dtype, device=device, runs=args.runs, steps=args.steps,
            progress=sys.stderr, on_step=save, **options,
        )  # fmt: skip
    except NetError as error:  # the runtime's errors name its keyword arguments; here they are flags
        error.where = {"devices": "--device", "dtype": "--dtype"}.get(error.where, error.where)
        if error.where in options:
            error.where = "--" + error.where.replace("_", "-")
        raise
    if not found and args.steps:
        raise NetError(
            f"no step with tiles to tune matches {args.steps!r}",
            where="--steps",
            hint="netdsl compile prints the steps' names (the kernels of conv, fc and LRN layers take tiles)",
        )
    if not found:
        raise NetError("the net has no kernel with tiles to tune", where=str(path), hint="nothing to do")
    print(tuning_table(found, tuning["device"], args.batch, args.dtype))
    net = "" if args.net is None else f" {args.net}"  # the file as given (an ONNX model's import is gone by now)
    for note in notes:
        print(f"note: {args.output}: {note}")
    flags = f"--batch {args.batch} {option_flags(args.dtype, options)} --tuning {args.output}"
    print(f"wrote {args.output}; build with it: netdsl compile{net} {flags}")
    return 0


def tuning_table(found, device: str, batch: int, dtype: str) -> str:
    from netdsl.compiler.tuning import describe_config

    rows = []
    for result in found:
        tuned = describe_config(result.best) if result.best else "(the launcher's)"
        speedup = result.default_ms / result.best_ms if result.best_ms > 0 else float("nan")
        rows.append(
            (
                result.step,
                describe_config(result.default),
                f"{result.default_ms:.4f}",
                tuned,
                f"{result.best_ms:.4f}",
                f"{speedup:.2f}x",
                f"as {result.same_as}" if result.same_as else str(result.timed),
            )
        )
    # every step counts, twins too: a net runs each tower's copy
    before = sum(result.default_ms for result in found)
    after = sum(result.best_ms for result in found)
    header = ("step", "launcher's tiles", "ms", "tuned tiles", "ms", "speed-up", "timed")
    lines = [f"tiles on {device}, batch {batch}, {dtype} (median ms per launch):", ""]
    lines += format_table(header, rows, left={0, 1, 3})
    lines += ["", f"the tuned steps together: {before:.4f} ms -> {after:.4f} ms ({before / max(after, 1e-12):.2f}x)"]
    dropped = [
        (result.step, label, why) for result in found if not result.same_as for label, why in result.dropped.items()
    ]
    if dropped:
        lines += ["", "candidates dropped:"]
        lines += [f"  {step} {label}: {why}" for step, label, why in dropped]
    return "\n".join(lines)
