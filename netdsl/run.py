"""`netdsl run`: inputs in, top classes out — a thin layer over `netdsl.runtime.Net`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from netdsl.compile import write_atomic_bytes
from netdsl.errors import NetError


def parse_devices(text: str | None) -> dict[str, str] | None:
    """`gpu0=cuda:0,gpu1=cuda:1` -> {"gpu0": "cuda:0", "gpu1": "cuda:1"}."""
    if not text:
        return None
    mapping = {}
    for item in text.split(","):
        logical, sep, physical = item.partition("=")
        if not sep or not logical.strip() or not physical.strip():
            raise NetError(f"cannot read `{item}`", where="--devices", hint="write gpu0=cuda:0,gpu1=cuda:1")
        mapping[logical.strip()] = physical.strip()
    return mapping


def read_inputs(paths: list[Path], shape: tuple[int, ...]) -> np.ndarray:
    """Stacks .npy arrays of one image or a batch each into one float32 batch of `shape` images."""
    batches = []
    for path in paths:
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise NetError(f"no such file: {path}", where=str(path)) from None
        except (OSError, ValueError, EOFError) as error:
            raise NetError(
                f"{path} is not a .npy array ({error})", where=str(path), hint="save inputs with numpy.save"
            ) from None
        if array.dtype.kind not in "fiu":
            raise NetError(f"{path} holds {array.dtype} values, not numbers", where=str(path))
        if tuple(array.shape) == shape:
            array = array[None]
        if tuple(array.shape[1:]) != shape:
            want = " x ".join(map(str, shape))
            raise NetError(
                f"{path} has shape {' x '.join(map(str, array.shape))}, but the net takes {want} images",
                where=str(path),
                hint=f"one image of {want}, or a batch N x {want}",
            )
        batches.append(array.astype(np.float32))
    return np.concatenate(batches)


def run_command(path: Path, args: argparse.Namespace) -> int:
    import torch

    if args.backend == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the same kernels, interpreted on the CPU
    from netdsl.runtime import Net

    net = Net(
        path,
        backend=args.backend,
        devices=parse_devices(args.devices),
        weights=args.weights,
        seed=args.seed,
        init=args.init,
    )
    if len(net.input_shapes) != 1:
        raise NetError("`netdsl run` feeds nets with one input", where=str(path), hint="use netdsl.load from Python")
    (shape,) = net.input_shapes.values()
    if args.input:
        x = read_inputs(args.input, shape)
    else:
        generator = np.random.default_rng(args.seed)
        x = generator.standard_normal((args.random or 1, *shape), dtype=np.float32)
    start = time.perf_counter()
    y = net(torch.from_numpy(x))
    seconds = time.perf_counter() - start
    if isinstance(y, dict):
        name, y = next(iter(y.items()))
        print(f"output {name} (first of {len(net.output_steps)})")
    scores = y.float().reshape(y.shape[0], -1).cpu()
    k = min(args.top, scores.shape[1])
    values, indices = scores.topk(k, dim=1)
    for i in range(scores.shape[0]):
        ranked = ", ".join(f"{int(c)}: {float(v):.4f}" for v, c in zip(values[i], indices[i]))
        print(f"input {i}: top {k}: {ranked}")
    if args.save:
        _save(args.save, scores.numpy())
    if args.time:
        where = ", ".join(sorted({str(device) for device in net.devices.values()}))
        print(f"{scores.shape[0]} input(s) in {seconds * 1e3:.1f} ms on {where} ({args.backend} backend)")
    return 0


def _save(path: Path, array: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomic_bytes(path, buffer.getvalue())
