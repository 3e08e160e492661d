"""How fast does the training data loader decode and augment images? Generates a folder of JPEGs (two
classes), opens it with `netdsl.train.data.open_data` (one decoding pass that measures the mean and the
colour components), then times whole epochs of `loader(...)` with the paper's augmentation (shorter side
scaled, random crop, flip, PCA colour noise) for each number of worker processes.

    python bench/train_data.py                          # 256 JPEGs of 320 x 240, crop 227 from a side of 256
    python bench/train_data.py --workers 0,1,2,4        # other worker counts
    python bench/train_data.py --folder DIR             # an image folder of your own (DIR/<class>/*.jpg)

Images/s counts decoded and augmented images handed out as float32 batches, start-up of the workers
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

from arguments import joined, non_negative_ints, positive_int  # noqa: E402

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


def measure(folder: Path, args: argparse.Namespace) -> list[list[str]]:
    workers = args.workers
    start = time.perf_counter()
    split = open_data(folder, (3, args.crop, args.crop), size=args.size, val_fraction=0.0, workers=max(workers))
    scan = time.perf_counter() - start
    count = len(split.train)
    rows = [["open_data scan", str(max(workers)), str(count), f"{scan:.2f}", f"{count / scan:,.0f}", ""]]
    for worker_count in workers:
        best = float("inf")
        for epoch in range(args.epochs):
            start = time.perf_counter()
            batches = loader(
                split.train, batch=args.batch, seed=0, epoch=epoch, augment=split.augment, workers=worker_count
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
    args = parser.parse_args(argv)

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
            f"random {args.crop} x {args.crop} crops, flips, PCA colour noise; batch {args.batch}"
        )
        with tempfile.TemporaryDirectory() as temporary:
            make_jpegs(Path(temporary), args.images, args.width, args.height, seed=0)
            rows = measure(Path(temporary), args)
    header = ["pass", "workers", "images", "seconds", "images/s", "images/s/worker"]
    print("\n".join(format_table(header, rows, left={0})))
    print(
        f"reproduce: python bench/train_data.py {source} --size {args.size} --crop {args.crop} "
        f"--batch {args.batch} --workers {joined(args.workers)} --epochs {args.epochs}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
