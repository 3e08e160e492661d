"""`netdsl runs`: training runs side by side, from their run folders (no checkpoint is loaded): how far each got,
its best and last validation figures and the settings in which the runs differ; `-o runs.png` draws their
curves together. A run that cannot be read (a damaged recipe.json) is an error naming it, after the table of the
others."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from netdsl.errors import NetError, color_wanted
from netdsl.train.runs import ROOT

HELP = "compare training runs: progress, best and last validation top-1, the settings that differ"


def add_command(commands) -> None:
    sub = commands.add_parser("runs", help=HELP, description=HELP)
    sub.add_argument(
        "folders",
        nargs="*",
        type=Path,
        metavar="RUN",
        help=f"run folders (the --out of netdsl train), or folders holding them at any depth (default: {ROOT})",
    )
    sub.add_argument(
        "--sort", choices=("best", "name"), default="best",
        help="best: by best validation top-1, highest first (runs without one last); name: by folder",
    )  # fmt: skip
    sub.add_argument(
        "-o", "--output", type=Path, metavar="OUT.png",
        help="draw each run's validation top-1 and training loss per epoch (matplotlib)",
    )  # fmt: skip
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def runs_command(args: argparse.Namespace) -> int:
    from netdsl.cli.flags import output_file
    from netdsl.train.history import find_runs, read_history

    folders = args.folders or [ROOT]
    paths = find_runs(folders)
    if args.output is not None:
        output_file(args.output, "--output", [], ".png", "a .png file")
    histories, names, unread = [], [], []
    for path in paths:
        try:
            histories.append(read_history(path))
            names.append(str(path))
        except NetError as error:  # the others are still listed; the error comes after them
            unread.append(error)
    if histories:
        _show(args, histories, names)
    if unread:
        sys.stdout.flush()
        for error in unread[:-1]:  # (main reports the last one, as any command's error)
            print(error.format(color=color_wanted(getattr(args, "color", "auto"))), file=sys.stderr)
        raise unread[-1]
    return 0


def _show(args: argparse.Namespace, histories: list, names: list[str]) -> None:
    """The table of the runs read, in --sort's order, and their picture where -o asks for one."""
    from netdsl.tables import format_table
    from netdsl.train.history import plot_histories, summary_rows

    order = list(range(len(histories)))
    if args.sort == "best":
        order.sort(key=lambda i: -histories[i].best["val_top1"] if histories[i].best else 1.0)  # (stable: ties kept)
    else:
        order.sort(key=lambda i: names[i])
    histories, names = [histories[i] for i in order], [names[i] for i in order]
    header, rows = summary_rows(histories, names)
    print("\n".join(format_table(header, rows, left={0, 1, 2, 9})))
    if args.output is not None:
        if not plot_histories(args.output, histories, names):
            raise NetError("drawing the runs needs matplotlib", where="--output", hint="pip install 'netdsl[train]'")
        print(f"wrote {args.output}")
