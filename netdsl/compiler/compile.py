"""`netdsl compile`: a `.net` file -> a build directory with the fused kernels, the plan and the report.

    build/alexnet/
        kernels/<step>.py   one readable Triton file per fused kernel (see netdsl.compiler.emit)
        plan.json           what the runtime follows (see netdsl.compiler.plan)
        report.txt          FLOPs, bytes and roofline floors, fused vs unfused (see netdsl.compiler.report)

The same input and options give byte-identical files. Every file is written to a temporary name and
renamed into place, so a reader never sees half a file; a stale `kernels/` file from an earlier
compile of another net is removed.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from netdsl.compiler.emit import emit_program
from netdsl.compiler.launches import Launch, record_launches, sm90_resources
from netdsl.compiler.passes import PASS_NAMES, Options, check_nchw_taps, check_pass_name, dump, run_passes
from netdsl.compiler.plan import PLAN_OPTIONS, build_plan, plan_json, with_source
from netdsl.compiler.report import cost_report
from netdsl.compiler.tuning import Tuning, emit_tuned, read_tuning
from netdsl.errors import NetError, os_hint
from netdsl.files import write_atomic, write_temporary
from netdsl.ir.dtypes import dot_precision
from netdsl.lang.build import build
from netdsl.lang.parse import parse_file
from netdsl.tables import format_table


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


def write_build(compiled: Compiled, out_dir: str | Path, options: Options | None = None, sm90: bool = False) -> Path:
    """Writes the build directory. With `options`, each launch's grid and block configuration at that
    batch and dtype go into plan.json; with `sm90`, every kernel is also built for the H100 and its
    registers, spills, shared memory and tensor-core instructions go into the report. `compiled` is
    not changed: writing twice writes the same files.

    The kernels are written to a new folder beside `kernels/` first, and the launches recorded from
    there; `plan.json` and `report.txt` are written whole to temporaries beside theirs. Only when all of
    it succeeded is the old `kernels/` swapped for the new and the two files renamed into place, one
    step after the other: a build that cannot be written, or fails on the way, leaves the folder's
    earlier build as it was. Other files in the folder are left alone."""
    check_nchw_taps(compiled.program)
    out = Path(out_dir)
    with staged_folder(out, ".kernels") as staged:
        for name, source in compiled.kernels.items():
            write_atomic(staged / name, source)
        plan, report = copy.deepcopy(compiled.plan), compiled.report
        if options is not None:
            launches = record_launches([staged / name for name in compiled.kernels], options.batch, options.dtype)
            _add_grids(plan, launches)
            if sm90:
                report += sm90_report(sm90_resources(launches), launches)
        if compiled.source is not None:
            plan = with_source(plan, compiled.source, out)
        files = {out / "plan.json": plan_json(plan), out / "report.txt": report}
        temporaries: dict[Path, Path] = {}
        try:
            for path, text in files.items():
                temporaries[path] = write_temporary(path, text.encode("utf-8"))
            swap_folder(out / "kernels", staged)
            for path in files:
                os.replace(temporaries[path], path)
                del temporaries[path]  # renamed: no longer ours to remove (one that failed is removed below)
        except OSError as error:
            raise NetError(
                f"cannot write the build in {out}: {error.strerror or error}", where=str(out), hint=os_hint(error)
            ) from None
        finally:
            for temporary in temporaries.values():
                temporary.unlink(missing_ok=True)
    return out


@contextmanager
def staged_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder in `parent` (made, with `parent`, if need be) to write a build into before it is swapped in
    (`swap_folder`); removed if the block fails. A folder that cannot be made is a NetError naming `parent`."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staged = new_folder(parent, prefix)
    except OSError as error:
        raise NetError(
            f"cannot write the build in {parent}: {error.strerror or error}", where=str(parent), hint=os_hint(error)
        ) from None
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
    """`new` becomes `current`; the old `current` (if any) is removed afterwards. Another process swapping
    into the same `current` at once (two builds into one folder) may put its folder there between our
    moving the old one aside and renaming ours: that one is moved aside too and the rename tried again, so
    the last writer's folder stands whole."""
    olds: list[Path] = []
    try:
        for attempt in range(10):
            if current.exists():
                old = new_folder(current.parent, f".{current.name}-old")
                old.rmdir()
                with contextlib.suppress(FileNotFoundError):  # another writer moved it aside first
                    current.rename(old)
                    olds.append(old)
            try:
                new.rename(current)
                break
            except OSError as error:  # a folder appeared in between: another writer's
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 9:
                    raise
    except OSError as error:
        if olds and olds[-1].exists() and not current.exists():
            olds[-1].rename(current)  # put the earlier build's kernels back
            olds.pop()
        raise NetError(
            f"cannot write {current}: {error.strerror or error}", where=str(current.parent), hint=os_hint(error)
        ) from None
    finally:
        for old in olds:
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
