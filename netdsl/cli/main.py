"""The `netdsl` command: thin wrappers over the same functions a Python user calls."""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import traceback
from importlib import resources
from pathlib import Path

from netdsl._version import __version__
from netdsl.cli.filters import add_command as add_filters_command
from netdsl.cli.flags import add_plan_flags, image_sizes, plan_options, seed_number
from netdsl.cli.fmt import add_command as add_fmt_command
from netdsl.cli.fmt import fmt_command
from netdsl.cli.neighbours import add_command as add_neighbours_command
from netdsl.cli.onnx_input import imported_model, onnx_importer
from netdsl.cli.runs import add_command as add_runs_command
from netdsl.cli.train import add_commands as add_training_commands
from netdsl.cli.train import eval_command, train_command
from netdsl.cli.tune import add_command as add_tune_command
from netdsl.compiler.backward import TRAINING_PASS_NAMES
from netdsl.compiler.passes import PASS_NAMES, Options, check_options
from netdsl.compiler.training import RECOMPUTE
from netdsl.errors import NetError, color_wanted, did_you_mean, environment_error, os_hint
from netdsl.files import refuse_folder, refuse_overwriting
from netdsl.ir.dtypes import DTYPES, dot_precision
from netdsl.lang.build import MEMORY_UNITS
from netdsl.lang.frontend import load_graph
from netdsl.train.recipe import alias_of

DEFAULT_NET = "alexnet.net"
WEIGHTS_HELP = (
    "a safetensors file or the run folder of `netdsl train` (default: the paper's initialization); trained "
    "weights bring their preprocessing and class names"
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as netdsl errors (exit status 1) instead of exiting with 2."""

    def error(self, message: str):
        raise NetError(message, where=self.prog, hint=f"see `{self.prog} --help`")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]):
        # `--out=--` gives the flag the value `--`. Python 3.11's argparse drops that `--` as the end of the flags
        # and hands the flag an empty list, which its code then reads as a value (an internal error).
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def _memory_size(text: str) -> int:
    match = _SIZE.match(text)
    size = float(match.group(1)) * MEMORY_UNITS[match.group(2) or "B"] if match else 0.0
    if not 1 <= size < math.inf:  # less than a byte, or digits beyond a float's range: no memory size
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 16GiB)")
    return int(size)


MAX_COUNT = 2**31 - 1  # a count a flag takes (images, classes, ...): what the kernels and torch's sizes can hold


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    if len(text) > 10 or int(text) > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is more than {MAX_COUNT:,}")
    return int(text)


def _refuse_extra(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> None:
    """An argument no parser took: named with the command's own flags to choose from (argparse would blame
    `netdsl` and point to the top-level help, which lists no command's flags)."""
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    sub = commands.choices.get(command, parser)
    flags = [flag for action in sub._actions for flag in action.option_strings]
    extra = [item for item in extra if item != "--"] or extra  # `--` ends the flags: what follows is the fault
    word = next((item for item in extra if item.startswith("-")), extra[0])
    flag = word.split("=", 1)[0]
    if not flag.startswith("-"):
        message = f"unexpected argument `{word}`"
        hint = "a flag that switches something on takes no value (--flip, --no-flip)" if command == "train" else None
    else:
        message = f"unknown flag {flag}"
        alias = alias_of(flag.lstrip("-").replace("-", "_")) if command in ("train", "eval") else None
        named = f"--{alias.replace('_', '-')}" if alias else None
        hint = f"netdsl calls it {named}" if named in flags else did_you_mean(flag, flags)
    see = f"see `{sub.prog} --help`"
    raise NetError(message, where=sub.prog, hint=f"{hint}{'' if hint.endswith('?') else ';'} {see}" if hint else see)


def default_net() -> Path:
    """The AlexNet that ships with netdsl (the `nets/` folder of the source tree)."""
    source_tree = Path(__file__).resolve().parents[2] / "nets" / DEFAULT_NET
    if source_tree.is_file():
        return source_tree
    return Path(str(resources.files("netdsl.nets").joinpath(DEFAULT_NET)))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="netdsl",
        description="Describe convolutional networks as text; check, inspect, compile, run and train them.",
    )
    parser.add_argument("--version", action="version", version=f"netdsl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="colour error messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def net_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("net", nargs="?", type=Path, help=f"a .net file (default: the bundled {DEFAULT_NET})")
        # `compile` builds for the batch and dtype (fusion choices, report, launch grids); the others only check memory.
        uses = "the memory check, fusion choices, report and launch grids" if name == "compile" else "the memory check"
        sub.add_argument("--batch", type=_positive, default=1, help=f"images per batch, for {uses}")
        sub.add_argument(
            "--dtype",
            choices=sorted(DTYPES),
            default="fp32",
            help=f"element type, for {uses}" + ("; tf32: TF32 tensor-core products" if name == "compile" else ""),
        )
        sub.add_argument(
            "--memory-limit",
            type=_memory_size,
            metavar="SIZE",
            help="memory per device, e.g. 16GiB (default: the net's own `device ... memory`)",
        )
        # `main` looks for --debug anywhere in argv; accept it after the command too.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sub

    net_command("check", "parse and validate a net; silent on success")
    net_command("info", "print each layer's type, device, shape, parameters and cost, with totals")
    graph = net_command("graph", "draw the net with Graphviz: devices as clusters, shapes on edges")
    graph.add_argument("-o", "--output", type=Path, required=True, help="out.dot, or .svg/.png/.pdf via `dot`")
    build = net_command("compile", "fuse the net into Triton kernels: writes kernels/*.py, plan.json, report.txt")
    build.add_argument("-o", "--output", type=Path, help="build directory (default: build/<net name>)")
    build.add_argument("--dump-after", metavar="PASS", help=f"print the graph after a pass ({', '.join(PASS_NAMES)})")
    add_plan_flags(build)
    build.add_argument(
        "--train",
        action="store_true",
        help="also plan a training step: train/plan.json and train/report.txt (backward steps and kernels, "
        "what the forward saves, memory per device); --dump-after then takes the training passes "
        f"({', '.join(TRAINING_PASS_NAMES)})",
    )
    build.add_argument(
        "--recompute",
        choices=RECOMPUTE,
        default="none",
        help="with --train: plan the step with runs of layers computed again in the backward pass, as `netdsl "
        "train --recompute` runs it (the report gives the peak with each setting)",
    )
    build.add_argument(
        "--no-sm90",
        dest="sm90",
        action="store_false",
        help="skip building the kernels for the H100 (sm_90) and their resource report",
    )
    export = net_command("export", "write the net as an ONNX model (opset 17) with its weights as initializers")
    export.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    export.add_argument("--weights", type=Path, help=f"{WEIGHTS_HELP} into the model's metadata")
    export.add_argument("--seed", type=seed_number, default=0, help="seed of the default weights")
    export.add_argument(
        "--external-data",
        action="store_true",
        help="the weights in OUT.onnx.data beside the model (always for a model over protobuf's 2 GiB)",
    )
    imported = commands.add_parser(
        "import",
        help="read an ONNX model: write it as a .net file and its weights as a safetensors file",
        description="read an ONNX model: write it as a .net file and its weights as a safetensors file",
    )
    imported.add_argument("model", type=Path, help="the .onnx file to read")
    imported.add_argument("-o", "--output", type=Path, required=True, help="the .net file to write")
    imported.add_argument(
        "--weights-out", type=Path, metavar="FILE", help="the safetensors file to write (default: OUTPUT.safetensors)"
    )
    imported.add_argument(
        "--towers",
        action="store_true",
        help="write grouped convolutions (or parallel copies of layers) as towers, one device per group",
    )
    imported.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    run = commands.add_parser(
        "run",
        help="run the net on inputs and print the top classes",
        description="compile the net and run it: on the GPUs it names, or on the CPU",
    )
    run.add_argument(
        "net",
        nargs="?",
        type=Path,
        help=f"a .net file, an .onnx model or a build folder of `netdsl compile` (default: the bundled {DEFAULT_NET})",
    )
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    source = run.add_mutually_exclusive_group()
    source.add_argument(
        "--input",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="images (.jpg, .png, ...: as trained weights say, else the shorter side to 256, the centre crop, "
        "ImageNet's mean subtracted), folders of images, image lists (LIST.txt: a line per image, a class after it "
        "passed over), or .npy arrays of one image (C x H x W) or a batch (N x C x H x W)",
    )
    source.add_argument("--random", type=_positive, metavar="N", help="N random images (the default: 1)")
    run.add_argument(
        "--weights", type=Path, nargs="+", metavar="W",
        help=f"{WEIGHTS_HELP}; several: an ensemble, the softmax averaged over the nets",
    )  # fmt: skip
    run.add_argument("--seed", type=seed_number, default=0, help="seed of the default weights and random inputs")
    run.add_argument(
        "--init",
        choices=("paper", "he"),
        default="paper",
        help="default weights: the paper's N(0, 0.01) or He's N(0, 2/fan-in)",
    )
    run.add_argument("--devices", metavar="MAP", help="logical devices to torch devices: gpu0=cuda:0,gpu1=cuda:1")
    run.add_argument(
        "--dtype",
        choices=("fp32", "tf32", "fp16", "bf16"),
        help="element type (default: fp32, or the build folder's); tf32: fp32 data, TF32 tensor-core products",
    )
    run.add_argument(
        "--batch",
        type=_positive,
        metavar="N",
        help="images per forward pass (default: all inputs at once), each read when its pass is next; with "
        "neither --input nor --random, N random images",
    )
    add_plan_flags(run)
    run.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture the forward pass as a CUDA graph and replay it (every partition on one GPU)",
    )
    run.add_argument(
        "--backend",
        choices=("triton", "torch"),
        default="triton",
        help="the generated Triton kernels (the default; Triton's interpreter on a CPU) or PyTorch ops",
    )
    run.add_argument("--top", type=_positive, default=5, metavar="K", help="classes to print per input")
    run.add_argument(
        "--views",
        type=int,
        choices=(1, 10),
        default=1,
        help="10: the paper's test views of each image (four corners and the centre, each flipped), softmax averaged",
    )
    run.add_argument(
        "--scales",
        type=image_sizes,
        metavar="S1,S2,...",
        help="each image with its shorter side scaled to each size (its views at each), the softmax averaged over "
        "all: VGG's multi-scale test; default: the size the weights were trained with (else 256)",
    )
    run.add_argument(
        "--dense",
        action="store_true",
        help="VGG's dense evaluation: each whole image (at each of --scales) through the net with its fc layers as "
        "convolutions, the class scores averaged over the positions (and the mirror image where training flipped)",
    )
    run.add_argument("--labels", type=Path, metavar="FILE", help="class names, one a line, in class order")
    run.add_argument("--save", type=Path, metavar="OUT.npy", help="save the outputs")
    run.add_argument(
        "--distributed",
        action="store_true",
        help="one partition per process: launch with torchrun --nproc-per-node <devices>",
    )
    run.add_argument("--time", action="store_true", help="time each step and partition, and show each device's memory")
    add_training_commands(commands, _positive)
    add_tune_command(commands, _positive)
    add_fmt_command(commands)
    add_filters_command(commands, _positive)
    add_neighbours_command(commands, _positive)
    add_runs_command(commands)
    return parser


def run(argv: list[str]) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _refuse_extra(parser, args.command, extra)
    if args.command is None:
        _parser().print_help()
        return 0
    if args.command == "import":
        return _import(args)
    if args.command == "train":
        return train_command(args)
    if args.command == "eval":
        return eval_command(args)
    if args.command == "fmt":
        return fmt_command(args)
    if args.command == "runs":
        from netdsl.cli.runs import runs_command

        return runs_command(args)
    path = args.net or default_net()
    args.given = path  # what the user named, before an ONNX model is imported or a build folder read
    if path.suffix.lower() == ".onnx" and args.command == "compile":
        # The build folder keeps the imported net (plan.json names it) and its weights.
        out = args.output or Path("build") / path.stem
        net = imported_model(path, out, args)
        args.output = out
        status = _compile(net, args)
        print(f"imported {path} as {net}; run it with: netdsl run {out} --weights {net.with_suffix('.safetensors')}")
        return status
    if path.suffix.lower() == ".onnx" and args.command != "export":
        with tempfile.TemporaryDirectory(prefix="netdsl-onnx-") as folder:
            return _dispatch(imported_model(path, Path(folder), args), args)
    return _dispatch(path, args)


def _dispatch(path: Path, args: argparse.Namespace) -> int:
    if args.command == "compile":
        return _compile(path, args)
    if args.command == "export":
        return _export(path, args)
    if args.command == "run":
        from netdsl.cli.run import run_command

        return run_command(path, args)
    if args.command == "filters":
        from netdsl.cli.filters import filters_command

        return filters_command(path, args)
    if args.command == "neighbours":
        from netdsl.cli.neighbours import neighbours_command

        return neighbours_command(path, args)
    if args.command == "tune":
        from netdsl.cli.tune import tune_command

        return tune_command(path, args)
    graph = load_graph(path, batch=args.batch, dtype=args.dtype, memory_limit=args.memory_limit)
    if args.command == "info":
        from netdsl.cli.info import info_table

        print(info_table(graph))
    elif args.command == "graph":
        from netdsl.cli.dot import write_graph

        refuse_overwriting(args.output, [path, args.given], "--output")
        write_graph(graph, args.output)
    return 0


def _compile(path: Path, args: argparse.Namespace) -> int:
    from netdsl.compiler.compile import compile_net, write_build

    dot_precision(args.dtype, args.precision, where="--precision")
    if args.recompute != "none" and not args.train:
        raise NetError(
            "--recompute plans a training step", where="--recompute", hint="give --train too, or leave out --recompute"
        )
    sizes = {"batch": args.batch, "dtype": args.dtype, "memory_limit": args.memory_limit}
    options = Options(**sizes, recompute=args.recompute, **plan_options(args))
    check_options(options, where={"space_to_depth": "--space-to-depth"})
    training = None
    if args.train:  # --dump-after names a training pass
        from netdsl.compiler.train_plan import compile_training, write_training

        training = compile_training(path, options, args.dump_after)
    compiled = compile_net(path, options, dump_after=None if training else args.dump_after)
    listing = training.dump if training else compiled.dump
    if listing:
        print(listing, end="")
    out = args.output or Path("build") / compiled.program.graph["name"]
    write_build(compiled, out, options, sm90=args.sm90)
    print((out / "report.txt").read_text(encoding="utf-8"), end="")
    print(f"wrote {out}/kernels ({len(compiled.kernels)} files), {out}/plan.json, {out}/report.txt")
    if not training:
        from netdsl.compiler.train_plan import remove_training

        if remove_training(out):
            print(f"removed {out}/train: an earlier compile --train wrote it, and this build has no training step")
    if training:
        written = write_training(training, out, sm90=args.sm90)
        print((written / "report.txt").read_text(encoding="utf-8"), end="")
        print(f"wrote {written} ({len(training.kernels)} step files), {written}/plan.json, {written}/report.txt")
    return 0


def _export(path: Path, args: argparse.Namespace) -> int:
    try:
        from netdsl.interop.onnx_export import export_onnx
    except ImportError:
        raise NetError("exporting needs onnx", where="export", hint="pip install 'netdsl[onnx]'") from None
    from netdsl.runtime.weights import checked_weights, init_weights, load_weights, weight_specs, weights_metadata
    from netdsl.train.augment import Preprocess
    from netdsl.train.runs import weights_file

    args.weights = weights_file(args.weights)
    refuse_folder(args.output, "--output")
    for written in (args.output, args.output.with_name(args.output.name + ".data")):
        refuse_overwriting(written, [path, args.weights], "--output")
    graph = load_graph(path, batch=args.batch, dtype=args.dtype, memory_limit=args.memory_limit)
    weights = load_weights(args.weights, graph) if args.weights else init_weights(graph, seed=args.seed)
    preprocess = None
    if args.weights:  # as any net that takes weights: refused when they hold NaN or infinities
        try:
            checked_weights(weights, weight_specs(graph))
        except NetError as error:
            error.where = "--weights"
            raise
        # how training prepared images, checked as `netdsl run` checks it, goes into the model as it is
        preprocess = weights_metadata(args.weights).get("netdsl.preprocess")
        if preprocess is not None:
            record = Preprocess.from_json(preprocess, where=str(args.weights))
            if len(graph.graph["inputs"]) == 1:
                record.check_fits(graph.nodes[graph.graph["inputs"][0]]["layer"].shape, str(args.weights))
    try:
        export_onnx(graph, weights, args.output, external_data=args.external_data or None, preprocess=preprocess)
    except OSError as error:
        raise NetError(
            f"cannot write {args.output}: {error.strerror or error}", where=str(args.output), hint=os_hint(error)
        ) from None
    print(f"wrote {args.output}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from netdsl.train.augment import Preprocess

    import_to_files = onnx_importer("import")
    refuse_folder(args.output, "--output")
    if args.weights_out is not None:
        refuse_folder(args.weights_out, "--weights-out")
    weights = args.weights_out or args.output.with_suffix(".safetensors")
    result = import_to_files(args.model, args.output, weights, towers=args.towers, read_preprocess=Preprocess.from_json)
    for note in result.notes:
        print(f"{args.model}: note: {note}", file=sys.stderr)
    print(f"wrote {args.output} and {weights}")
    return 0


def _wants_color(argv: list[str]) -> bool:
    """--color as given (`--color=never` or `--color never`); read before parsing, which may fail."""
    choice = "auto"
    for i, arg in enumerate(argv):
        if arg.startswith("--color="):
            choice = arg.split("=", 1)[1]
        elif arg == "--color" and i + 1 < len(argv):
            choice = argv[i + 1]
    return color_wanted(choice)


def _printable(stream) -> None:
    """Text a stream's encoding cannot write (a file name of bytes that are not UTF-8, given on the command line,
    reaches Python as lone surrogates) is written escaped, not an error after the command did its work."""
    if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _printable(sys.stdout)
    debug = "--debug" in argv
    color = _wants_color(argv)
    try:
        try:
            return run(argv)
        except OSError as error:
            named = environment_error(error)
            if named is None:
                raise
            raise named from None
    except NetError as error:
        if debug:
            traceback.print_exc()
        print(error.format(color=color), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netdsl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:  # a bug in netdsl (or in a library under it), not a mistake of the user's
        if debug:
            raise
        print(
            f"netdsl: internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
            "hint: this is a bug; run the same command with --debug for the traceback, and please report it",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
