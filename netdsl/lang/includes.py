"""`include "file.net"`: finding the included file, reporting include cycles, parsing each file once.

Two readers need an included file: the device pre-scan, which looks through the whole net before it
is built (inputs run on the first device the net names, in included files too), and the `include`
statement when it runs. Both get the same parsed module, so each file is read and parsed once, also
when a `repeat` runs its `include` many times.
"""

from __future__ import annotations

from pathlib import Path

from netdsl.errors import NetError, os_hint
from netdsl.lang import syntax as s
from netdsl.lang.parse import parse_file

INCLUDED = "included from here"  # the note each include adds to an error in the file it reads


class Includes:
    def __init__(self, main_file: str) -> None:
        self.main = Path(main_file).resolve()
        self.open: list[Path] = [self.main]  # the main file, then each include being run: a cycle reopens one
        self._parsed: dict[Path, s.Module | NetError] = {}  # a file that does not parse fails again the same way

    def enter(self, stmt: s.IncludeStmt, includer: str) -> tuple[Path, s.Module]:
        """The file `stmt` includes and its statements, open until `leave`; a NetError where it cannot
        be included (a name the file system rejects, a cycle, no such file, a syntax error)."""
        try:
            path, is_file = _locate(stmt, includer)
        except (OSError, ValueError) as error:  # a NUL byte, a name too long for the file system, ...
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            hint = os_hint(error) if isinstance(error, OSError) else "write the path without control characters"
            raise NetError(f'cannot include "{stmt.path}": {reason}', stmt.span, hint=hint) from None
        if path in self.open:
            chain = " -> ".join(str(p.name) for p in [*self.open[self.open.index(path) :], path])
            raise NetError(f"include cycle: {chain}", stmt.span, hint="an included file cannot include its includer")
        if not is_file:
            raise NetError(
                f'cannot include "{stmt.path}": no such file ({path})',
                stmt.span,
                hint="include paths are relative to the file that includes them",
            )
        try:
            module = self.parse(path)
        except NetError as error:
            error.notes.append((stmt.span, INCLUDED))
            raise
        self.open.append(path)
        return path, module

    def leave(self) -> None:
        self.open.pop()

    def find(self, stmt: s.IncludeStmt, includer: str) -> Path | None:
        """The file `stmt` includes, or None where there is none (`enter` reports why)."""
        try:
            path, is_file = _locate(stmt, includer)
        except (OSError, ValueError):
            return None
        return path if is_file else None

    def parse(self, path: Path) -> s.Module:
        """The statements of an included file, parsed the first time they are asked for."""
        if path not in self._parsed:
            try:
                self._parsed[path] = parse_file(path)
            except NetError as error:
                self._parsed[path] = error
        parsed = self._parsed[path]
        if isinstance(parsed, NetError):
            raise parsed
        return parsed


def _locate(stmt: s.IncludeStmt, includer: str) -> tuple[Path, bool]:
    """The path `stmt` names, relative to the including file, and whether it is a file. Raises OSError or
    ValueError for a name the file system rejects (`is_file` raises for a name too long, too)."""
    path = (Path(includer).parent / stmt.path).resolve()
    return path, path.is_file()
