"""How fast is `netdsl eval --dense` over a folder of photos of mixed sizes? Times VGG's dense evaluation of
synthetic photos (random pixels, in the shapes cameras and data sets give: 4:3 both ways, 3:2, square) two
ways on the same `DenseScores`: one view at a time, as eval did before it grouped views, and eval's own pass
(`dense_probabilities`: views of one size together, as many to a pass as hold `--batch` net inputs' pixels).

    python bench/dense.py                                   # SimpleNet, 64 photos, scales 64,96
    python bench/dense.py --net alexnet --images 16 --scales 256 --batch 8

Each figure is the median of `--runs` in seconds; the speed-up is the one-at-a-time time over the grouped
pass's. Both give the same probabilities (the largest difference is printed). Where the photos' views come in
more sizes than `DenseScores.KEPT`, one at a time also rebuilds dense nets as the sizes take turns (as eval
did); the footer says how many sizes there were.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

from arguments import non_negative_int, positive_int, positive_ints  # noqa: E402

SHAPES = ((300, 400), (400, 300), (300, 450), (350, 350))  # H x W of the photos, in turn


def _net(text: str) -> str:
    bundled = sorted(path.stem for path in (ROOT / "nets").glob("*.net"))
    if text not in bundled:
        raise argparse.ArgumentTypeError(f"not a bundled net: {text!r} (bundled: {', '.join(bundled)})")
    return text


def photos(folder: Path, count: int, channels: int) -> list[Path]:
    """`count` PNG files of random pixels, their shapes taken from SHAPES in turn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for number in range(count):
        height, width = SHAPES[number % len(SHAPES)]
        pixels = rng.integers(0, 256, (height, width, channels) if channels == 3 else (height, width), dtype=np.uint8)
        paths.append(folder / f"{number}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", type=_net, default="simplenet", help="a bundled net (default simplenet)")
    parser.add_argument("--images", type=positive_int, default=64, help="photos (default 64)")
    parser.add_argument("--scales", type=positive_ints, default=(64, 96), help="shorter sides (default 64,96)")
    parser.add_argument("--batch", type=positive_int, default=64, help="net inputs' pixels a pass holds (default 64)")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="loading processes (default 0)")
    parser.add_argument("--runs", type=positive_int, default=3, help="runs of each (default 3); medians shown")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from netdsl.lang.frontend import load_graph
    from netdsl.runtime.weights import init_weights
    from netdsl.train.augment import Preprocess
    from netdsl.train.data import ImageFiles
    from netdsl.train.evaluate import DenseScores, dense_probabilities

    graph = load_graph(ROOT / "nets" / f"{args.net}.net")
    channels, *crop = graph.nodes[graph.graph["inputs"][0]]["layer"].shape
    if min(args.scales) < min(crop):
        parser.error(f"--scales: {args.net} reads {crop[0]} x {crop[1]}; scale photos to at least {min(crop)}")
    scales = ",".join(map(str, args.scales))
    print(f"# python bench/dense.py --net {args.net} --images {args.images} --scales {scales} --batch {args.batch} "
          f"--workers {args.workers} --runs {args.runs}")  # fmt: skip
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")  # fmt: skip
    preprocess = Preprocess(size=None, crop=tuple(crop), channels=channels, mean=(128.0,) * channels,
                            std=(64.0,) * channels, flip=True)  # fmt: skip
    scorer = DenseScores(graph, init_weights(graph, seed=0, scheme="he"), flip=True)
    with tempfile.TemporaryDirectory() as folder:
        samples = ImageFiles(photos(Path(folder), args.images, channels), np.zeros(args.images, dtype=np.int64),
                             preprocess)  # fmt: skip
        views = [dataclasses.replace(preprocess, size=size) for size in args.scales]

        def one_at_a_time() -> torch.Tensor:
            return torch.stack([
                torch.stack([scorer.scores(view.normalize(view.pixels(samples.image(i)))) for view in views]).mean(0)
                for i in range(len(samples))
            ])  # fmt: skip

        def grouped() -> torch.Tensor:
            return dense_probabilities(samples, args.scales, scorer, args.batch, args.workers)

        times: dict[str, list[float]] = {"one at a time": [], "grouped": []}
        results = {}
        for _ in range(args.runs + 1):  # the first of each untimed: the dense nets built, the files cached
            for name, fn in (("one at a time", one_at_a_time), ("grouped", grouped)):
                start = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - start)
        first = range(min(len(SHAPES), len(samples)))
        sizes = {view.pixels(samples.image(i)).shape[:2] for i in first for view in views}
    base, mine = (statistics.median(times[name][1:]) for name in ("one at a time", "grouped"))
    rows = [("one at a time", f"{base:.3f}", f"{args.images / base:.1f}", "1.00x"),
            ("grouped (eval --dense)", f"{mine:.3f}", f"{args.images / mine:.1f}", f"{base / mine:.2f}x")]  # fmt: skip
    header = ("pass", "seconds", "images/s", "speed-up")
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for line in (header, *rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    difference = float((results["one at a time"] - results["grouped"]).abs().max())
    print(f"largest difference in a probability: {difference:.2e}; photos of {len(SHAPES)} shapes "
          f"({', '.join(f'{h} x {w}' for h, w in SHAPES)}) at {len(args.scales)} scale(s), each with its mirror: "
          f"{len(sizes)} view sizes" + (f" (more than the {DenseScores.KEPT} dense nets kept: one at a time rebuilds "
          "them as the sizes take turns)" if len(sizes) > DenseScores.KEPT else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
