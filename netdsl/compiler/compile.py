"""`netdsl compile`: a `.net` file -> a build directory with the fused kernels, the plan and the report.

    build/alexnet/
        kernels/<step>.py   one readable Triton file per fused kernel (see netdsl.compiler.emit)
        plan.json           what the runtime follows (see netdsl.compiler.plan)
        report.txt          FLOPs, bytes and roofline floors, fused vs unfused (see netdsl.compiler.report)

    build/alexnet/train/    with `--train`: the training step files, their plan and report

The same input and options give byte-identical files. The build is written whole into a folder beside the
build folder and swapped in at once (`write_build`): a reader finds the earlier build or the new one, never
half a file or a mix of the two, a stale file from an earlier compile of another net is gone, and the
files a user put in the build folder stay.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx

from netdsl.compiler.emit import emit_program
from netdsl.compiler.launches import Launch, record_launches, sm90_resources
from netdsl.compiler.passes import PASS_NAMES, Options, check_nchw_taps, check_pass_name, dump, run_passes
from netdsl.compiler.plan import PLAN_OPTIONS, build_plan, plan_json, with_source
from netdsl.compiler.report import cost_report
from netdsl.compiler.tuning import Tuning, emit_tuned, read_tuning
from netdsl.errors import NetError
from netdsl.files import exchange, rename_no_replace, write_atomic, write_temporary
from netdsl.ir.dtypes import dot_precision
from netdsl.lang.build import build
from netdsl.lang.parse import parse_file
from netdsl.tables import format_table

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

if TYPE_CHECKING:
    from netdsl.compiler.train_plan import CompiledTraining


@dataclass
class Compiled:
    program: nx.DiGraph  # the step graph after every pass
    layers: nx.DiGraph  # the shaped layer graph before folding and fusion
    kernels: dict[str, str]  # file name -> source
    plan: dict
    report: str
    dump: str  # the `--dump-after` listing, or ""
    source: Path | None = None  # the .net file it was compiled from
    tuning: Tuning | None = None  # the tuning file whose tiles the kernels take (`--tuning`)


def compile_net(
    path: str | Path, options: Options, input_precision: str | None = None, dump_after: str | None = None
) -> Compiled:
    """Runs the front end and every pass, then emits; raises NetError for a mistake in the net.
    The products of `tl.dot` are `input_precision`, by default what the dtype and `options.precision` say
    (`netdsl.ir.dtypes.dot_precision`: exact for fp32 unless asked for tf32x3, TF32 for tf32)."""
    if input_precision is None:
        input_precision = dot_precision(options.dtype, options.precision)
    check_pass_name(dump_after)
    after = run_passes(build(parse_file(path)), options)
    program, layers = after[PASS_NAMES[-1]], after["shapes"]
    listing = dump(after[dump_after]) if dump_after else ""
    report = cost_report(program, layers, options.batch, options.dtype)
    tuning = None if options.tuning is None else read_tuning(options.tuning)  # tiles timed by `netdsl tune`
    if tuning is None:
        kernels = emit_program(program, input_precision, options.dtype)
    else:
        chosen = {name: getattr(options, name) for name in PLAN_OPTIONS if name != "tuning"}
        kernels, lines = emit_tuned(program, input_precision, options.dtype, tuning, chosen)
        report += "\n" + "\n".join(lines) + "\n"
    step_files = {name.removesuffix(".py"): f"kernels/{name}" for name in kernels}
    plan = build_plan(program, options, step_files)
    return Compiled(program, layers, kernels, plan, report, listing, Path(path), tuning)


def write_build(
    compiled: Compiled,
    out_dir: str | Path,
    options: Options | None = None,
    sm90: bool = False,
    training: CompiledTraining | None = None,
) -> Path:
    """Writes the build folder. With `options`, each launch's grid and block configuration at that batch and
    dtype go into plan.json; with `sm90`, every kernel is also built for the H100 and its registers, spills,
    shared memory and tensor-core instructions go into the report; with `training` (compile_training), its
    `train/` is part of the build (a build without it has none). `compiled` is not changed: writing twice
    writes the same files.

    The whole build is written into a new folder beside the build folder first, and the launches recorded
    from there; only when all of it succeeded does it take the build folder's place (`_put_in_place`), in one
    step: a reader finds the earlier build whole or the new one whole, never a mix, and a build that cannot
    be written, or fails or is killed on the way, leaves the earlier build as it was. The files a user put in
    the build folder beside netdsl's (BUILD_ENTRIES) move into the new one. What a killed compile left
    beside the folder is cleared up (or put back) by the next compile into it (`_sweep`)."""
    check_nchw_taps(compiled.program)
    out = Path(out_dir)
    folder = _build_folder(out)
    with _staged_build(folder) as staged:
        _make_folder(staged / "kernels")
        for name, source in compiled.kernels.items():
            write_atomic(staged / "kernels" / name, source)
        plan, report = copy.deepcopy(compiled.plan), compiled.report
        if options is not None:
            kernel_files = [staged / "kernels" / name for name in compiled.kernels]
            launches = record_launches(kernel_files, options.batch, options.dtype)
            _add_grids(plan, launches)
            if sm90:
                report += sm90_report(sm90_resources(launches), launches)
        if compiled.source is not None:
            plan = with_source(plan, compiled.source, out)
        for name, text in (("plan.json", plan_json(plan)), ("report.txt", report)):
            temporary = write_temporary(staged / name, text.encode("utf-8"))
            try:
                os.replace(temporary, staged / name)
            except OSError as error:
                raise _cannot_write(folder, error) from None
        if training is not None:
            from netdsl.compiler.train_plan import write_training

            write_training(training, staged, sm90=sm90)
        _put_in_place(staged, folder)
    return out


# --- the build folder, replaced whole ---------------------------------------------------------------------
#
# A compile writes its build into `.<name>.netdsl-new.<hex>` beside the build folder `<name>` and swaps the
# two paths in one step (Linux's renameat2 RENAME_EXCHANGE); the earlier build, now at the hidden name, hands
# its user's files over and is removed. Where two paths cannot be swapped in one step (another system, some
# network file systems), the earlier build is renamed to `.<name>.netdsl-old.<hex>` and the new one into its
# place: for that instant there is no build folder, and a compile killed right there leaves none; the next
# compile puts the earlier one back before it starts.
#
# The build folder is a new folder after each compile: a shell whose working directory was the build folder
# is left in the earlier one, removed (`cd` to it again).
#
# Each compile holds a lock (flock, which ends with the process, however it ends) on its new folder and, while
# it swaps, on the folder it replaces. A hidden folder of these names that nobody holds is what a killed
# compile left, which the next compile clears up. Two compiles into one folder at once take turns at the swap.

BUILD_ENTRIES = ("kernels", "plan.json", "report.txt", "train")  # what netdsl writes in a build folder
# What netdsl wrote inside the build folder itself before builds were replaced whole (a kill left them there)
_INNER_STAGING = re.compile(r"\.(?:kernels|train)(?:-old)?\.[0-9a-f]{16}|\.(?:plan\.json|report\.txt)\.[0-9a-f]{16}")


def _build_folder(out: Path) -> Path:
    """The folder `out` names, symbolic links followed (a link stays as it is), its parent made."""
    folder = Path(os.path.realpath(out))
    if folder.exists() and not folder.is_dir():
        raise NetError(f"cannot write the build in {out}: it is a file, not a folder", where=str(out))
    _make_folder(folder.parent, parents=True)
    return folder


def _make_folder(folder: Path, parents: bool = False) -> None:
    try:
        folder.mkdir(parents=parents, exist_ok=parents)
    except OSError as error:
        raise NetError(f"cannot write the build in {folder}: {error.strerror or error}", where=str(folder)) from None


@contextmanager
def _staged_build(folder: Path) -> Iterator[Path]:
    """A new folder beside `folder`, held (locked) by this compile, to write a build into; removed if the block
    fails before it took `folder`'s place. What killed compiles left beside `folder` is cleared up first."""
    _sweep(folder)
    try:
        staged, lock = _new_locked_folder(folder.parent, f".{folder.name}.netdsl-new")
    except OSError as error:
        where = folder.parent
        raise NetError(
            f"cannot write the build in {where}: {error.strerror or error}",
            where=str(where),
            hint=f"a build is written into a new folder beside {folder.name} first: {where} must be writable",
        ) from None
    try:
        yield staged
    except BaseException:
        if _same_folder(lock, staged):  # not swapped in: only this compile's files (else the earlier build's)
            shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        _unlock(lock)


def _put_in_place(staged: Path, folder: Path) -> None:
    """`staged` becomes `folder` in one step, waiting while another compile swaps its build in; the build
    `folder` held hands over its user's files (`_retire`). A NetError leaves `folder` as it was."""
    while True:
        try:
            current = _lock_current(folder)
        except OSError as error:
            raise _cannot_write(folder, error) from None
        if current is None:  # no build yet
            try:
                rename_no_replace(staged, folder)
                return
            except FileExistsError:
                continue  # made at this instant by another compile: swap with it
            except OSError as error:
                raise _cannot_write(folder, error) from None
        try:
            with contextlib.suppress(OSError):  # the folder's permissions stay as its owner set them
                os.chmod(staged, stat.S_IMODE(os.stat(folder).st_mode))
            _retire(_swap(staged, folder), folder)
            return
        finally:
            _unlock(current)


def _swap(staged: Path, folder: Path) -> Path:
    """Puts `staged` at `folder`; where the earlier build is now."""
    try:
        if exchange(staged, folder):
            return staged
        old = new_folder(folder.parent, f".{folder.name}.netdsl-old")
        old.rmdir()
        os.rename(folder, old)
    except OSError as error:
        raise _cannot_write(folder, error) from None
    try:
        os.rename(staged, folder)
    except OSError as error:
        with contextlib.suppress(OSError):  # else the next compile puts it back (`_sweep`)
            os.rename(old, folder)  # the earlier build back
        raise _cannot_write(folder, error) from None
    return old


def _cannot_write(folder: Path, error: OSError) -> NetError:
    hint = None
    if error.errno in (errno.EBUSY, errno.EXDEV):  # a mount point, or a folder on another file system
        hint = f"{folder} cannot be replaced whole where it is: write the build into a folder inside it"
    return NetError(f"cannot write the build in {folder}: {error.strerror or error}", where=str(folder), hint=hint)


def _retire(old: Path, folder: Path) -> None:
    """The earlier build `old`, replaced by `folder`: the entries its user put there move into `folder`,
    netdsl's own are removed, then `old` itself. An entry whose name `folder` has taken meanwhile stays in
    `old`, and so does `old` (a user's file is never deleted); the next compile tries again."""
    try:
        names = os.listdir(old)
    except OSError:
        return
    ours = [name for name in names if name in BUILD_ENTRIES or _INNER_STAGING.fullmatch(name)]
    for name in sorted(set(names) - set(ours)):
        with contextlib.suppress(OSError):
            rename_no_replace(old / name, folder / name)
    for name in sorted(ours, key=lambda name: name == "plan.json"):  # the plan last: a folder with one is whole
        path = old / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    with contextlib.suppress(OSError):
        old.rmdir()


def _sweep(folder: Path) -> None:
    """Clears up what compiles killed on the way left beside `folder` and nobody holds: a new build never
    swapped in is removed, an earlier build swapped out hands over its user's files (`_retire`), and an
    earlier build renamed away when `folder` is missing (killed between two renames) is put back."""
    if fcntl is None:
        return  # no way to tell a folder in use from one left behind
    left = re.compile(rf"\.{re.escape(folder.name)}\.netdsl-(new|old)\.[0-9a-f]{{16}}")
    try:
        names = sorted(os.listdir(folder.parent))
    except OSError:
        return
    for name in names:
        match = left.fullmatch(name)
        try:
            lock = None if match is None else _lock(folder.parent / name)
        except OSError:
            lock = None
        if lock is None:
            continue  # not netdsl's, in use, gone or unreadable
        try:
            path = folder.parent / name
            whole = (path / "plan.json").is_file() and (path / "kernels").is_dir()  # not retired half-way
            if match.group(1) == "old" and whole and not os.path.lexists(folder):
                with contextlib.suppress(OSError):
                    rename_no_replace(path, folder)
                    continue
            _retire(path, folder)
        finally:
            _unlock(lock)


def _new_locked_folder(parent: Path, prefix: str) -> tuple[Path, int]:
    """`new_folder`, held by this process (`_lock`) from before anyone may find it unheld and in use."""
    for _ in range(100):
        folder = new_folder(parent, prefix)
        lock = _lock(folder)
        if lock is not None:
            return folder, lock
    raise FileExistsError(f"no free name for a new folder in {parent}")


def _lock_current(folder: Path) -> int | None:
    """The lock of the folder now at `folder`, waited for; None where there is none."""
    while True:
        lock = _lock(folder, wait=True)
        if lock is not None or not os.path.lexists(folder):
            return lock


def _lock(path: Path, wait: bool = False) -> int | None:
    """An open descriptor of the folder at `path` holding its lock, or None: another process holds it (and not
    `wait`), or by the time it was held `path` was gone or another folder. -1 where there are no such locks."""
    if fcntl is None:
        return -1 if os.path.lexists(path) else None
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        if _same_folder(descriptor, path):
            return descriptor
    except BlockingIOError:
        pass
    os.close(descriptor)
    return None


def _same_folder(descriptor: int, path: Path) -> bool:
    """Whether `path` is the folder open at `descriptor` (which is -1 where there are no locks)."""
    try:
        return descriptor < 0 or os.path.samestat(os.fstat(descriptor), os.stat(path))
    except OSError:
        return False


def _unlock(descriptor: int) -> None:
    if descriptor >= 0:
        os.close(descriptor)


@contextmanager
def staged_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder in `parent` (made, with `parent`, if need be) to write a build into before it is swapped in
    (`swap_folder`); removed if the block fails. A folder that cannot be made is a NetError naming `parent`."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staged = new_folder(parent, prefix)
    except OSError as error:
        raise NetError(f"cannot write the build in {parent}: {error.strerror or error}", where=str(parent)) from None
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def new_folder(parent: Path, prefix: str) -> Path:
    """A new, empty folder in `parent` with a name of its own (mode 0777 less the umask, as any folder)."""
    for _ in range(100):
        folder = parent / f"{prefix}.{secrets.token_hex(8)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for a new folder in {parent}")


def swap_folder(current: Path, new: Path) -> None:
    """`new` becomes `current`, in one step where the system can swap two paths (else by two renames, and
    should the second fail the first is undone); the old `current` (if any) is removed afterwards."""
    old = None
    try:
        if not current.exists():
            new.rename(current)
        elif exchange(new, current):
            old = new
        else:
            old = new_folder(current.parent, f".{current.name}-old")
            old.rmdir()
            current.rename(old)
            new.rename(current)
    except OSError as error:
        if old is not None and old.exists() and not current.exists():
            old.rename(current)  # put the earlier folder back
        raise NetError(f"cannot write {current}: {error.strerror or error}", where=str(current.parent)) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _add_grids(plan: dict, launches: list[Launch]) -> None:
    by_step = {launch.step: launch for launch in launches}
    for device in plan["devices"].values():
        for entry in device["launches"]:
            launch = by_step.get(entry["step"])
            if launch is not None:
                entry["grid"] = list(launch.grid)
                entry["num_warps"] = launch.num_warps
                entry["constexprs"] = {k: v for k, v in launch.constexprs.items() if v is not None}


def sm90_report(resources: dict[str, dict], launches: list[Launch]) -> str:
    """Per kernel: what it needs from an H100 SM (built with Triton for GPUTarget("cuda", 90, 32))."""
    rows = []
    for launch in launches:
        r = resources[launch.step]
        rows.append(
            (
                launch.step,
                str(launch.num_warps),
                str(r["registers"]),
                f"{r['spill_stores']}/{r['spill_loads']}",
                str(r["stack_bytes"]),
                str(r["shared_bytes"]),
                ",".join(r["mma"]) or "-",
            )
        )
    header = ("kernel", "warps", "registers", "spill st/ld B", "stack B", "shared B", "tensor-core instructions")
    lines = [
        "",
        'sm_90 build (Triton for GPUTarget("cuda", 90, 32); 255 registers and 227 KiB shared per block at most):',
    ]
    lines += format_table(header, rows, left={0, 6})
    spilled = [
        launch.step
        for launch in launches
        if resources[launch.step]["spill_stores"] + resources[launch.step]["spill_loads"]
    ]
    lines.append(f"kernels that spill: {', '.join(spilled) if spilled else 'none'}")
    return "\n".join(lines) + "\n"
