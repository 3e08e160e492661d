"""How fast does the training data loader decode and augment images? Generates a folder of JPEGs (two
classes), opens it with `netdsl.train.data.open_data` (one decoding pass that measures the mean and the
colour components), then times whole epochs of `loader(...)` with the paper's augmentation (shorter side
scaled, random crop, flip, PCA colour noise) for each number of worker processes; `--augment jitter` scales
each image to a side drawn from --size to twice it (VGG's scale jittering), `--augment inception` cuts
random-resized crops of 8-100% of the image as stored, `--augment darknet` adds Darknet's colour jitter and
rotation to the paper's (saturation 1.5, exposure 1.5, hue 0.1, angle 7: its classifiers' settings).

    python bench/train_data.py                          # 256 JPEGs of 320 x 240, crop 227 from a side of 256
    python bench/train_data.py --workers 0,1,2,4        # other worker counts
    python bench/train_data.py --folder DIR             # an image folder of your own (DIR/<class>/*.jpg)
    python bench/train_data.py --processes 1,2          # the first pass shared by torchrun's processes (gloo)
    python bench/train_data.py --augment inception      # random-resized crops instead of the paper's

`--processes N` times the first pass as N processes of a torchrun launch share it (each decodes every Nth
batch; started here with torchrun's environment, on 127.0.0.1, gloo), from a barrier to the end of
open_data in rank 0. Images/s counts decoded and augmented images handed out as float32 batches, start-up of the workers
included (the loader starts them once per epoch); the best of --epochs epochs is reported. A training
step that takes longer per image than the loader is what keeps the loader from being the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

from arguments import joined, non_negative_ints, positive_int, positive_ints  # noqa: E402

from netdsl.tables import format_table  # noqa: E402
from netdsl.train.data import loader, open_data  # noqa: E402


def make_jpegs(folder: Path, count: int, width: int, height: int, seed: int) -> None:
    """`count` JPEGs in two class folders: smooth random colour fields with noise, as photos compress."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, (height, width, 3), dtype=np.int16)
        path = folder / f"class{index % 2}" / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def shared_scan(folder: Path, args: argparse.Namespace, processes: int) -> float:
    """Seconds of open_data's pass over `folder` shared by `processes` local gloo processes (rank 0's)."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        __file__,
        "--rank-of-scan",
        str(folder),
        "--size",
        str(args.size),
        "--crop",
        str(args.crop),
    ]
    procs = []
    for rank in range(processes):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=3600)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit(f"a process of the shared scan failed (exit {[proc.returncode for proc in procs]})")
    return float(outputs[0].split()[-1])


def rank_of_scan(folder: Path, args: argparse.Namespace) -> None:
    """One process of `shared_scan`: joins the group, waits for the others, then times the pass."""
    from netdsl.train.world import World

    world = World.from_environment()
    world.join(300)
    world.barrier()
    start = time.perf_counter()
    open_data(folder, (3, args.crop, args.crop), size=args.size, val_fraction=0.0, world=world)
    print(f"{time.perf_counter() - start:.6f}", flush=True)
    world.barrier()
    os._exit(0)  # as `netdsl train` ends under torchrun: the group's threads would abort the interpreter's exit


def measure(folder: Path, args: argparse.Namespace) -> list[list[str]]:
    workers = args.workers
    start = time.perf_counter()
    split = open_data(folder, (3, args.crop, args.crop), size=args.size, val_fraction=0.0, workers=max(workers))
    scan = time.perf_counter() - start
    kind = {"paper": {}, "jitter": {"sizes": (args.size, 2 * args.size)}, "inception": {"area": (0.08, 1.0)},
            "darknet": {"saturation": 1.5, "exposure": 1.5, "hue": 0.1, "angle": 7.0}}  # fmt: skip
    augment = replace(split.augment, **kind[args.augment])
    count = len(split.train)
    rows = [["open_data scan", str(max(workers)), str(count), f"{scan:.2f}", f"{count / scan:,.0f}", ""]]
    for processes in args.processes:
        if processes > 1:
            took = shared_scan(folder, args, processes)
            rate = f"{count / took / processes:,.0f}"
            rows.append([f"scan, {processes} processes", "0", str(count), f"{took:.2f}", f"{count / took:,.0f}", rate])
    for worker_count in workers:
        best = float("inf")
        for epoch in range(args.epochs):
            start = time.perf_counter()
            batches = loader(
                split.train, batch=args.batch, seed=0, epoch=epoch, augment=augment, workers=worker_count
            )
            seen = sum(len(y) for _, y in batches)
            best = min(best, time.perf_counter() - start)
            assert seen == count
        rate = count / best
        per_process = f"{rate / max(worker_count, 1):,.0f}"
        rows.append(["loader epoch", str(worker_count), str(count), f"{best:.2f}", f"{rate:,.0f}", per_process])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive_int, default=256, help="JPEGs to generate")
    parser.add_argument("--width", type=positive_int, default=320)
    parser.add_argument("--height", type=positive_int, default=240)
    parser.add_argument("--size", type=positive_int, default=256, help="the shorter side is scaled to this")
    parser.add_argument("--crop", type=positive_int, default=227, help="the net's input, square")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--workers", type=non_negative_ints, default=(0, 1, 2), help="comma-separated worker counts")
    parser.add_argument("--epochs", type=positive_int, default=2, help="epochs timed per worker count (best reported)")
    parser.add_argument("--folder", type=Path, help="an image folder to read instead of generated JPEGs")
    parser.add_argument(
        "--processes", type=positive_ints, default=(1,), help="comma-separated process counts sharing the first pass"
    )
    parser.add_argument(
        "--augment",
        choices=("paper", "jitter", "inception", "darknet"),
        default="paper",
        help="the crops: the paper's, VGG's scale jittering, or random-resized ones; or the paper's with Darknet's "
        "colour jitter and rotation (saturation 1.5, exposure 1.5, hue 0.1, angle 7)",
    )
    parser.add_argument("--rank-of-scan", type=Path, help=argparse.SUPPRESS)  # one process of --processes N
    args = parser.parse_args(argv)
    if args.rank_of_scan:
        rank_of_scan(args.rank_of_scan, args)

    print(
        f"# training data loader: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    if args.folder:
        source = f"--folder {shlex.quote(str(args.folder))}"
        rows = measure(args.folder, args)
    else:
        source = f"--images {args.images} --width {args.width} --height {args.height}"
        print(
            f"# {args.images} generated JPEGs of {args.width} x {args.height}, shorter side to {args.size}, "
            f"random {args.crop} x {args.crop} crops ({args.augment}), flips, PCA colour noise; batch {args.batch}"
        )
        with tempfile.TemporaryDirectory() as temporary:
            make_jpegs(Path(temporary), args.images, args.width, args.height, seed=0)
            rows = measure(Path(temporary), args)
    header = ["pass", "workers", "images", "seconds", "images/s", "images/s/worker or process"]
    print("\n".join(format_table(header, rows, left={0})))
    print(
        f"reproduce: python bench/train_data.py {source} --size {args.size} --crop {args.crop} "
        f"--batch {args.batch} --workers {joined(args.workers)} --epochs {args.epochs} "
        f"--processes {joined(args.processes)} --augment {args.augment}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
