"""What every kernel of a training step launches with, found without a GPU, for the plan and the sm_90 report.

Each emitted file of `train/` (netdsl.compiler.emit_training) is imported and its `forward`, `backward` (or
`update`) run on `meta` tensors (shapes and dtypes, no data) with its KERNELS replaced by recorders: the
launchers' own code picks the grids and tiles for the batch, as on a GPU, exactly as
`netdsl.compiler.launches.record_launches` does for inference. The recordings are `Launch`es, which
`sm90_resources` builds and caches; a launch is named `<step>.<kernel>`, after the forward step that runs it
or its backward step.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import torch

from netdsl.compiler.launches import Launch, Recorder, describe_launch, load_kernel_file
from netdsl.ir.dtypes import torch_dtype


def record_training_launches(program: nx.DiGraph, folder: Path, batch: int, dtype: str) -> list[Launch]:
    """Every launch of one training step at `batch` in `dtype`, in plan order, from the files in `folder`."""
    element = torch_dtype(dtype)
    by_name = {name: program.nodes[name]["step"] for name in program.nodes}
    backward_of = {step.options["forward"]: step for step in by_name.values() if step.kind == "backward"}
    recorded: dict[str, list[Launch]] = {}
    for name, step in by_name.items():
        path = folder / f"{name}.py"
        if not path.is_file():
            continue  # inputs, transfers, views, backward steps (in their forward's file)
        module = load_kernel_file(path)
        source = path.read_text(encoding="utf-8")
        if step.kind == "update":
            total = sum(size for _, size in module.PARAMETERS)
            buffers = (_meta(total),) * 3  # weights, gradients, velocities
            recorded[name] = _recorded(module, name, source, lambda m, buffers=buffers: m.update(*buffers, lr=0.01))
            continue
        x = _meta(batch, *module.INPUT_SHAPE, dtype=element)
        weights = {n: _meta(*s, dtype=torch.float32 if step.kind == "batch_norm" else element)
                   for n, s in module.WEIGHT_SHAPES.items()}  # fmt: skip
        target = _meta(batch, dtype=torch.int64)
        saved = {}

        def forward(m, x=x, weights=weights, target=target, saved=saved):
            saved.update(m.forward(x, weights, seed=1, target=target)[1])

        recorded[name] = _recorded(module, name, source, forward)
        back = backward_of.get(name)
        if back is not None and back.options.get("implementation", "netdsl") == "netdsl":
            grad = _meta(batch, *module.OUTPUT_SHAPE, dtype=element)

            def backward(m, grad=grad, saved=saved, weights=weights):
                m.backward(grad, saved, weights)

            recorded[back.name] = _recorded(module, back.name, source, backward)
    order = [name for names in program.graph["partitions"].values() for name in names]
    return [launch for name in order for launch in recorded.get(name, [])]


def _recorded(module, step: str, source: str, run) -> list[Launch]:
    """The launches `run(module)` makes, each kernel's first, with the module's kernels standing in."""
    kernels = dict(module.KERNELS)
    recorders = {name: Recorder() for name in kernels}
    module.KERNELS.update(recorders)
    try:
        run(module)
    finally:
        module.KERNELS.update(kernels)
    found = []
    for name, recorder in recorders.items():
        for grid, args, kwargs in recorder.calls[:1]:
            found.append(describe_launch(f"{step}.{name}", kernels[name], grid, args, kwargs, source))
    return found


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")

