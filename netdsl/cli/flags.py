"""What several commands share: the compile-time flags of `netdsl compile` and `netdsl run`
(netdsl.compiler.passes.Options), the types of numbers flags take, and the checks of --weights and of a picture
to write (`filters`, `neighbours`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from netdsl.compiler.layout import LAYOUT_OPTIONS
from netdsl.compiler.plan import PLAN_OPTIONS
from netdsl.errors import NetError
from netdsl.ir.dtypes import FP32_PRECISIONS
from netdsl.train.recipe import MAX_SEED, MAX_TIMEOUT

LAYOUT_HELP = "auto: channels-last maps for convs with 16+ input channels per group (the default); nchw: none"
PRECISION_HELP = "fp32 products: ieee (exact, on FMA units; the default) or tf32x3 (three TF32 tensor-core products)"
SPACE_TO_DEPTH_HELP = "run strided convs over few channels (AlexNet's conv1) as stride-1 convs over pixel blocks"
SPLIT_K_HELP = "let channels-last convs share a tile's taps among programs when the batch is too small to fill the GPU"
TUNING_HELP = "the tiles each kernel takes, as `netdsl tune` timed them on a device (a tuning file)"
MERGE_TOWERS_HELP = (
    "run each layer of a towers block as one grouped launch on the first tower's device (for towers on one GPU)"
)


def seed_number(text: str) -> int:
    """An argparse type: a seed as numpy's and torch's generators take it (and `train`'s `seed` setting)."""
    if not text.isdigit() or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"not a seed (a whole number from 0 to {MAX_SEED}): {text!r}")
    return int(text)


def seconds(text: str) -> float:
    """An argparse type: how long a process waits for the others under torchrun, in seconds: above 0, at most
    a week (as `train`'s `timeout` setting)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"not a time in seconds above 0 and at most {MAX_TIMEOUT:,} (a week): "
                                         f"{text!r}")
    return value


def image_sizes(text: str) -> tuple[int, ...]:
    """An argparse type: shorter sides to scale images to, comma-separated, each a whole number from 1 to
    65536 (a saved preprocessing's bound), none twice."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() and 1 <= int(part) <= 65536 for part in parts):
        raise argparse.ArgumentTypeError(f"not sizes in pixels, each from 1 to 65536: {text!r} (e.g. 256,384,512)")
    sizes = tuple(int(part) for part in parts)
    if len(set(sizes)) < len(sizes):
        raise argparse.ArgumentTypeError(f"a size given twice: {text!r}")
    return sizes


def add_plan_flags(parser: argparse.ArgumentParser, tuning: bool = True) -> None:
    """The compile-time choices `compile` and `run` share (netdsl.compiler.passes.Options; `plan_options`);
    `tuning=False` leaves out `--tuning` (for `tune`, which makes tuning files)."""
    parser.add_argument("--layout", choices=LAYOUT_OPTIONS, help=LAYOUT_HELP)  # None: not given (auto)
    parser.add_argument("--precision", choices=FP32_PRECISIONS, help=PRECISION_HELP)
    parser.add_argument("--space-to-depth", action="store_true", help=SPACE_TO_DEPTH_HELP)
    parser.add_argument("--merge-towers", action="store_true", help=MERGE_TOWERS_HELP)
    parser.add_argument("--split-k", action="store_true", help=SPLIT_K_HELP)
    if tuning:
        parser.add_argument("--tuning", metavar="FILE", help=TUNING_HELP)


def plan_options(args: argparse.Namespace) -> dict[str, object]:
    """The values of `add_plan_flags`'s flags, by the name Options and Net take them (and plan.json records; the
    tuning file by its absolute path, which a build folder's `netdsl run` finds from anywhere)."""
    options = {name: getattr(args, name, None) for name in PLAN_OPTIONS}
    if options["layout"] is None:
        options["layout"] = "auto"
    if options["tuning"] is not None:
        options["tuning"] = str(Path(options["tuning"]).resolve())
    return options


def require_weights(weights, what: str) -> None:
    """NetError on --weights where a command that needs trained weights (`what` it does with them) has none."""
    if weights is None:
        raise NetError(
            f"{what}, and none were given",
            where="--weights",
            hint="give --weights (a weights file, a checkpoint or a run folder of netdsl train), or an .onnx model",
        )


def output_file(path, flag: str, read: list, suffix: str, kind: str, hint: str | None = None) -> None:
    """NetError on `flag` unless `path` names a file ending in `suffix` (`kind` says what it is to be: "a .png
    file") that is none of the files `read`: said before any work, not by the write at its end."""
    from netdsl.files import refuse_folder, refuse_overwriting

    refuse_folder(path, flag)
    if path.suffix.lower() != suffix:
        raise NetError(f"{path} is not {kind}", where=flag, hint=hint or f"give a name ending in {suffix}")
    refuse_overwriting(path, read, flag)


def png_output(path, read: list) -> None:
    """`output_file` for the picture --output names, and Pillow there to write it."""
    from netdsl.train.augment import import_pillow

    output_file(path, "--output", read, ".png", "a .png file")
    import_pillow()


def ensemble_classes(models: list) -> list[str] | None:
    """The class names an ensemble's models were trained on, from `models`' (weights file, saved preprocessing
    or None) pairs: those of the first that names them (None where none does). A model whose weights name other
    classes, or the same in another order, is a NetError naming it: an ensemble averages the same classes."""
    named = [(path, list(own.classes)) for path, own in models if own is not None and own.classes]
    for path, classes in named[1:]:
        if classes != named[0][1]:
            raise NetError(
                f"{path} was trained on other classes than {named[0][0]}",
                where=str(path),
                hint="an ensemble averages models of the same classes, in the same order",
            )
    return named[0][1] if named else None
