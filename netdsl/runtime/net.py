"""Running a net: `netdsl.load("nets/alexnet.net", weights=...)(images)`.

`Net` compiles a `.net` file in memory and runs its fused program on a batch:

- each logical device of the net (`gpu0`, `gpu1`, ...) is mapped to a torch device (`devices=`);
  without a mapping every logical device runs on the CPU when there is no CUDA, on `cuda:0` with one
  GPU, and on one GPU each (round robin) with several;
- each logical device gets one arena tensor per batch size, allocated on the first call with that
  batch and reused after; every step writes its output into a view of the arena at the offset the
  memory plan gave it (elements per image times the batch); flatten steps are views of their input;
  a map the plan lays out channels-last (netdsl.compiler.layout) is an N x C x H x W view with channels-last
  strides; outputs are always NCHW;
- steps run in an order that respects every partition's launch order and every transfer. On the CPU
  the partitions run one after another in this process; on CUDA each partition has a stream of its
  own, and a transfer's stream waits on an event recorded after the step it copies (`streams="device"`:
  the partitions mapped to one GPU share one stream instead, their steps interleaved in that order,
  which measures whether the towers' streams overlap at all);
- `backend="torch"` runs each step with the PyTorch reference (`netdsl.codegen.reference`),
  `backend="triton"` calls the generated kernel file's `launch(inputs, weights, out=view)`;
- weights are a dict `"<layer>.<tensor>" -> tensor` (or numpy array), e.g. `conv1@gpu0.weight`;
  a batch norm folded into the conv before it is folded into that conv's weights on load;
- `cuda_graph=True` (every partition on one GPU): the first call at a batch size runs eagerly (Triton
  compiles its kernels then), the second captures the whole forward pass, streams and events
  included, into a CUDA graph, and later calls copy the inputs into the graph's own input tensors
  and replay it: one launch instead of one per step, which is what small batches are short of;
- compile-time choices: `layout`, `precision` (fp32: "ieee", exact products, or "tf32x3", three TF32 tensor-core
  products; netdsl.ir.dtypes) and `space_to_depth=True` (strided convs over few channels, AlexNet's conv1, run as
  stride-1 convs over blocks of pixels: netdsl.compiler.space_to_depth; the filters are rearranged on load) and
  `merge_towers=True` (a towers block's copies of each layer as one grouped launch on the first tower's device,
  for towers sharing one GPU: netdsl.compiler.merge_towers; the towers' weights are joined on load) and
  `split_k=True` (channels-last convs whose tiles are too few to fill the GPU, small batches, share each tile's
  taps among several programs: codegen/conv_nhwc.split_taps) and `tuning` (a file of `netdsl tune`: the tiles timed
  fastest on a device for each kernel and batch size; netdsl.compiler.tuning).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from html import escape
from pathlib import Path
from typing import TextIO

import networkx as nx
import numpy as np
import torch

from netdsl.codegen.interpret import interpreting, widen_bf16_dots
from netdsl.codegen.layouts import to_layout, view_as_layout
from netdsl.codegen.reference import run_layers
from netdsl.codegen.space_to_depth import space_to_depth_weight
from netdsl.compiler.compile import Compiled, compile_net, write_build
from netdsl.compiler.launches import load_kernel_file
from netdsl.compiler.layout import LAYOUT_OPTIONS, weight_layouts
from netdsl.compiler.passes import Options
from netdsl.compiler.steps import Step
from netdsl.errors import NetError
from netdsl.ir.display import graph_bundle, graph_html, graph_svg
from netdsl.ir.dtypes import DTYPES, torch_dtype
from netdsl.ir.graph import output_names
from netdsl.ir.limits import check_batch, check_memory
from netdsl.ir.ops import layer_tensors
from netdsl.runtime.arrays import all_finite, from_numpy
from netdsl.runtime.devices import device_name, map_devices
from netdsl.runtime.module import GraphModule
from netdsl.runtime.weights import checked_weights, fold_weights, init_weights, load_weights, weight_specs

BACKENDS = ("torch", "triton")
STREAMS = ("partition", "device")  # a CUDA stream per partition, or one per GPU shared by its partitions
WEIGHTED_OPS = ("conv", "fc", "batchnorm")  # the ops whose weights a step takes (from its first such layer)
COPY_KINDS = ("input", "transfer", "view")  # steps that launch no kernel
NARROW = (torch.float16, torch.bfloat16, torch.float32)  # weight dtypes float32 holds exactly


class TuningWarning(UserWarning):
    """A net built with tiles tuned on another device than it runs on."""


def load(path: str | Path, **kwargs) -> Net:
    """`netdsl.load(path, backend=..., devices=..., weights=...)`: a `Net` ready to run (every option: `Net`)."""
    return Net(path, **kwargs)


class Net:
    """A compiled net, callable on a batch: `net(x)` -> the output tensor, or for several outputs a dict by the
    names the `output` statement wrote (`output a, b`: `{"a": ..., "b": ...}`). `x`: a tensor or numpy array of
    N x the input's shape in the net's dtype, or a dict by input name for several inputs. Calls from several
    threads take turns (each call uses the arena of its batch size).

    Options (keywords):

    - `backend`: "torch" (each step by PyTorch's ops) or "triton" (the generated kernels; on the CPU under
      Triton's interpreter);
    - `devices`: the net's logical devices -> torch devices: {"gpu0": "cuda:0", "gpu1": "cuda:1"}, the same as
      text ("gpu0=cuda:0,gpu1=cuda:1"), or one device for all ("cuda:0"); default: one GPU each, else the CPU;
    - `dtype`: "fp32", "tf32", "fp16" or "bf16"; `precision`: fp32's products, "ieee" (exact) or "tf32x3";
    - `weights`: a dict "<layer>.<tensor>" -> tensor or array, or a safetensors file (docs/weights.md); default:
      initial values by `init` ("paper": N(0, 0.01) as the paper; "he") drawn from `seed` (a whole number >= 0);
    - `batch`: the batch size the plan's report and memory check assume (any batch runs);
    - `build_dir`: a folder to write the build into (kernels, plan.json, report.txt; the triton backend uses a
      temporary one otherwise);
    - `check_inputs`: refuse inputs holding NaN or infinities (default True);
    - `progress`: a text stream (e.g. sys.stderr) to show the first run's progress on, kernel by kernel;
    - `cuda_graph`, `streams`, `layout`, `space_to_depth`, `merge_towers`, `split_k`, `tuning`: see this
      module's docstring and docs/runtime.md.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        backend: str = "torch",
        devices: Mapping[str, str] | str | None = None,
        dtype: str = "fp32",
        weights: Mapping[str, object] | str | Path | None = None,
        build_dir: str | Path | None = None,
        batch: int = 1,
        seed: int = 0,
        init: str = "paper",
        check_inputs: bool = True,
        progress: TextIO | None = None,
        cuda_graph: bool = False,
        layout: str = "auto",
        precision: str | None = None,
        space_to_depth: bool = False,
        streams: str = "partition",
        merge_towers: bool = False,
        split_k: bool = False,
        tuning: str | Path | None = None,
    ) -> None:
        self.path = str(path)
        batch = check_batch(batch)
        if progress is not None and not (callable(getattr(progress, "write", None)) and hasattr(progress, "flush")):
            raise NetError(
                f"progress must be a text stream, got {type(progress).__name__}",
                where="progress",
                hint="e.g. progress=sys.stderr, or None for none",
            )
        if streams not in STREAMS:
            raise NetError(f"unknown streams `{streams}`", where="streams", hint=f"streams: {', '.join(STREAMS)}")
        if backend not in BACKENDS:
            raise NetError(f"unknown backend `{backend}`", where="backend", hint=f"backends: {', '.join(BACKENDS)}")
        if dtype not in DTYPES:
            raise NetError(f"unknown dtype `{dtype}`", where="dtype", hint=f"dtypes: {', '.join(DTYPES)}")
        self.backend = backend
        self.dtype = dtype
        self.torch_dtype = torch_dtype(dtype)
        self.check_inputs = check_inputs
        self.init = init  # the scheme of the default weights: netdsl.runtime.weights.init_weights
        # Where to show progress through the first run, while Triton compiles each kernel (None: silent).
        self.progress = progress
        self._warm: set[tuple[int, torch.dtype]] = set()
        if layout not in LAYOUT_OPTIONS:
            raise NetError(f"unknown layout `{layout}`", where="layout", hint=f"layouts: {', '.join(LAYOUT_OPTIONS)}")
        options = Options(
            batch, dtype, layout=layout, precision=precision, space_to_depth=space_to_depth, merge_towers=merge_towers,
            split_k=split_k, tuning=None if tuning is None else str(tuning),
        )  # fmt: skip
        self.compiled: Compiled = compile_net(path, options)
        self.program: nx.DiGraph = self.compiled.program
        self.layer_graph: nx.DiGraph = self.compiled.layers  # before folding: batch norms are still there
        self._steps: dict[str, Step] = {name: self.program.nodes[name]["step"] for name in self.program.nodes}
        self._partitions: dict[str, list[str]] = self.program.graph["partitions"]
        self._order = _run_order(self.program, self._partitions)
        self._roots = {name: self.program.graph["views"].get(name, name) for name in self._steps}
        self._buffers = self.program.graph["buffers"]
        self._arena_elements: dict[str, int] = self.program.graph["arena"]
        # A declared device with no steps (gpu1, its towers merged onto gpu0) may be mapped too.
        self.devices = map_devices(list(self._partitions), devices, declared=self.layer_graph.graph.get("devices", {}))
        # A step whose output another device reads records an event for it (used with CUDA streams).
        self._signals = {
            name
            for name in self._steps
            if any(self._steps[r].device != self._steps[name].device for r in self.program.successors(name))
        }
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        for name in self._order:
            step = self._steps[name]
            if step.kind == "input":
                self.input_shapes.setdefault(step.first.name, tuple(step.shape))
        names = output_names(self.layer_graph)
        self.output_steps: dict[str, str] = {  # the name a call returns an output by -> the step computing it
            names[layer_name]: step
            for layer_name, step in zip(self.layer_graph.graph["outputs"], self.program.graph["outputs"], strict=True)
        }
        self.weight_shapes = weight_specs(self.layer_graph)

        self.build_dir: Path | None = None
        if build_dir is not None or backend == "triton":
            if build_dir is None:  # a folder of its own, removed with the net (or at exit), without a ResourceWarning
                build_dir = tempfile.mkdtemp(prefix="netdsl-build-")
                weakref.finalize(self, shutil.rmtree, build_dir, ignore_errors=True)
            self.build_dir = write_build(self.compiled, build_dir)
        self._modules = {}
        if backend == "triton":
            self._check_triton_runnable()
            if self.compiled.tuning is not None:
                self._check_tuned_device(self.compiled.tuning.device)
            for name in self._order:
                if self._steps[name].kind not in COPY_KINDS:
                    self._modules[name] = load_kernel_file(self.build_dir / "kernels" / f"{name}.py")
        self._layer_specs = {
            name: [(item.op, dict(item.params)) for item in step.layers] for name, step in self._steps.items()
        }
        self._arenas: dict[int, dict[str, torch.Tensor]] = {}
        self._views: dict[int, dict[str, torch.Tensor]] = {}
        self._streams = self._make_streams(streams)
        self.cuda_graph = cuda_graph
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self._lock = threading.RLock()  # one call at a time: calls with a batch size share its arena
        if cuda_graph:
            self._check_graphable()
        self.load_weights(self._default_weights(seed) if weights is None else weights)

    # --- set-up -----------------------------------------------------------------------------------

    def _check_triton_runnable(self) -> None:
        on_cpu = [name for name, device in self.devices.items() if device.type != "cuda"]
        if on_cpu and self.dtype == "bf16" and interpreting():
            widened = widen_bf16_dots()  # the interpreter's bf16 dot multiplies raw bits otherwise
            if not widened:
                raise NetError(
                    "this Triton's interpreter computes bf16 matrix products wrongly (triton-lang/triton#11584)",
                    where="dtype",
                    hint="run bf16 on a GPU, or use backend='torch' (--backend torch) or another dtype on the CPU",
                )
        if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise NetError(
                f"the triton backend cannot run device `{on_cpu[0]}` on {self.devices[on_cpu[0]]}",
                where="backend",
                hint="map every device to a CUDA GPU, or set TRITON_INTERPRET=1 (before triton is imported) to run "
                "the kernels in Triton's interpreter on the CPU, or use backend='torch'",
            )

    def _check_tuned_device(self, tuned_on: str) -> None:
        """Warns (TuningWarning) when the tuned tiles were timed on another kind of device than this net runs on:
        they still compute the same, but may be slow here, or need more shared memory than this GPU has."""
        here = {device_name(device) for device in self.devices.values()}
        if here != {tuned_on}:
            warnings.warn(
                f"the tuned tiles were timed on {tuned_on}, and this net runs on {', '.join(sorted(here))}: "
                "tune on this device (netdsl tune) for tiles that suit it",
                TuningWarning,
                stacklevel=3,
            )

    def _check_graphable(self) -> None:
        places = set(self.devices.values())
        if any(device.type != "cuda" for device in places) or len(places) != 1:
            where = ", ".join(f"{name}->{device}" for name, device in self.devices.items())
            raise NetError(
                f"CUDA-graph capture needs every partition on one GPU; this net runs on {where}",
                where="cuda_graph",
                hint="map all devices to one GPU (e.g. gpu0=cuda:0,gpu1=cuda:0) or leave cuda_graph off",
            )

    def _make_streams(self, streams: str) -> dict[str, torch.cuda.Stream]:
        """Logical device -> its CUDA stream: one per partition, or (`"device"`) one per GPU, shared."""
        on_gpus = {name: device for name, device in self.devices.items() if device.type == "cuda"}
        if streams == "device":
            shared = {device: torch.cuda.Stream(device=device) for device in set(on_gpus.values())}
            return {name: shared[device] for name, device in on_gpus.items()}
        return {name: torch.cuda.Stream(device=device) for name, device in on_gpus.items()}

    def _default_weights(self, seed: int) -> dict[str, np.ndarray]:
        return init_weights(self.layer_graph, seed=seed, scheme=self.init)

    # --- weights ----------------------------------------------------------------------------------

    def load_weights(self, weights: Mapping[str, object] | str | Path) -> None:
        """Takes every weight of the net (`"<layer>.<tensor>"` -> tensor or array), checks names and shapes,
        folds batch norms into the convs that absorbed them and puts each step's weights on its device."""
        if isinstance(weights, (str, os.PathLike)):
            weights = load_weights(weights, self.layer_graph)
        checked = checked_weights(weights, self.weight_shapes)
        with self._lock:
            self._take_weights(checked)

    def _take_weights(self, checked: dict[str, torch.Tensor]) -> None:
        # This net's own copy, in float32 (exact for 16-bit weights; wider ones stay float64, rounded once into the
        # net's dtype): numpy reads it without another copy, and folding computes in float64 where it folds.
        tensors = {
            name: tensor.to("cpu", torch.float32 if tensor.dtype in NARROW else torch.float64, copy=True)
            for name, tensor in checked.items()
        }
        self._graphs.clear()  # captured graphs read the old weight tensors
        folded = fold_weights(self.layer_graph, {name: tensor.numpy() for name, tensor in tensors.items()})
        self._step_weights = {
            name: self._weights_of(step, folded) for name, step in self._steps.items() if step.kind not in COPY_KINDS
        }
        self._unfolded = {name: tensor.to(torch.float32) for name, tensor in tensors.items()}  # for as_module

    def _weights_of(self, step: Step, folded: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A step's weights (those of its conv, fc or batch norm, by `fold_weights`), on its device, in its layouts."""
        item = next((member for member in step.layers if member.op in WEIGHTED_OPS), None)
        if item is None:
            return {}
        names = dict.fromkeys([*layer_tensors(item), *(["bias"] if item.fields.get("folded") else [])])
        device = self.devices[step.device]
        layouts = weight_layouts(step)
        # A layer merged from a towers block's copies (netdsl.compiler.merge_towers) has their filters side by side.
        sources = item.fields.get("merged", [item.name])
        tensors = {
            key: torch.from_numpy(np.concatenate([folded[f"{name}.{key}"] for name in sources])) for key in names
        }
        block = step.options.get("space_to_depth")
        if block is not None:  # the conv reads its input cut into blocks of pixels (netdsl.compiler.space_to_depth)
            tensors["weight"] = space_to_depth_weight(tensors["weight"], block)
        largest = torch.finfo(self.torch_dtype).max
        for key, tensor in tensors.items():
            if torch.finfo(tensor.dtype).max > largest and tensor.numel() and float(tensor.abs().max()) > largest:
                folding = " after folding its batch norm" if item.fields.get("folded") else ""
                raise NetError(
                    f"weight `{item.name}.{key}` holds values beyond {self.dtype}'s range{folding} (largest "
                    f"{float(tensor.abs().max()):.3g}, {self.dtype} reaches {largest:.3g})",
                    where="weights",
                    hint="run the net in a wider dtype (fp32 or bf16), or scale the weights",
                )
        return {
            key: to_layout(tensor.to(device=device, dtype=self.torch_dtype), layouts.get(key, "nchw"))
            for key, tensor in tensors.items()
        }

    # --- running ----------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor | np.ndarray | Mapping[str, object]) -> torch.Tensor | dict[str, torch.Tensor]:
        with self._lock:
            return self._call(x)

    def _call(self, x) -> torch.Tensor | dict[str, torch.Tensor]:
        inputs, batch = self._take_inputs(x)
        views = self.views(batch)
        with torch.no_grad(), _tf32(self.dtype == "tf32"):
            if self.cuda_graph and (batch, self.torch_dtype) in self._warm:
                self._replay(batch, views, inputs)
            elif self.progress is not None and (batch, self.torch_dtype) not in self._warm:
                self._first_run(views, inputs)
            elif self._streams:
                self._run_streams(views, inputs)
            else:
                for name in self._order:
                    self._run_step(name, views, inputs)
            self._warm.add((batch, self.torch_dtype))
            outputs = {name: views[step].clone() for name, step in self.output_steps.items()}
        self._check_gpu_inputs(inputs)
        return next(iter(outputs.values())) if len(outputs) == 1 else outputs

    def run_partition(
        self,
        device: str,
        x: torch.Tensor | np.ndarray | Mapping[str, object],
        receive: Callable[[str, torch.Tensor], None],
        send: Callable[[str, torch.Tensor, list[str]], None],
    ) -> dict[str, torch.Tensor]:
        """Runs only the steps of the logical device `device`, in the order every partition follows
        (`order`), for a caller that runs the other partitions elsewhere (netdsl.runtime.distributed):
        a transfer into `device` calls `receive(source_step, out)`, which must fill `out` with that
        step's output; a step whose output other devices read calls `send(step, output, devices)`.
        Returns the net's outputs that this partition computes, by name. Each partition of a batch is run by one
        caller; the calls for different partitions may run at once (they write their own devices' arenas)."""
        if device not in self._partitions:
            devices = ", ".join(self._partitions)
            raise NetError(f"the net has no device `{device}`", where="device", hint=f"its devices: {devices}")
        # No lock, unlike a call: the partitions of one batch run side by side (a thread each, or a process
        # each), and `receive` waits for another partition's `send`, which a lock held here would block.
        inputs, batch = self._take_inputs(x)
        views = self.views(batch)
        with torch.no_grad(), _tf32(self.dtype == "tf32"):
            for name in self._order:
                step = self._steps[name]
                if step.device != device:
                    continue
                if step.kind == "transfer":
                    receive(step.inputs[0], views[name])
                else:
                    self._run_step(name, views, inputs)
                readers = {self._steps[reader].device for reader in self.program.successors(name)} - {device}
                if readers:
                    send(name, views[name], sorted(readers))
            outputs = {
                output: views[name].clone()
                for output, name in self.output_steps.items()
                if self._steps[name].device == device
            }
        self._check_gpu_inputs(inputs)
        return outputs

    @property
    def order(self) -> list[str]:
        """Every step's name, in the order the steps run (each partition's launches in plan order)."""
        return list(self._order)

    def _replay(self, batch: int, views: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        """Runs the captured graph of this batch size, capturing it first (after the eager warm-up run)."""
        if batch not in self._graphs:
            device = next(iter(self.devices.values()))
            static = {name: torch.empty_like(value, device=device) for name, value in inputs.items()}
            for name, value in inputs.items():
                static[name].copy_(value)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(device), torch.cuda.graph(graph):
                self._run_streams(views, static)
            self._graphs[batch] = (graph, static)
        graph, static = self._graphs[batch]
        for name, value in inputs.items():
            static[name].copy_(value, non_blocking=True)
        graph.replay()

    def _first_run(self, views: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        """The first run at a batch size, one step at a time with a progress bar: on a GPU this is when
        Triton compiles each kernel (seconds apiece); under the interpreter, the slow first pass."""
        kernels = [name for name in self._order if self._steps[name].kind not in COPY_KINDS]
        done = 0
        for name in self._order:
            self._run_step(name, views, inputs)
            if name in kernels:
                done += 1
                filled = 30 * done // len(kernels)
                self.progress.write(
                    f"\r  first run [{'#' * filled}{'.' * (30 - filled)}] {done}/{len(kernels)} "
                    f"kernels  {name[:40]:<40}"
                )
                self.progress.flush()
        self.progress.write("\n")

    def profile(self, x) -> tuple[torch.Tensor | dict[str, torch.Tensor], dict[str, float]]:
        """Runs one batch step by step, partitions one after another, and times every step (ms):
        CUDA events on a GPU, the wall clock on the CPU. Returns the outputs and the times."""
        with self._lock:
            return self._profile(x)

    def _profile(self, x) -> tuple[torch.Tensor | dict[str, torch.Tensor], dict[str, float]]:
        inputs, batch = self._take_inputs(x)
        views = self.views(batch)
        times: dict[str, float] = {}
        with torch.no_grad(), _tf32(self.dtype == "tf32"):
            for name in self._order:
                if self.devices[self._steps[name].device].type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    self._run_step(name, views, inputs)
                    end.record()
                    end.synchronize()
                    times[name] = start.elapsed_time(end)
                else:
                    began = time.perf_counter()
                    self._run_step(name, views, inputs)
                    times[name] = (time.perf_counter() - began) * 1e3
            outputs = {name: views[step].clone() for name, step in self.output_steps.items()}
        self._check_gpu_inputs(inputs)
        return (next(iter(outputs.values())) if len(outputs) == 1 else outputs), times

    def kernel_steps(self) -> dict[str, tuple[object, dict[str, torch.Tensor]]]:
        """Each step that launches a generated kernel (the triton backend), in run order: its kernel file's module
        and its weights as the step takes them (on its device, in its layouts)."""
        return {name: (module, self._step_weights[name]) for name, module in self._modules.items()}

    def memory(self, batch: int) -> dict[str, tuple[int, int]]:
        """Per logical device: bytes of its activation arena at `batch`, and bytes of its weights."""
        batch = check_batch(batch)
        width = torch.empty((), dtype=self.torch_dtype).element_size()
        weights = dict.fromkeys(self._partitions, 0)
        for name, tensors in self._step_weights.items():
            weights[self._steps[name].device] += sum(t.numel() * t.element_size() for t in tensors.values())
        return {device: (self._arena_elements[device] * batch * width, weights[device]) for device in self._partitions}

    def _run_step(self, name: str, views: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        step = self._steps[name]
        out = views[name]
        if step.kind == "view":
            return  # shares its input's buffer
        if step.kind in ("input", "transfer"):
            source = inputs[step.first.name] if step.kind == "input" else views[step.inputs[0]]
            out.copy_(source, non_blocking=out.is_cuda)  # into host memory: a blocking copy
            return
        sources = [views[source] for source in step.inputs]
        weights = self._step_weights[name]
        if self.backend == "triton":
            result = self._modules[name].launch(sources, weights, out=out)
        else:
            result = run_layers(self._layer_specs[name], sources, weights)
        if result is not out and (result.data_ptr() != out.data_ptr() or result.shape != out.shape):
            out.copy_(result.reshape(out.shape))

    def _run_streams(self, views: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        """One CUDA stream per partition; a step reading another partition's output waits on the event
        recorded after that step. Partitions mapped to the CPU run synchronously, after synchronizing with
        the GPU steps they read. The caller's streams wait for everything before the outputs are copied."""
        cuda_devices = {device for device in self.devices.values() if device.type == "cuda"}
        cuda_devices |= {x.device for x in inputs.values() if x.is_cuda}
        callers = [torch.cuda.current_stream(device) for device in cuda_devices]
        for stream in self._streams.values():
            for caller in callers:
                stream.wait_stream(caller)  # the inputs, the weights and the arena were made on these
        done: dict[str, torch.cuda.Event] = {}
        for name in self._order:
            step = self._steps[name]
            stream = self._streams.get(step.device)
            if stream is None:  # a partition on the CPU
                for source in step.inputs:
                    if source in done:
                        done[source].synchronize()
                self._run_step(name, views, inputs)
                continue
            with torch.cuda.device(stream.device), torch.cuda.stream(stream):
                for source in step.inputs:
                    if source in done:
                        stream.wait_event(done[source])
                source_stream = self._streams.get(self._steps[step.inputs[0]].device) if step.inputs else None
                if step.kind == "transfer" and source_stream is not None and source_stream.device != stream.device:
                    # A copy between two GPUs runs on the source device's current stream (PyTorch puts a
                    # barrier between it and the destination's current stream): make that the source's
                    # partition stream, which has already produced the data.
                    with torch.cuda.stream(source_stream):
                        self._run_step(name, views, inputs)
                else:
                    self._run_step(name, views, inputs)
                if name in self._signals:
                    done[name] = torch.cuda.Event()
                    done[name].record(stream)
        for stream in self._streams.values():
            for caller in callers:
                caller.wait_stream(stream)

    def _take_inputs(self, x) -> tuple[dict[str, torch.Tensor], int]:
        names = list(self.input_shapes)
        if isinstance(x, Mapping):
            unknown = [name for name in x if name not in self.input_shapes]
            if unknown:
                raise NetError(
                    f"the net has no input `{unknown[0]}`", where=self.path, hint=f"inputs: {', '.join(names)}"
                )
            missing = [name for name in names if name not in x]
            if missing:
                raise NetError(f"input `{missing[0]}` is missing", where=self.path, hint=f"inputs: {', '.join(names)}")
            given = dict(x)
        elif len(names) == 1:
            given = {names[0]: x}
        else:
            raise NetError(
                f"the net has {len(names)} inputs: pass a dict of them",
                where=self.path,
                hint=f"inputs: {', '.join(names)}",
            )
        inputs: dict[str, torch.Tensor] = {}
        batch = None
        for name in names:
            value = given[name]
            converted, given_type = f"x.to({self.torch_dtype})", getattr(value, "dtype", None)
            if isinstance(value, np.ndarray):
                if value.dtype.kind not in "biuf":
                    raise NetError(
                        f"input `{name}` holds {value.dtype} values, not numbers",
                        where=self.path,
                        hint="give the images as float32 numbers: x.astype(numpy.float32)",
                    )
                numpy_type = {"fp32": "np.float32", "tf32": "np.float32", "fp16": "np.float16"}.get(self.dtype)
                converted = f"x.astype({numpy_type})" if numpy_type else f"torch.from_numpy(x).to({self.torch_dtype})"
                value = from_numpy(value)
            if isinstance(value, torch.Tensor) and (value.layout != torch.strided or value.is_meta):
                raise NetError(
                    f"input `{name}` is a {'meta' if value.is_meta else str(value.layout)} tensor",
                    where=self.path,
                    hint="pass a dense tensor with values (x.to_dense())",
                )
            if not isinstance(value, torch.Tensor):
                raise NetError(
                    f"input `{name}` must be a tensor, got {type(value).__name__}",
                    where=self.path,
                    hint="give a torch tensor or a numpy array: torch.from_numpy(x)",
                )
            shape = self.input_shapes[name]
            if value.dim() != len(shape) + 1 or tuple(value.shape[1:]) != shape or value.shape[0] < 1:
                hint = f"the net reads N x {_fmt(shape)}, N >= 1 images"
                if tuple(value.shape) == shape:
                    hint = "add the batch dimension: x.unsqueeze(0)"
                raise NetError(
                    f"input `{name}` has shape {_fmt(value.shape)}, expected N x {_fmt(shape)}",
                    where=self.path,
                    hint=hint,
                )
            if value.dtype != self.torch_dtype:
                raise NetError(
                    f"input `{name}` has dtype {given_type}, the net runs in {self.dtype} ({self.torch_dtype})",
                    where=self.path,
                    hint=f"convert it first, e.g. {converted}",
                )
            if batch is not None and value.shape[0] != batch:
                raise NetError(
                    f"input `{name}` has a batch of {value.shape[0]}, the others {batch}",
                    where=self.path,
                    hint="give every input the same number of images",
                )
            batch = value.shape[0]
            if self.check_inputs and not value.is_cuda:
                self._check_finite(name, value)
            inputs[name] = value
        return inputs, batch

    def _check_finite(self, name: str, value: torch.Tensor) -> None:
        if not all_finite([value]):
            bad = "NaN" if bool(torch.isnan(value).any()) else "infinite values"
            raise NetError(
                f"input `{name}` contains {bad}",
                where=self.path,
                hint="check the data",
            )

    def _check_gpu_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        """The NaN/Inf check of inputs already on a GPU, made after the pass is enqueued: reading its
        answer waits for the GPU, which before the launches would serialize host and device."""
        if self.check_inputs:
            for name, value in inputs.items():
                if value.is_cuda:
                    self._check_finite(name, value)

    # --- memory -----------------------------------------------------------------------------------

    def arena(self, batch: int) -> dict[str, torch.Tensor]:
        """Each logical device's arena for this batch size: one tensor, allocated on first use."""
        if batch not in self._arenas:
            check_memory(self.layer_graph, batch, self.dtype)  # the net's own `device ... memory` limits
            try:
                self._arenas[batch] = {
                    device: torch.empty(max(elements, 1) * batch, dtype=self.torch_dtype, device=self.devices[device])
                    for device, elements in self._arena_elements.items()
                }
            except (torch.OutOfMemoryError, RuntimeError, MemoryError) as error:
                need = (
                    max(self._arena_elements.values()) * batch * torch.empty((), dtype=self.torch_dtype).element_size()
                )
                raise NetError(
                    f"a batch of {batch} needs up to {need / 2**20:,.1f} MiB of activations per device, which "
                    f"cannot be allocated ({str(error).splitlines()[0][:120]})",
                    where="batch",
                    hint="use a smaller batch",
                ) from None
        return self._arenas[batch]

    def views(self, batch: int) -> dict[str, torch.Tensor]:
        """Step name -> its output: a [batch, *shape] view of its device's arena at its planned offset."""
        if batch in self._views:
            return self._views[batch]
        arenas = self.arena(batch)
        views: dict[str, torch.Tensor] = {}
        for name in self._order:
            step = self._steps[name]
            root = self._roots[name]
            buffer = self._buffers[root]
            count = math.prod(self._steps[root].shape) * batch
            start = buffer.offset * batch
            flat = arenas[buffer.device][start : start + count]
            views[name] = view_as_layout(flat, batch, tuple(step.shape), self._steps[root].layout)
        self._views[batch] = views
        return views

    def release(self) -> None:
        """Drops every arena (they are allocated again on the next call)."""
        with self._lock:
            self._graphs.clear()  # they read and write the arenas
            self._arenas.clear()
            self._views.clear()

    # --- torch integration ------------------------------------------------------------------------

    def as_module(self) -> GraphModule:
        """A trainable `torch.nn.Module` of this net (`netdsl.runtime.module.GraphModule`): the layer graph
        before folding, with the weights last loaded (batch norms apart, float32), each partition's
        layers on this net's device for it, computing every layer with PyTorch under autograd. It starts
        in eval mode, where its outputs are this net's (torch backend); `.train()` for training."""
        devices = dict(self.devices)
        for step in self._steps.values():  # a tower merged onto another device (merge_towers) runs there
            for item in step.layers:
                for copy in item.fields.get("merged", []):
                    devices.setdefault(self.layer_graph.nodes[copy]["layer"].device, self.devices[step.device])
        return GraphModule(self.layer_graph, devices=devices, weights=self._unfolded, tf32=self.dtype == "tf32").eval()

    def __repr__(self) -> str:
        devices = ", ".join(f"{name}->{device}" for name, device in self.devices.items())
        name = self.program.graph["name"]
        return f"Net({name!r}, backend={self.backend!r}, dtype={self.dtype!r}, devices: {devices})"

    # In a notebook a net shows itself as its layer graph does (netdsl.ir.display): picture and table.
    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        return graph_bundle(self.layer_graph, heading=f"<p>{escape(repr(self))}</p>\n")

    def _repr_html_(self) -> str | None:
        shown = graph_html(self.layer_graph)
        return None if shown is None else f"<p>{escape(repr(self))}</p>\n{shown}"

    def _repr_svg_(self) -> str | None:
        return graph_svg(self.layer_graph)


# --- helpers --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tf32(enabled: bool):
    """PyTorch's own convolutions and matrix products (the torch backend) in TF32 only for dtype tf32:
    on an NVIDIA GPU cuDNN would otherwise use TF32 for fp32 convolutions by default."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run_order(program: nx.DiGraph, partitions: dict[str, list[str]]) -> list[str]:
    """Every step once, after its inputs and after the step before it in its own partition."""
    order = nx.DiGraph()
    order.add_nodes_from(program.nodes)
    order.add_edges_from(program.edges)
    for names in partitions.values():
        order.add_edges_from(itertools.pairwise(names))
    index = {name: i for i, name in enumerate(program.nodes)}
    return list(nx.lexicographical_topological_sort(order, key=lambda name: index[name]))


def _fmt(shape) -> str:
    return " x ".join(str(int(n)) for n in shape) or "scalar"
