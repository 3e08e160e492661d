"""`netdsl compile --train`: the training step as a plan and a report, beside the inference build.

    build/<net>/
        train/plan.json     per device, forward then backward launches, their kernels, the events a
                            cross-device gradient waits on, what each forward saves, the memory plan and
                            each conv's and fc's backward choice with the figures that decided it
        train/report.txt    the same for a reader: steps, choices, memory per device, the sm_90 build
        train/<step>.py     each training step's forward and backward kernels, runnable on their own
                            (netdsl.compiler.emit_training); update_<device>.py the fused SGD

The same net and options give byte-identical files.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import networkx as nx

from netdsl._version import __version__
from netdsl.compiler.backward import TRAINING_PASS_NAMES, run_training_passes
from netdsl.compiler.compile import sm90_report, staged_folder, swap_folder
from netdsl.compiler.emit_training import training_files
from netdsl.compiler.launches import Launch, sm90_resources
from netdsl.compiler.passes import Options, dump
from netdsl.compiler.plan import device_events
from netdsl.compiler.steps import Step
from netdsl.compiler.train_launches import record_training_launches
from netdsl.compiler.train_memory import plan_training_memory
from netdsl.compiler.training import RECOMPUTE
from netdsl.errors import NetError, os_hint
from netdsl.files import parse_json, write_atomic
from netdsl.lang.build import build
from netdsl.lang.parse import parse_file
from netdsl.tables import format_bytes, format_table

TRAIN_PLAN_VERSION = 1


@dataclass
class CompiledTraining:
    program: nx.DiGraph  # after every training pass
    plan: dict
    report: str
    kernels: dict[str, str]  # file name -> source
    dump: str  # the `--dump-after` listing, or ""
    options: Options


def check_training_pass(name: str | None) -> None:
    if name is not None and name not in TRAINING_PASS_NAMES:
        raise NetError(
            f"unknown training pass `{name}`", where="--dump-after", hint=f"passes: {', '.join(TRAINING_PASS_NAMES)}"
        )


def compile_training(path: str | Path, options: Options, dump_after: str | None = None) -> CompiledTraining:
    """Runs the training passes and emits a file per training step (netdsl.compiler.emit_training). The
    inference-only options (`precision`, `space_to_depth`, `merge_towers`) do not apply to the training step."""
    check_training_pass(dump_after)
    if options.precision == "tf32x3":
        raise NetError(
            "the training kernels take exact fp32 products or TF32 ones, not tf32x3",
            where="--precision",
            hint="leave --precision out with --train (or use --dtype tf32); tf32x3 applies to the inference kernels",
        )
    after = run_training_passes(build(parse_file(path)), options)
    program = after[TRAINING_PASS_NAMES[-1]]
    listing = dump_training(after[dump_after]) if dump_after else ""
    kernels = training_files(program, options.dtype)
    return CompiledTraining(program, training_plan(program, options), training_report(program, options), kernels,
                            listing, options)  # fmt: skip


def write_training(compiled: CompiledTraining, out_dir: str | Path, sm90: bool = False) -> Path:
    """Writes `train/` in the build folder: the step files into a new folder first, from which every launch is
    recorded at the build's batch and dtype (grids and warps into plan.json) and, with `sm90`, every kernel
    built for the H100 (registers, spills, shared memory and tensor-core instructions into report.txt); only
    then is the old `train/` swapped for it. `compiled` is not changed: writing twice writes the same files."""
    parent, options = Path(out_dir), compiled.options
    with staged_folder(parent, ".train") as staged:
        for name, source in compiled.kernels.items():
            write_atomic(staged / name, source)
        launches = record_training_launches(compiled.program, staged, options.batch, options.dtype)
        report = compiled.report
        if sm90:
            report += sm90_report(sm90_resources(launches), launches)
        write_atomic(staged / "plan.json", json.dumps(training_plan(compiled.program, options, launches), indent=2)
                     + "\n")  # fmt: skip
        write_atomic(staged / "report.txt", report)
        swap_folder(parent / "train", staged)
    return parent / "train"


def remove_training(out_dir: str | Path) -> bool:
    """Removes the `train/` an earlier `compile --train` wrote into the build folder, for a compile without
    --train (its steps would be another build's): only when its plan.json is netdsl's training plan, so that a
    folder of the user's called train/ (a data set's, say) stays. Renamed aside first, so that a compile killed
    meanwhile leaves no half-removed train/. Whether one was removed."""
    train = Path(out_dir) / "train"
    try:
        record = parse_json((train / "plan.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(record, dict) or "train_plan_version" not in record:
        return False
    aside = train.with_name(f".train-removed.{secrets.token_hex(8)}")
    try:
        os.rename(train, aside)
    except OSError as error:
        reason = error.strerror or error
        raise NetError(
            f"cannot remove the earlier build's train/: {reason}", where=str(train), hint=os_hint(error)
        ) from None
    shutil.rmtree(aside, ignore_errors=True)
    return True


def dump_training(graph: nx.DiGraph) -> str:
    """`dump` of a training program, with each backward's kernels and choice, what each forward saves,
    and the memory plan once it is made."""
    text = dump(graph)
    if not any("step" in data for _, data in graph.nodes(data=True)):
        return text
    lines = text.rstrip("\n").split("\n")
    extra = []
    for name in graph.nodes:
        step: Step = graph.nodes[name]["step"]
        if step.kind == "backward":
            detail = f"  {name}: {', '.join(step.options['kernels'])}"
            if "implementation" in step.options:
                detail += f"; runs {step.options['implementation']} ({step.options['chosen_by']})"
            extra.append(detail)
    if extra:
        lines += ["# backward kernels", *extra]
    saved = graph.graph.get("saved")
    if saved:
        lines.append("# saved for the backward (elements per image)")
        for name, tensors in saved.items():
            if tensors:
                lines.append(f"  {name}: " + ", ".join(f"{t.name} {t.elements} {t.dtype}" for t in tensors))
    memory = graph.graph.get("memory")
    if memory:
        lines.append("# memory per device")
        for device, m in memory.items():
            lines.append(
                f"  {device}: static {m.static} B, saved {m.saved} B, live peak {m.peak_live} B at {m.peak_step}, "
                f"peak {m.peak} B"
            )
    return "\n".join(lines) + "\n"


def training_plan(program: nx.DiGraph, options: Options, launches: list[Launch] | None = None) -> dict:
    """The plan as plain data, ordered so that its JSON is byte-identical for the same input; with
    `launches` (training_launches), each step's kernel launches with their grids and warps."""
    saved = program.graph["saved"]
    grids: dict[str, list[dict]] = {}
    for launch in launches or []:
        step, kernel = launch.step.split(".", 1)
        grids.setdefault(step, []).append({"kernel": kernel, "grid": list(launch.grid), "num_warps": launch.num_warps})
    devices = {}
    for device, order in program.graph["partitions"].items():
        launches = [_launch(program, program.nodes[name]["step"], saved, grids) for name in order]
        devices[device] = {
            "launches": [entry for entry in launches if entry["kind"] != "input"],
            "memory_bytes": asdict(program.graph["memory"][device]),
        }
    return {
        "train_plan_version": TRAIN_PLAN_VERSION,
        "netdsl": __version__,
        "net": program.graph["name"],
        "dtype": options.dtype,
        "batch": options.batch,
        "recompute": options.recompute,
        "units": "saved sizes in elements per image unless per_image is false; memory in bytes at the batch",
        "devices": devices,
    }


def _launch(program: nx.DiGraph, step: Step, saved: dict, grids: dict[str, list[dict]]) -> dict:
    entry: dict = {"step": step.name, "kind": step.kind, "layers": [item.name for item in step.layers]}
    entry["inputs"] = list(step.inputs)
    if step.kind == "backward":
        entry["pass"] = "backward"
        entry["reads_saved"] = [t.name for t in saved.get(step.options["forward"], [])]
    elif step.kind == "update":
        entry["pass"] = "update"
    else:
        entry["pass"] = "backward" if step.options.get("gradient") else "forward"
    if saved.get(step.name):
        entry["saves"] = [asdict(t) for t in saved[step.name]]
    entry["shape"] = list(step.shape)
    if step.name in grids:
        entry["kernel_launches"] = grids[step.name]
    if step.options:
        entry["options"] = {key: step.options[key] for key in sorted(step.options)}
    return {**entry, **device_events(program, step)}


def training_report(program: nx.DiGraph, options: Options) -> str:
    again = f", recompute {options.recompute}" if options.recompute != "none" else ""
    lines = [f"net {program.graph['name']}: one training step at batch {options.batch}, {options.dtype}{again}", ""]
    rows = []
    for device, order in program.graph["partitions"].items():
        for name in order:
            step: Step = program.nodes[name]["step"]
            if step.kind in ("input",):
                continue
            phase = "forward" if name in program.graph["forward_steps"] else "backward"
            if step.kind == "update":
                phase = "update"
            kernels = step.options.get("kernels") or step.options.get("forward_kernels") or []
            if step.kind == "transfer":
                kernels = [f"copy from {step.options['source_device']}"]
            rows.append((name, phase, step.options.get("forward_kind", step.kind), device, ", ".join(kernels)))
    lines += format_table(("step", "pass", "kind", "device", "kernels"), rows, left={0, 1, 2, 3, 4})
    choices = [
        (step.first.name, step.options["forward_kind"], step.options["implementation"], step.options["chosen_by"])
        for name in program.nodes
        if (step := program.nodes[name]["step"]).kind == "backward" and "implementation" in step.options
    ]
    if choices:
        lines += ["", "backward of each conv and fc: netdsl's kernels or PyTorch's (cuDNN / cuBLAS), by measurement"]
        lines += format_table(("layer", "kind", "runs", "decided by"), choices, left={0, 1, 2, 3})
        if all(reason == "not measured" for *_, reason in choices):
            lines.append(
                "no layer of this net is in the shipped table of measurements: regenerate it on a GPU with "
                "`python bench/train_gpu.py --write-choices`"
            )
    if not any(program.nodes[name]["step"].kind == "update" for name in program.nodes):
        lines += ["", "no layer of this net has weights: a step computes the loss and changes nothing"]
    lines += ["", "memory per device (parameters, their gradients and momentum in fp32; maps in the dtype)"]
    mem_rows = [
        (device, f"{m.parameters:,}", format_bytes(m.static), format_bytes(m.saved), format_bytes(m.peak_live),
         format_bytes(m.peak), m.peak_step)
        for device, m in program.graph["memory"].items()
    ]  # fmt: skip
    lines += format_table(
        ("device", "parameters", "static", "saved for backward", "live peak", "peak", "at step"), mem_rows, left={0, 6}
    )
    lines += ["", "peak per device with each `recompute` (the runs of steps the backward pass computes again)"]
    peaks = {  # the program's own setting is planned already
        mode: program.graph["memory"] if mode == options.recompute
        else plan_training_memory(program, options.batch, options.dtype, mode).graph["memory"]
        for mode in RECOMPUTE
    }  # fmt: skip
    lines += format_table(
        ("device", *RECOMPUTE), [(device, *(format_bytes(peaks[mode][device].peak) for mode in RECOMPUTE))
                                 for device in program.graph["memory"]], left={0}
    )  # fmt: skip
    for mode in RECOMPUTE[1:]:
        runs = program.graph["runs"][mode]
        shown = "; ".join(" + ".join(run) for run in runs) if runs else "none (no run of two steps or more)"
        lines += textwrap.wrap(f"{mode}: {shown}", 116, subsequent_indent="    ", break_on_hyphens=False)
    lines.append("PyTorch eager's peak on the same net: measured on a GPU by bench/train_gpu.py (max_memory_allocated)")
    return "\n".join(lines) + "\n"
