"""A training step of AlexNet on a GPU, four ways, and each conv's and fc's backward against PyTorch's.

    python bench/train_gpu.py [--batches 128,32] [--dtypes bf16,tf32] [--steps 30] [--box 90] [--tsv FILE]
                              [--systems netdsl-triton,netdsl-torch,eager,compile] [--parts steps,layers]
    python bench/train_gpu.py --write-choices      # also rewrite netdsl/compiler/backward_choices.json
    python bench/train_gpu.py --smoke              # tiny sizes, the CPU (Triton's interpreter): the code paths only

**Steps.** One step is forward, softmax cross-entropy, backward and the SGD momentum update, on a seeded random
batch already on the GPU, both towers of the net on the one GPU. The systems, in one run:

    netdsl-triton   GraphModule(backend="triton"): netdsl's forward and backward kernels, netdsl's loss kernel,
                    FlatPaperSGD (the update in one launch)
    netdsl-torch    GraphModule(backend="torch"): the layer graph run with PyTorch's ops, PaperSGD
    eager           the hand-written model of tests/golden/models.py, torch.optim.SGD (as bench/train.py)
    compile         that model under torch.compile (default mode, dynamic=False; the update stays eager)

bf16 is autocast around float32 weights for every system (the triton backend's conv and fc kernels then
take bf16 operands, accumulated in fp32, and the maps after them stay bf16); tf32 lets cuDNN, cuBLAS and
netdsl's dots use TF32 (fp32 is exact products).
Each step is timed with CUDA events; a row is the median of `--steps` steps after `--warmup` untimed ones
(which compile what needs compiling). Peak memory is torch.cuda.max_memory_allocated over the system's build
and steps, reset before each system. "x torch.compile" is torch.compile's time over the row's: above 1.0 the
row is faster. Each system (build, warm-up and steps) runs in a time box of `--box` seconds: a compile that
runs longer is cut off and its row flagged, a box spent mid-timing keeps the steps timed so far (at least 3).

**Layers.** For every conv and fc of the net (layers of equal geometry, the two towers' copies, once), at the
same batch and dtype, netdsl's backward against PyTorch's, the ReLU (or leaky ReLU) mask included on both sides:

    dgrad, wgrad   netdsl's launchers (codegen/conv_backward.py, codegen/fc_backward.py; the mask read from the
                   saved output inside the kernels) against torch.ops.aten.convolution_backward (cuDNN) or two
                   matmuls and a sum for an fc, the mask by aten's threshold_backward as autograd applies it;
                   wgrad includes the bias gradient
    step           kernel_ops' backward operator (netdsl::conv2d_backward, netdsl::linear_backward), the call the
                   triton backend makes, with backward="netdsl" and with backward="torch": both gradients, except
                   the dgrad of a layer whose input needs no gradient (conv1 reads the image)

The "step" figures are what the choice table (netdsl/compiler/backward_choice.py) holds: `--write-choices`
writes them for every batch and dtype of the run, rewriting the table after each (batch, dtype) block, to the
shipped table or `--choices-file`. A layer whose netdsl and PyTorch gradients differ by more than the dtype's
tolerance is flagged and left out of the table.

**Keys.** A layer is found in the table by `layer_key` of its geometry. The bench takes it from the compiler's
own `netdsl.compiler.backward.backward_key` (see `layer_keys`), so the table holds what `choose_backward` looks
up. The convention:

    conv: layer_key(per-image input C x H x W (several inputs joined on channels), weight (filters, C / groups,
          kh, kw), stride, netdsl.ir.ops.layer_pads (top, left, bottom, right; `same` resolved), dilation, groups)
    fc:   layer_key((features,), weight (units, features)), features = the per-image input's size flattened

`--tsv FILE` appends every row as its block ends (first column `step` or `backward`), the run's first under a
comment with the command, the machine and the date. Without a GPU (and without `--smoke`) the script says so and
exits with status 4. No figure of this script has been taken on a GPU yet.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import math
import os
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

if "--smoke" in sys.argv:  # before Triton is imported: kernels on CPU tensors run under its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the hand-written models
sys.path.insert(0, str(ROOT / "bench"))

from arguments import non_negative_int, positive_int, positive_ints  # noqa: E402
from golden.models import MODELS  # noqa: E402
from timing import no_gpu  # noqa: E402

import netdsl  # noqa: E402
from netdsl.compiler.backward import backward_key  # noqa: E402
from netdsl.compiler.backward_choice import TABLE, Measured, write_table  # noqa: E402
from netdsl.compiler.training import training_groups  # noqa: E402
from netdsl.ir import Layer, layers  # noqa: E402
from netdsl.ir.ops import layer_pads, layer_tensors  # noqa: E402
from netdsl.runtime.module import GraphModule  # noqa: E402
from netdsl.runtime.weights import init_weights  # noqa: E402
from netdsl.tables import format_bytes, format_table  # noqa: E402
from netdsl.train.optim import make_optimizer, param_groups  # noqa: E402

SYSTEMS = {
    "netdsl-triton": "netdsl, triton kernels",
    "netdsl-torch": "netdsl, torch backend",
    "eager": "PyTorch eager",
    "compile": "torch.compile",
}
DTYPES = {"bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}
LR, MOMENTUM, WEIGHT_DECAY = 0.001, 0.9, 0.0005
MIN_RUNS = 3  # a median from fewer steps than this is not reported when the time box cuts timing short
# --smoke: LeNet-5 (a hand-written model exists, and the interpreter runs its triton step in about a second)
SMOKE = {"net": "lenet5", "batches": (2,), "steps": 2, "warmup": 1, "layer_runs": 1, "layer_warmup": 0}
FULL = {"net": "alexnet", "batches": (128, 32), "steps": 30, "warmup": 5, "layer_runs": 50, "layer_warmup": 5}


# --- timing in a box -------------------------------------------------------------------------------------------


class BoxExpired(Exception):  # noqa: N818  (not an error: the time ran out)
    """A measurement's time box ran out."""


@contextlib.contextmanager
def time_box(seconds: float):
    """Raises BoxExpired in the main thread after `seconds` (SIGALRM); 0 or less: no box."""
    if seconds <= 0:
        yield
        return

    def expire(_signum, _frame):
        raise BoxExpired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Clock:
    """Milliseconds of one call: CUDA events around it on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            began = time.perf_counter()
            fn()
            return (time.perf_counter() - began) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


@dataclass
class Timing:
    ms: float | None  # the median, None when not measured
    runs: int  # timed calls
    warm_s: float | None  # build and warm-up, seconds
    note: str = ""


def measure(make: Callable[[], Callable[[], object]], warmup: int, runs: int, box: float, clock: Clock) -> Timing:
    """Builds the function (`make`), calls it `warmup` times untimed, then times `runs` calls, all within
    `box` seconds; the median, or what the box left of it."""
    times: list[float] = []
    stage, warm_s = "build", None
    began = time.perf_counter()
    try:
        with time_box(box):
            fn = make()
            stage = "warm-up"
            for _ in range(warmup):
                fn()
            clock.sync()
            warm_s = time.perf_counter() - began
            stage = "timing"
            for _ in range(runs):
                times.append(clock.time(fn))
    except BoxExpired:
        clock.sync()
        wanted = min(runs, MIN_RUNS)
        if len(times) < wanted:
            return Timing(None, len(times), warm_s, f"n/a (time box of {box:g} s ran out in {stage})")
        return Timing(statistics.median(times), len(times), warm_s, f"time box: {len(times)} of {runs} timed")
    return Timing(statistics.median(times), len(times), warm_s)


# --- the training step, four ways --------------------------------------------------------------------------


def autocast(device: torch.device, dtype: str):
    if dtype != "bf16":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def random_batch(shape: tuple[int, ...], batch: int, classes: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=generator).to(device)
    y = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return x, y


def netdsl_step(graph, backend: str, batch: int, dtype: str, device: torch.device) -> Callable[[], None]:
    """GraphModule's step as `netdsl train` takes it (netdsl/train/loop.py): the triton backend with netdsl's
    loss kernel and the fused update, the torch backend with PyTorch's loss and PaperSGD."""
    module = GraphModule(graph, devices=device, init="he", backend=backend, tf32=dtype == "tf32").train()
    groups = param_groups(module.named_parameters(), [], [])
    fused = backend == "triton"
    optimizer = make_optimizer("sgd", groups, LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=fused)
    x, y = random_batch(_input_shape(graph), batch, _classes(graph), device)
    if fused:
        from netdsl.runtime.kernel_ops import cross_entropy

        def loss_of(logits, target):
            return cross_entropy(logits, target, 0.0)[0]
    else:
        loss_of = F.cross_entropy

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            logits = module.logits(x).float().flatten(1)
        loss_of(logits, y).backward()
        optimizer.step()

    return step


def torch_step(net: str, graph, batch: int, dtype: str, device: torch.device, compiled: bool) -> Callable[[], None]:
    """The hand-written model's step, as bench/train.py takes it; `compiled`: under torch.compile."""
    model = MODELS[net][0]().load(init_weights(graph, seed=0, scheme="he")).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if compiled:
        torch._dynamo.reset()  # a fresh compile for each batch and dtype, never a dynamic-shape recompile
    forward = torch.compile(model, dynamic=False) if compiled else model
    ends_in_softmax = _output(graph).op == "softmax"
    x, y = random_batch(_input_shape(graph), batch, _classes(graph), device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            scores = forward(x).float()
        # the hand-written models end in softmax where the net does: the loss takes log-probabilities then
        loss = F.nll_loss(scores.clamp_min(1e-30).log(), y) if ends_in_softmax else F.cross_entropy(scores, y)
        loss.backward()
        optimizer.step()

    return step


def not_run(system: str, dtype: str, smoke: bool, named: bool) -> str | None:
    """Why a system does not run in this dtype (or in --smoke), or None."""
    if system == "compile" and smoke and not named:
        return "n/a (skipped by --smoke: compiling takes minutes; name it in --systems to run it)"
    return None


@dataclass
class StepRow:
    batch: int
    dtype: str
    system: str
    timing: Timing
    peak: int | None  # bytes

    def cells(self, compiled_ms: float | None) -> tuple[str, ...]:
        ms = self.timing.ms
        if ms is None:
            return (str(self.batch), self.dtype, SYSTEMS[self.system], "n/a", "-", "-", "-", "-", self.timing.note)
        ratio = f"{compiled_ms / ms:.2f}x" if compiled_ms else "-"
        warm = f"{self.timing.warm_s:.1f}" if self.timing.warm_s is not None else "-"
        peak = format_bytes(self.peak) if self.peak is not None else "-"
        return (str(self.batch), self.dtype, SYSTEMS[self.system], f"{ms:.3f}", f"{self.batch * 1e3 / ms:,.0f}", peak,
                ratio, warm, self.timing.note)  # fmt: skip


STEP_HEADER = ("batch", "dtype", "system", "ms/step", "images/s", "peak memory", "x torch.compile", "warm-up s", "note")


def step_rows(net, graph, batch, dtype, systems, named, args, device) -> list[StepRow]:
    clock = Clock(device)
    rows = []
    for system in systems:
        reason = not_run(system, dtype, args.smoke, named)
        if reason:
            rows.append(StepRow(batch, dtype, system, Timing(None, 0, None, reason), None))
            print(f"{batch}\t{dtype}\t{system}\t{reason}", flush=True)
            continue
        if system.startswith("netdsl"):
            backend = system.removeprefix("netdsl-")

            def make(backend=backend):
                return netdsl_step(graph, backend, batch, dtype, device)
        else:

            def make(compiled=system == "compile"):
                return torch_step(net, graph, batch, dtype, device, compiled)

        _fresh_memory(device)
        try:
            timing = measure(make, args.warmup, args.steps, args.box, clock)
        except Exception as error:  # a failing system (out of memory, a compiler error) is a row, not the end
            timing = Timing(None, 0, None, f"n/a (failed: {type(error).__name__}: {_first_line(error)})")
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        rows.append(StepRow(batch, dtype, system, timing, peak))
        shown = f"{timing.ms:.3f} ms" if timing.ms is not None else ""
        print(f"{batch}\t{dtype}\t{system}\t{shown}\t{timing.note}", flush=True)
    _fresh_memory(device)
    return rows


# --- each conv's and fc's backward -------------------------------------------------------------------------

KINDS = {"conv": "conv2d", "fc": "linear"}  # layer op -> the kind the choice table names
PARTS = ("dgrad", "wgrad", "step")
Grads = tuple  # (input gradient, weight gradient, bias gradient), None where not computed


@dataclass(frozen=True)
class BackwardLayer:
    """A conv or fc as its backward sees it (several layers when they share the geometry: the towers)."""

    kind: str  # "conv2d" or "linear", as netdsl.compiler.backward_choice names them
    key: str
    names: tuple[str, ...]
    input_shape: tuple[int, ...]  # per image: C x H x W for a conv, (features,) for an fc
    weight_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    activation: str = "none"  # the ReLU (or leaky ReLU) its training group takes, whose mask the backward applies
    slope: float = 0.0
    input_grad: bool = True  # False where the layer's input needs no gradient (it reads the image)

    @property
    def label(self) -> str:
        return self.names[0] + (f" (+{len(self.names) - 1})" if len(self.names) > 1 else "")


def layer_keys(graph) -> dict[str, tuple[str, str]]:
    """Every conv and fc layer of a shaped graph by name -> (kind, key), the key computed by the compiler's own
    function (`backward_key`, what `choose_backward` looks the table up with): the two cannot differ."""
    return {item.name: (KINDS[item.op], backward_key(item)) for item in layers(graph) if item.op in KINDS}


def backward_layers(graph) -> list[BackwardLayer]:
    """The convs and fcs of the graph with what their backward needs, one per key, in the net's order."""
    computed = [item for item in layers(graph) if item.op != "input"]
    learned: dict[str, bool] = {}  # layer -> whether its output depends on a weight (so needs a gradient)
    for item in layers(graph):
        learned[item.name] = bool(layer_tensors(item)) or any(learned[name] for name in item.inputs)
    found: dict[str, BackwardLayer] = {}
    for group in training_groups(graph, computed):
        if group.kind not in ("conv2d", "linear"):
            continue
        item = group.first
        kind, key = KINDS[item.op], backward_key(item)
        if key in found:
            found[key] = replace(found[key], names=(*found[key].names, item.name))
            continue
        tensors = layer_tensors(item)
        common = {
            "kind": kind, "key": key, "names": (item.name,), "weight_shape": tuple(int(n) for n in tensors["weight"]),
            "bias": "bias" in tensors, "activation": group.options["activation"], "slope": group.options["slope"],
            "input_grad": any(learned[name] for name in item.inputs),
        }  # fmt: skip
        if kind == "linear":
            found[key] = BackwardLayer(input_shape=(math.prod(item.input_shape),), **common)
        else:
            p = item.params
            found[key] = BackwardLayer(
                input_shape=tuple(item.input_shape), stride=tuple(p["stride"]),
                pads=tuple(layer_pads(p, tuple(item.input_shape[1:]))), dilation=tuple(p["dilation"]),
                groups=p["groups"], **common,
            )  # fmt: skip
    return list(found.values())


def layer_calls(layer: BackwardLayer, batch: int, dtype: str, device: torch.device) -> dict[tuple[str, str], Callable]:
    """(implementation, part) -> a call computing that part of the layer's backward on seeded random tensors (x,
    the weight, the forward's output with its ReLU applied, so the mask has zeros, and a gradient at the output),
    returning (dx, dw, db), None where not computed.

    dgrad and wgrad: netdsl's launchers (codegen/) against aten's convolution_backward or two matmuls and a sum,
    the mask by aten's threshold_backward as autograd applies it. step: kernel_ops' backward operator, which the
    triton backend calls, with backward="netdsl" and backward="torch": what the choice table picks between."""
    from netdsl.codegen import conv_backward, fc_backward
    from netdsl.codegen.fc_backward import linear_dgrad_kernel
    from netdsl.runtime import kernel_ops

    generator = torch.Generator().manual_seed(0)
    kind = DTYPES[dtype]

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=generator) * scale).to(device, kind)

    x = rand(batch, *layer.input_shape)
    weight = rand(*layer.weight_shape, scale=1 / math.sqrt(math.prod(layer.weight_shape[1:])))
    bias = rand(layer.weight_shape[0], scale=0.1)
    precision = "tf32" if dtype == "tf32" else "ieee"
    top, left, bottom, right = layer.pads
    symmetric = top == bottom and left == right
    torch_input = x if symmetric else F.pad(x, (left, right, top, bottom))  # aten pads both ends alike
    with torch.no_grad():
        if layer.kind == "linear":
            z = F.linear(x, weight, bias)
        else:
            z = F.conv2d(torch_input, weight, bias, layer.stride, [top, left] if symmetric else 0, layer.dilation,
                         layer.groups)  # fmt: skip
        out = _activation(z, layer.activation, layer.slope)
    grad = torch.randn(out.shape, generator=generator).to(device, kind)
    options = {"activation": layer.activation, "slope": layer.slope, "input_precision": precision}
    geometry = {"stride": layer.stride, "padding": layer.pads, "dilation": layer.dilation, "groups": layer.groups}

    def masked():
        if layer.activation == "relu":
            return torch.ops.aten.threshold_backward(grad, out, 0)
        if layer.activation == "leaky_relu":
            return torch.ops.aten.leaky_relu_backward(grad, out, layer.slope, True)
        return grad

    def netdsl_dgrad() -> Grads:
        if layer.kind == "conv2d":
            return conv_backward.conv2d_dgrad(grad, out, weight, x.shape, **geometry, **options), None, None
        grads, launches = fc_backward.linear_backward_launches(grad, out, x, weight, layer.bias, **options)
        for launch in launches:  # the dgrad launch alone
            if launch.kernel is linear_dgrad_kernel:
                launch.run()
        return grads.inputs[0], None, None

    def netdsl_wgrad() -> Grads:
        if layer.kind == "conv2d":
            dw, db = conv_backward.conv2d_wgrad(grad, out, x, weight.shape, bias=layer.bias, **geometry, **options)
            return None, dw, db
        grads = fc_backward.linear_backward(grad, out, x, weight, layer.bias, input_grad=False, **options)
        return None, grads.weight, grads.bias

    def torch_part(dgrad: bool, wgrad: bool) -> Grads:
        dz = masked()
        if layer.kind == "linear":
            return (torch.mm(dz, weight) if dgrad else None, torch.mm(dz.t(), x) if wgrad else None,
                    dz.sum(0) if wgrad and layer.bias else None)  # fmt: skip
        dx, dw, db = torch.ops.aten.convolution_backward(
            dz, torch_input, weight, [weight.shape[0]] if layer.bias else None, list(layer.stride),
            [top, left] if symmetric else [0, 0], list(layer.dilation), False, [0, 0], layer.groups,
            [dgrad, wgrad, wgrad and layer.bias],
        )  # fmt: skip
        if dgrad and not symmetric:  # the padded input's gradient, cut back to the input
            dx = dx[:, :, top : dx.shape[2] - bottom, left : dx.shape[3] - right]
        return dx, dw, db

    def step(backward: str) -> Grads:
        common = (layer.bias, layer.input_grad)
        act = (layer.activation, layer.slope, precision, backward)
        if layer.kind == "linear":
            grads = kernel_ops.linear_backward(grad, x, weight, out, *common, *act)
        else:
            shape = (list(layer.stride), list(layer.pads), list(layer.dilation), layer.groups)
            grads = kernel_ops.conv2d_backward(grad, x, weight, out, *common, *shape, *act)
        return tuple(None if t.numel() == 0 else t for t in grads)  # the operators return empty tensors for None

    return {
        ("netdsl", "dgrad"): netdsl_dgrad,
        ("torch", "dgrad"): functools.partial(torch_part, dgrad=True, wgrad=False),
        ("netdsl", "wgrad"): netdsl_wgrad,
        ("torch", "wgrad"): functools.partial(torch_part, dgrad=False, wgrad=True),
        ("netdsl", "step"): functools.partial(step, backward="netdsl"),
        ("torch", "step"): functools.partial(step, backward="torch"),
    }


def gradient_error(calls: dict[tuple[str, str], Callable[[], Grads]]) -> float:
    """The largest difference between netdsl's and PyTorch's step gradients, relative to PyTorch's largest
    |value|: the two sides must compute the same thing for their times to compare."""
    ours, theirs = calls[("netdsl", "step")](), calls[("torch", "step")]()
    errors = []
    for mine, want in zip(ours, theirs, strict=True):
        if (mine is None) != (want is None):
            raise ValueError("netdsl and PyTorch computed different gradients")
        if want is not None:
            scale = want.float().abs().max().clamp_min(1e-30)
            errors.append(float((mine.float() - want.float()).abs().max() / scale))
    return max(errors)


@dataclass
class LayerRow:
    batch: int
    dtype: str
    layer: BackwardLayer
    timings: dict[tuple[str, str], Timing]
    error: float | None  # gradient_error, None when it could not be computed

    def ms(self, implementation: str, part: str) -> float | None:
        return self.timings[(implementation, part)].ms

    @property
    def agrees(self) -> bool:
        return self.error is not None and self.error <= TOLERANCE[self.dtype]

    def cells(self) -> tuple[str, ...]:
        figures = []
        for part in PARTS:
            for implementation in ("netdsl", "torch"):
                ms = self.ms(implementation, part)
                figures.append(f"{ms:.3f}" if ms is not None else "n/a")
        ours, theirs = self.ms("netdsl", "step"), self.ms("torch", "step")
        faster = "-" if ours is None or theirs is None else ("netdsl" if ours <= theirs else "torch")
        notes = [] if self.layer.input_grad else ["no dgrad in the step (its input needs no gradient)"]
        if self.error is not None and not self.agrees:
            notes.append(f"GRADIENTS DIFFER (above {TOLERANCE[self.dtype]:g}): not written to the choices")
        notes += sorted({t.note for t in self.timings.values() if t.note})
        error = f"{self.error:.1e}" if self.error is not None else "-"
        return (str(self.batch), self.dtype, self.layer.label, *figures, faster, error, self.layer.key,
                "; ".join(notes))  # fmt: skip

    def measured(self) -> Measured | None:
        """The step figures for the choices table: only where both were timed and the gradients agree."""
        ours, theirs = self.ms("netdsl", "step"), self.ms("torch", "step")
        if ours is None or theirs is None or not self.agrees:
            return None
        return Measured(self.layer.kind, self.layer.key, self.dtype, self.batch, _rounded(ours), _rounded(theirs))


LAYER_HEADER = ("batch", "dtype", "layer", "netdsl dgrad", "torch dgrad", "netdsl wgrad", "torch wgrad",
                "netdsl step", "torch step", "faster", "error", "key", "note")  # fmt: skip
# netdsl's step gradients against PyTorch's, relative to the largest |value| (both sides round in the dtype)
TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 3e-2}


def layer_rows(graph, batch: int, dtype: str, args, device: torch.device) -> list[LayerRow]:
    clock = Clock(device)
    rows = []
    for layer in backward_layers(graph):
        error = None
        try:
            calls = layer_calls(layer, batch, dtype, device)
            with time_box(args.box):  # the first calls: netdsl's kernels compile here
                error = gradient_error(calls)
            timings = {
                name: measure(lambda call=call: call, args.layer_warmup, args.layer_runs, args.box, clock)
                for name, call in calls.items()
            }
        except Exception as raised:  # one layer that fails (or runs out of time) is a row saying so
            what = f"time box of {args.box:g} s ran out" if isinstance(raised, BoxExpired) else type(raised).__name__
            failed = Timing(None, 0, None, f"n/a ({what}: {_first_line(raised)})".replace(": )", ")"))
            timings = {(implementation, part): failed for implementation in ("netdsl", "torch") for part in PARTS}
        row = LayerRow(batch, dtype, layer, timings, error)
        rows.append(row)
        print("\t".join(row.cells()), flush=True)
    _fresh_memory(device)
    return rows


# --- the run -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", choices=sorted(MODELS), help="a net of nets/ with a hand-written model (alexnet)")
    parser.add_argument("--batches", type=positive_ints, help="comma-separated (default 128,32)")
    parser.add_argument("--dtypes", default="bf16,tf32", help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--systems", help=f"comma-separated, of {', '.join(SYSTEMS)} (default all)")
    parser.add_argument("--parts", default="steps,layers", help="steps, layers or both")
    parser.add_argument("--steps", type=positive_int, help="timed steps per system (default 30)")
    parser.add_argument("--warmup", type=non_negative_int, help="untimed steps first (default 5)")
    parser.add_argument("--layer-runs", type=positive_int, help="timed calls per layer backward (default 50)")
    parser.add_argument("--layer-warmup", type=non_negative_int, help="untimed calls first (default 5)")
    parser.add_argument("--box", type=float, default=90.0, help="seconds per system or layer measurement (0: none)")
    parser.add_argument("--tsv", help="append every row to this file as its block ends")
    parser.add_argument("--write-choices", action="store_true", help="write the layers' step figures to a table")
    parser.add_argument(
        "--choices-file", type=Path, default=TABLE, help=f"where --write-choices writes (default {TABLE.name})"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the code paths only")
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    named = args.systems is not None
    systems = args.systems.split(",") if named else list(SYSTEMS)
    dtypes, parts = args.dtypes.split(","), args.parts.split(",")
    unknown = [s for s in systems if s not in SYSTEMS] + [d for d in dtypes if d not in DTYPES]
    unknown += [p for p in parts if p not in ("steps", "layers")]
    if unknown:
        parser.error(f"unknown system, dtype or part: {', '.join(unknown)}")
    if args.smoke and args.write_choices and args.choices_file.resolve() == TABLE.resolve():
        parser.error("--smoke figures mean nothing: give --write-choices a --choices-file other than the shipped table")

    command = shlex.join(["python", "bench/train_gpu.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# training step and per-layer backward, {args.net}; reproduce: {command}")
    device = _device(args.smoke)
    if device is None:
        return no_gpu("run this on a machine with one, or --smoke")
    import triton

    where = torch.cuda.get_device_name() if device.type == "cuda" else "the CPU (Triton's interpreter)"
    print(f"# {where}, torch {torch.__version__}, triton {triton.__version__}; median of {args.steps} steps after "
          f"{args.warmup} (layers: {args.layer_runs} after {args.layer_warmup}); time box {args.box:g} s")  # fmt: skip
    if args.smoke:
        print("# --smoke: tiny sizes, the numbers mean nothing")
    graph = netdsl.load_graph(ROOT / "nets" / f"{args.net}.net")
    about = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "none (--smoke on the CPU: no measurement)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }
    preamble = [command, f"{about['gpu']}, torch {about['torch']}, triton {about['triton']}; {about['date']}"]
    steps: list[tuple[str, ...]] = []
    backward: list[LayerRow] = []
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for batch in args.batches:
            for dtype in dtypes:
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
                block = (
                    step_rows(args.net, graph, batch, dtype, systems, named, args, device) if "steps" in parts else []
                )
                compiled = next((row.timing.ms for row in block if row.system == "compile"), None)
                steps += [row.cells(compiled) for row in block]
                layer_block = layer_rows(graph, batch, dtype, args, device) if "layers" in parts else []
                backward += layer_block
                if args.tsv:
                    step_cells = [row.cells(compiled) for row in block]
                    _append_tsv(args.tsv, preamble, step_cells, [row.cells() for row in layer_block])
                    preamble = []  # once per run
                if args.write_choices and backward:
                    measured = [m for m in (row.measured() for row in backward) if m is not None]
                    write_table(measured, about, args.choices_file)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    if steps:
        print(f"\n# a training step of {args.net}: forward, loss, backward, SGD update")
        print("\n".join(format_table(STEP_HEADER, steps, left={1, 2, 8})))
    if backward:
        print(f"\n# backward of each conv and fc of {args.net}, ms (step: what the training step runs)")
        print("\n".join(format_table(LAYER_HEADER, [row.cells() for row in backward], left={1, 2, 9, 11, 12})))
    if args.write_choices:
        count = sum(row.measured() is not None for row in backward)
        print(f"\nwrote {count} measurements to {args.choices_file}")
    return 0


# --- helpers ---------------------------------------------------------------------------------------------------


def _device(smoke: bool) -> torch.device | None:
    """The GPU unless Triton interprets; else, with --smoke, the CPU (under the interpreter); else None."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available() and not interpreting:
        return torch.device("cuda")
    return torch.device("cpu") if smoke else None


def _fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _activation(z: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, slope)
    return z


def _input_shape(graph) -> tuple[int, ...]:
    (shape,) = [tuple(item.shape) for item in layers(graph) if item.op == "input"]
    return shape


def _output(graph) -> Layer:
    return graph.nodes[graph.graph["outputs"][0]]["layer"]


def _classes(graph) -> int:
    return int(_output(graph).shape[0])


def _rounded(ms: float) -> float:
    """To the tenth of a microsecond: equal runs write equal tables."""
    return max(round(ms, 4), 1e-4)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else ""


def _append_tsv(path: str, preamble: list[str], steps: list[tuple[str, ...]], backward: list[tuple[str, ...]]) -> None:
    """The rows of one block; the column names first when the file is new, then each `preamble` line (the
    command and the machine, once per run) as a comment."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", encoding="utf-8") as file:
        if new:
            file.write("\t".join(("# step", *STEP_HEADER)) + "\n")
            file.write("\t".join(("# backward", *LAYER_HEADER)) + "\n")
        file.writelines(f"# {line}\n" for line in preamble)
        for cells in steps:
            file.write("\t".join(("step", *cells)) + "\n")
        for cells in backward:
            file.write("\t".join(("backward", *cells)) + "\n")


if __name__ == "__main__":
    sys.exit(main())
