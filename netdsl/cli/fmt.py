"""`netdsl fmt FILE...`: `.net` files rewritten in the canonical layout (`netdsl.lang.format`), checked for
it (`--check`, for CI) or shown as a diff (`--diff`)."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

from netdsl.errors import NetError, os_hint
from netdsl.files import write_atomic
from netdsl.lang.format import format_text
from netdsl.lang.parse import read_source

FMT_HELP = "rewrite .net files in one canonical layout (indentation, spacing, aligned comments)"
STDIN = Path("-")
STDIN_NAME = "<stdin>"


def add_command(commands) -> None:
    """The `fmt` subcommand."""
    fmt = commands.add_parser("fmt", help=FMT_HELP, description=FMT_HELP)
    fmt.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help=".net files, or folders (their .net files, at any depth); - reads standard input and writes "
        "standard output",
    )
    fmt.add_argument(
        "--check",
        action="store_true",
        help="write nothing; list the files that would change, and exit with status 1 if there are any",
    )
    fmt.add_argument("--diff", action="store_true", help="write nothing; show the changes as a unified diff")
    fmt.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def fmt_command(args: argparse.Namespace) -> int:
    """Formats every file first and writes only then, so a file that does not parse leaves all of them
    as they were. Only the files that change are written."""
    changed = []
    for path in _expand(args.files):
        text = _stdin() if path == STDIN else read_source(path, keep_line_ends=True)
        formatted = format_text(text, STDIN_NAME if path == STDIN else str(path))
        if path == STDIN and not (args.check or args.diff):
            sys.stdout.write(formatted)
        elif formatted != text:
            changed.append((path, text, formatted))
    for path, text, formatted in changed:
        name = STDIN_NAME if path == STDIN else str(path)
        if args.diff:
            sys.stdout.writelines(
                difflib.unified_diff(
                    text.splitlines(keepends=True), formatted.splitlines(keepends=True), name, f"{name} (formatted)"
                )
            )
        elif args.check:
            print(f"would reformat {name}")
        else:
            _write(path, formatted)
            print(f"reformatted {path}")
    return 1 if args.check and changed else 0


def _expand(paths: list[Path]) -> list[Path]:
    """Each path given, a folder replaced by the .net files under it (sorted), each file once."""
    found: list[Path] = []
    for path in paths:
        if path == STDIN:
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*.net") if p.is_file())
        elif path.exists():
            found.append(path)
        else:
            raise NetError(f"no such file or folder: {path}", where=str(path), hint="check the path")
    return list(dict.fromkeys(found))


def _stdin() -> str:
    """Standard input as UTF-8 text, line ends as they are; other bytes are a NetError, as in a file."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NetError(
            f"standard input is not UTF-8 text (byte {error.start})",
            where=STDIN_NAME,
            hint="a .net file is plain UTF-8 text",
        ) from None


def _write(path: Path, text: str) -> None:
    """Replaces the file atomically, keeping its permissions (and, through a link, the link)."""
    target = path.resolve()
    try:
        mode = target.stat().st_mode & 0o7777
    except OSError as error:
        raise NetError(f"cannot write {path}: {error.strerror}", where=str(path), hint=os_hint(error)) from None
    write_atomic(target, text)
    try:
        os.chmod(target, mode)
    except OSError as error:
        raise NetError(
            f"cannot set the permissions of {path}: {error.strerror}", where=str(path), hint=os_hint(error)
        ) from None
