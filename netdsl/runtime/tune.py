"""`netdsl tune`: the tiles each kernel of a net runs fastest with, timed on the device at hand.

For every step whose kernel family takes a tile configuration (convs, channels-last convs, conv + LRN + max-pool
stages, fcs, LRNs with or without their max-pool: `netdsl.compiler.emit.tunable`), at one batch size and dtype:

1. the step runs once with its launcher's own tiles (`pick_config`, a rule measured on one GPU for AlexNet) on
   random inputs in the build's layouts and the net's weights; that output is the yardstick;
2. each candidate tile of the family (the kernel file's `candidates()`) runs once (Triton compiles it), its
   output is compared with the yardstick (a candidate that does not build, or computes something else, is
   dropped with the reason), then timed: the median of `runs` samples after two warm-ups, on a GPU each a
   replayed CUDA graph of ten launches timed by CUDA events (the wall clock under the interpreter, which only
   proves the mechanism);
3. the launcher's own tiles are timed again; the fastest candidate that beats the better of their two times by
   3% (MARGIN: not by noise) and builds for sm_90 without spills and within shared memory
   (netdsl.compiler.launches) wins; otherwise the step keeps the launcher's tiles (`config`: null).

The result is a tuning file (`netdsl.compiler.tuning` describes it), which `netdsl compile --tuning FILE` and
`netdsl run --tuning FILE` build into the kernels. Tuning another batch size into an existing file adds to it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import torch

from netdsl._version import __version__
from netdsl.codegen.layouts import to_layout
from netdsl.codegen.limits import MAX_SHARED_BYTES
from netdsl.compiler.launches import record_launches, recording, sm90_resources
from netdsl.compiler.tuning import CONFIG_KEYS, TUNING_FORMAT, check_entry, describe_config, signature
from netdsl.errors import NetError
from netdsl.files import parse_json, write_atomic
from netdsl.ir.dtypes import dot_precision
from netdsl.runtime.devices import device_name
from netdsl.runtime.net import Net

# How far a candidate's output may lie from the launcher's own tiles' (relative to the largest output): the
# two differ only in the order of the additions, and in 16-bit outputs, by a rounding or two.
TOLERANCE = {"ieee": 1e-4, "tf32x3": 1e-4, "tf32": 1e-2, "16-bit": 2e-2}
# Times a launch of the given tiles (None: the launcher's own): milliseconds per call.
Timer = Callable[[Callable[[], object], "dict[str, int] | None"], float]
MARGIN = 0.97  # a candidate wins only if it is this much faster than the launcher's tiles: not by noise


@dataclass
class StepTuning:
    """What `tune` found for one step: its launcher's tiles and time, the winner (None: the launcher's tiles
    stay) and why candidates were dropped."""

    step: str
    default: dict[str, int]
    default_ms: float
    best: dict[str, int] | None
    best_ms: float
    timed: int
    dropped: dict[str, str] = field(default_factory=dict)
    same_as: str | None = None  # the step whose findings these are (another tower's copy of the same kernel)
    ranked: list[tuple[float, dict[str, int]]] = field(default_factory=list, repr=False)  # faster than the default

    def row(self) -> dict:
        return {
            "config": self.best,
            "ms": round(self.best_ms, 5),
            "default_ms": round(self.default_ms, 5),
            "default": self.default,
            "timed": self.timed,
            **({"dropped": self.dropped} if self.dropped else {}),
            **({"same_as": self.same_as} if self.same_as else {}),
        }


def tune(
    path: str | Path,
    *,
    batch: int,
    dtype: str = "fp32",
    device: str = "cuda:0",
    runs: int = 20,
    timer: Timer | None = None,
    check_sm90: bool = True,
    steps: str | None = None,
    seed: int = 0,
    progress: TextIO | None = None,
    on_step: Callable[[dict], None] | None = None,
    **options,
) -> tuple[dict, list[StepTuning]]:
    """Times every tunable step of the net at `path` on `device` (all its partitions there) at `batch` images in
    `dtype` with the compile-time `options` (layout, precision, space_to_depth, merge_towers, split_k). Returns
    the tuning file's contents and each step's findings. `steps`: only the steps whose names match one of these
    comma-separated shell patterns (`conv*,fc6*`). `on_step` is given the tuning so far after each step (to save
    it: a run cut short keeps what it measured). A step that is another tower's copy of one tuned already (the
    same kernel, parameters, shapes and layouts: `twin_key`) takes its findings without being timed again.
    `timer` replaces the device's clock (tests); `check_sm90=False` skips the spill check of the winners."""
    net = Net(path, backend="triton", dtype=dtype, batch=batch, devices=device, seed=seed, **options)
    place = torch.device(device)
    if place.type == "cuda" and place.index is None:
        place = torch.device("cuda", torch.cuda.current_device())
    timer = timer or DeviceClock(place, runs)
    with contextlib.ExitStack() as scope:
        if place.type == "cuda":
            scope.enter_context(torch.cuda.device(place))  # where Triton launches, streams and events are
        precision = dot_precision(dtype, options.get("precision"))
        tolerance = TOLERANCE["16-bit" if dtype in ("bf16", "fp16") else precision]
        generator = torch.Generator().manual_seed(seed)
        patterns = [pattern.strip() for pattern in (steps or "*").split(",") if pattern.strip()]
        found: list[StepTuning] = []
        tuning = {
            "format": TUNING_FORMAT,
            "device": device_name(place),
            "triton": _triton_version(),
            "torch": torch.__version__,
            "netdsl": __version__,
            "net": net.program.graph["name"],
            "dtype": dtype,
            "options": {key: value for key, value in sorted(options.items())},
            **(timer.describe() if isinstance(timer, DeviceClock) else {"clock": "given by the caller"}),
            "steps": {},
        }
        twins: dict[str, StepTuning] = {}  # what each computation was found to want, by `twin_key`
        for name, (module, weights) in net.kernel_steps().items():
            if not hasattr(module, "candidates") or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            kernel_file = net.build_dir / "kernels" / f"{name}.py"
            twin = twins.get(twin_key(module))
            if twin is not None:  # another tower's copy of a step tuned already: the same kernel on the same shapes
                result = replace(twin, step=name, same_as=twin.same_as or twin.step)
                if progress is not None:
                    print(f"{name}: the same kernel as {result.same_as}", file=progress, flush=True)
            else:
                if progress is not None:
                    print(f"tuning {name} ...", file=progress, flush=True)
                inputs = [
                    to_layout(torch.randn(batch, *shape, generator=generator).to(net.torch_dtype), layout).to(place)
                    for shape, layout in zip(module.INPUT_SHAPES, module.INPUT_LAYOUTS, strict=True)
                ]
                result = _tune_step(name, module, inputs, weights, timer, tolerance)
                if check_sm90 and result.best is not None:
                    result = _without_spills(result, kernel_file, batch, dtype)
                twins[twin_key(module)] = result
            found.append(result)
            tuning["steps"][name] = {
                "signature": signature(kernel_file.read_text(encoding="utf-8")),
                "batches": {str(batch): result.row()},
            }
            if on_step is not None:
                on_step(tuning)
        return tuning, found


def twin_key(module) -> str:
    """What a step's kernel computes, without its name: the kernel, its parameters, shapes, layouts and dtype (the
    towers' copies of a layer share it)."""
    kernel = getattr(module.KERNEL, "fn", module.KERNEL)  # a JITFunction's Python function
    parts = (getattr(kernel, "__name__", "?"), module.OPTIONS, module.INPUT_SHAPES, module.OUTPUT_SHAPE,
             module.WEIGHT_SHAPES, module.INPUT_LAYOUTS, module.OUTPUT_LAYOUT, module.WEIGHT_LAYOUTS,
             str(module.DTYPE))  # fmt: skip
    return repr(parts)


def _tune_step(name: str, module, inputs: list[torch.Tensor], weights: dict, timer: Timer, tolerance: float):
    want = module.launch(inputs, weights)
    default = launched_config(module, inputs, weights, want)
    out = torch.empty_like(want)
    default_ms = timer(lambda: module.launch(inputs, weights, out=out), None)
    timings, dropped = [], {}
    for config in module.candidates():
        label = describe_config(config)
        try:
            got = module.launch(inputs, weights, config=config)
        except Exception as error:  # a tile this kernel or device cannot take (shared memory, registers, ...)
            dropped[label] = _first_line(error)
            continue
        error = _relative_error(got, want)
        if not error <= tolerance:
            dropped[label] = f"its output differs from the launcher's tiles' by {error:.1e} of the largest"
            continue
        ms = timer(lambda config=config: module.launch(inputs, weights, out=out, config=config), config)
        timings.append((ms, config))
    # timed again after the candidates, the better of the two kept: a candidate must beat it by MARGIN
    default_ms = min(default_ms, timer(lambda: module.launch(inputs, weights, out=out), None))
    timings.sort(key=lambda item: item[0])
    ranked = [(ms, config) for ms, config in timings if ms < MARGIN * default_ms and config != default]
    best_ms, best = ranked[0] if ranked else (default_ms, None)
    return StepTuning(name, default, default_ms, best, best_ms, len(timings), dropped, ranked=ranked)


def _without_spills(result: StepTuning, kernel_file: Path, batch: int, dtype: str) -> StepTuning:
    """The fastest of the ranked candidates that builds for sm_90 without spilling registers (every emitted kernel
    must) and within an SM's shared memory; the launcher's tiles when none does."""
    for ms, config in result.ranked:
        launches = record_launches([kernel_file], batch, dtype, configs={result.step: config})
        try:
            resources = sm90_resources(launches)[result.step]
        except NetError as error:
            result.dropped[describe_config(config)] = f"does not build for sm_90: {error.message}"[:200]
            continue
        if resources["shared_bytes"] > MAX_SHARED_BYTES:
            result.dropped[describe_config(config)] = f"needs {resources['shared_bytes']:,} bytes of shared memory"
            continue
        if resources["spill_stores"] + resources["spill_loads"] == 0:
            result.best, result.best_ms = config, ms
            return result
        result.dropped[describe_config(config)] = "spills registers on sm_90"
    result.best, result.best_ms = None, result.default_ms
    return result


def launched_config(module, inputs: list[torch.Tensor], weights: dict, out: torch.Tensor) -> dict[str, int]:
    """The tiles the step's launcher picks itself for these inputs (read from a recorded launch)."""
    with recording(module) as recorder:
        module.launch(inputs, weights, out=out)
    _, _, kwargs = recorder.calls[0]
    return {key: int(kwargs[key]) for key in CONFIG_KEYS if key in kwargs}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


class DeviceClock:
    """Milliseconds per launch (a `Timer`): the median of `runs` samples after two warm-ups. On a GPU each sample
    replays a CUDA graph of GRAPH_LAUNCHES launches, timed by CUDA events, so that the launcher's Python (which a
    net replayed as a CUDA graph does not pay) does not hide a small kernel's time; a launch that cannot be
    captured is timed launch by launch, and counted in `fallbacks`. On the CPU, the wall clock of each launch."""

    def __init__(self, device: torch.device, runs: int) -> None:
        self.device, self.runs = device, runs
        self.graphs = self.fallbacks = 0

    def __call__(self, launch: Callable[[], object], config: dict[str, int] | None = None) -> float:
        launch()
        launch()
        if self.device.type != "cuda":
            samples = []
            for _ in range(self.runs):
                begin = time.perf_counter()
                launch()
                samples.append((time.perf_counter() - begin) * 1e3)
            return statistics.median(samples)
        graph = _captured(launch, self.device)
        if graph is None:
            self.fallbacks += 1
        else:
            self.graphs += 1
        run, per_sample = (graph.replay, GRAPH_LAUNCHES) if graph is not None else (launch, 1)
        torch.cuda.synchronize(self.device)
        events = []
        for _ in range(self.runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return statistics.median(start.elapsed_time(end) for start, end in events) / per_sample

    def describe(self) -> dict[str, object]:
        """How the times were taken, for the tuning file."""
        if self.device.type != "cuda":
            return {"clock": "wall clock per launch", "runs": self.runs}
        return {
            "clock": f"CUDA events around a CUDA graph of {GRAPH_LAUNCHES} launches",
            "runs": self.runs,
            "graphs": self.graphs,
            "timed launch by launch (not capturable)": self.fallbacks,
        }


GRAPH_LAUNCHES = 10  # launches per replayed CUDA graph in `DeviceClock`


def _captured(launch: Callable[[], object], device: torch.device):
    """GRAPH_LAUNCHES launches captured as one CUDA graph (warmed on a side stream first, as capture needs), or None
    when this launch cannot be captured."""
    try:
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            launch()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_LAUNCHES):
                launch()
        return graph
    except RuntimeError:
        torch.cuda.synchronize(device)
        return None


def _triton_version() -> str:
    import triton

    return triton.__version__


def check_output(path: str | Path, device: torch.device) -> None:
    """That a tuning for `device` can be written to `path`: its folder exists, and a file already there is a tuning
    file for the same device and Triton (which this run adds to); a NetError naming `-o` otherwise."""
    path = Path(path)
    if not path.parent.is_dir():
        raise NetError(f"no folder {path.parent} to write {path.name} in", where="-o", hint="create it first")
    if not path.exists():
        return
    old = _read_existing(path)
    here = {"device": device_name(device), "triton": _triton_version()}
    for key, value in here.items():
        if old.get(key) != value:
            raise NetError(
                f"{path} holds tunings for {key} {old.get(key)}, and these are for {value}",
                where="-o",
                hint="give another -o FILE for this one (a file keeps one device's tunings)",
            )


def merge_tuning(old: Mapping, new: dict) -> tuple[dict, list[str]]:
    """`new` with what `old` (an existing tuning file for the same device: `check_output`) holds for other batch
    sizes of the same kernels kept; and notes on what of `old` was left out."""
    notes = []
    steps = {}
    for name, entry in old.get("steps", {}).items():
        if name in new["steps"] and entry.get("signature") != new["steps"][name]["signature"]:
            notes.append(f"{name}: its earlier tunings were of another kernel, replaced")
            continue
        steps[name] = {"signature": entry["signature"], "batches": dict(entry["batches"])}
    for name, entry in new["steps"].items():
        steps.setdefault(name, {"signature": entry["signature"], "batches": {}})
        steps[name]["batches"].update(entry["batches"])
        steps[name]["batches"] = dict(sorted(steps[name]["batches"].items(), key=lambda item: -int(item[0])))
    return {**new, "steps": steps}, notes


def write_tuning(path: str | Path, tuning: dict) -> list[str]:
    """Writes the tuning file (atomically), merged with what is already there (`merge_tuning`); returns the notes."""
    path = Path(path)
    notes: list[str] = []
    if path.exists():
        old = _read_existing(path)
        tuning, notes = merge_tuning(old, tuning)
    write_atomic(path, json.dumps(tuning, indent=2) + "\n")
    return notes


def _read_existing(path: Path) -> dict:
    where = str(path)
    hint = "give another -o FILE, or remove this one"
    try:
        old = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise NetError(f"cannot add to it: {type(error).__name__}: {error}", where=where, hint=hint) from None
    if not isinstance(old, dict) or old.get("format") != TUNING_FORMAT or not isinstance(old.get("steps"), dict):
        raise NetError("cannot add to it: it is not a tuning file of netdsl tune", where=where, hint=hint)
    for name, entry in old["steps"].items():
        check_entry(where, name, entry)
    return old
