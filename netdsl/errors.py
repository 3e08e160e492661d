"""User-facing errors: a location in a `.net` file, what is wrong, and a hint.

Every mistake a user can make is raised as a `NetError`. The CLI prints it with `format()` and exits
with status 1; nothing else in netdsl prints tracebacks to users.
"""

from __future__ import annotations

import difflib
import errno
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns count from 1, `end_col` is exclusive."""

    file: str
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Frame:
    """One step of a block expansion: the block's name and the span of the call that expanded it."""

    block: str
    call: Span


_TEXTS: dict[str, str] = {}


class Sources:
    """The text of every file read in this process, so errors can quote the offending line."""

    @staticmethod
    def remember(file: str, text: str) -> None:
        _TEXTS[file] = text

    @staticmethod
    def line(file: str, line: int) -> str | None:
        text = _TEXTS.get(file)
        if text is None:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                return None
        lines = text.split("\n")  # as the lexer counts lines: not at form feeds, U+2028 and the like
        if 1 <= line <= len(lines):
            return lines[line - 1].removesuffix("\r")
        return None


@dataclass
class NetError(Exception):
    """A mistake in a net, its file or its options, reported to the user without a traceback."""

    message: str
    span: Span | None = None
    hint: str | None = None
    trace: tuple[Frame, ...] = ()
    notes: list[tuple[Span, str]] = field(default_factory=list)
    where: str | None = None  # a file or flag to blame when there is no span

    def __str__(self) -> str:
        return self.format(color=False)

    def format(self, color: bool = False) -> str:
        red, bold, blue, reset = ("\033[31m", "\033[1m", "\033[34m", "\033[0m") if color else ("",) * 4
        head = str(self.span) if self.span else (self.where or "netdsl")
        out = [f"{bold}{head}: {red}error:{reset}{bold} {self.message}{reset}"]
        if self.span:
            out += _quote(self.span, blue, reset)
        for frame in reversed(self.trace):
            out.append(f"  in block `{frame.block}`, used at {frame.call}:")
            out += _quote(frame.call, blue, reset)
        for span, text in self.notes:
            out.append(f"{span}: note: {text}")
            out += _quote(span, blue, reset)
        if self.hint:
            out.append(f"{blue}hint:{reset} {self.hint}")
        return "\n".join(out)


def color_wanted(choice: str) -> bool:
    """Whether error messages on standard error are coloured, by --color's choice: auto, always or never."""
    return choice == "always" or (choice == "auto" and sys.stderr.isatty())


def _shown(text: str) -> str:
    """A source line as quoted: tabs to 4 columns, other unprintable characters as a space each."""
    return "".join(char if char.isprintable() or char == "\t" else " " for char in text).expandtabs(4)


def _quote(span: Span, blue: str, reset: str) -> list[str]:
    raw = Sources.line(span.file, span.line)
    if raw is None:
        return []
    text = _shown(raw)
    start = len(_shown(raw[: span.col - 1]))  # the caret under the column the lexer counted, tabs expanded
    width = 1
    if span.end_line == span.line and span.end_col > span.col:
        width = max(1, len(_shown(raw[: span.end_col - 1])) - start)  # at least one, past the line's end too
    elif span.end_line > span.line:
        width = max(1, len(text) - start)
    gutter = f"{span.line:>5} | "
    pad = " " * (len(gutter) - 2) + "| "
    return [f"{blue}{gutter}{reset}{text}", f"{blue}{pad}{reset}{' ' * start}{'^' * width}"]


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A hint naming the closest of `choices` to a misspelled `word`, or None."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


_OS_HINTS = {
    errno.ENOENT: "check the path: a relative one starts from the folder netdsl runs in",
    errno.EISDIR: "name a file here, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EACCES: "check the permissions of the file and of the folders above it",
    errno.EPERM: "check the permissions of the file and of the folders above it",
    errno.ENOSPC: "free some space on the disk, or write somewhere else",
    errno.EDQUOT: "free some space (a disk quota is full), or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EEXIST: "something of that name is in the way: move it, or choose another name",
    errno.ENOTEMPTY: "something of that name is in the way: move it, or choose another name",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.ELOOP: "the path goes round a loop of symbolic links",
    errno.EMFILE: "too many files are open: raise the limit (ulimit -n)",
    errno.ENFILE: "too many files are open on this machine",
}


def os_hint(error: OSError) -> str:
    """A hint for a file that could not be read or written, from what the operating system said."""
    return _OS_HINTS.get(error.errno, "check the path, its permissions and the free disk space")


# The errors the system gives about a path that are never netdsl's bugs: its name, its permissions, its disk
_ENVIRONMENT = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def environment_error(error: OSError) -> NetError | None:
    """An OSError the command did not foresee that is about the user's path or machine, not a bug: a name longer
    than the file system takes (pathlib's `exists` and `is_file` raise it, where a missing file is only False,
    so it fails at whichever look-up meets it first), no permission, a full or read-only disk. Said as the
    foreseen ones are, naming the path and with a hint; None for any other OSError."""
    if error.errno not in _ENVIRONMENT:
        return None
    where = error.filename if isinstance(error.filename, str) else None
    shown = f"{where[:60]}...{where[-20:]}" if where is not None and len(where) > 100 else where
    path = f"the path {shown}" if where is not None else "a path"
    if error.errno == errno.ENAMETOOLONG:
        message = f"a name in {path} is longer than the file system takes"
    else:
        message = f"cannot use {path}: {error.strerror}"
    return NetError(message, where=where, hint=os_hint(error))
