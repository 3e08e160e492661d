"""`netdsl neighbours`: the training images a trained net finds nearest to each query image in one of its
layers, as the AlexNet paper's Figure 4 (right) shows for its last hidden layer: images of the query's class
that are far from it pixel by pixel. The queries are image files (--input) or the first validation images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from netdsl.cli.flags import png_output, require_weights, seed_number
from netdsl.errors import NetError
from netdsl.tables import format_table

HELP = "find the training images nearest to each query in a layer's values (the AlexNet paper's Figure 4)"
QUERIES = 5  # the paper's figure: five test images
COUNT = 6  # and the six training images nearest to each
TILE = 64  # about this many pixels a side per image in the picture, or the image's own size when larger
GAP = 8  # pixels between a query and its neighbours


def add_command(commands, positive) -> None:
    sub = commands.add_parser("neighbours", help=HELP, description=HELP)
    sub.add_argument("net", nargs="?", type=Path, help="a .net file or an .onnx model (default: the bundled net)")
    sub.add_argument("--weights", type=Path, metavar="W", help="trained weights or a run folder (ONNX: the model's)")
    sub.add_argument(
        "--data", required=True, metavar="DIR|LIST.txt|FILE.npz|digits",
        help="the images, whose training ones are searched",
    )
    sub.add_argument(
        "--input", type=Path, nargs="+", metavar="IMAGE",
        help="the query images, folders of them or image lists (LIST.txt) (default: the first --queries validation "
        "images of --data)",
    )  # fmt: skip
    sub.add_argument(
        "--queries", type=positive, metavar="N", help=f"without --input: how many validation images (default {QUERIES})"
    )
    sub.add_argument(
        "--layer", metavar="NAME",
        help="the layer whose values are compared (a chain's or towers' name: its last layer in each tower; the "
        "input's name: the pixels); default: the input of the last conv or fc layer, the last hidden layer",
    )  # fmt: skip
    sub.add_argument(
        "-k", "--count", type=positive, default=COUNT, metavar="K", help=f"neighbours per query (default {COUNT})"
    )
    sub.add_argument("-o", "--output", type=Path, metavar="OUT.png", help="draw each query and its neighbours in a row")
    sub.add_argument("--batch", type=positive, default=64, metavar="N", help="images per forward pass")
    sub.add_argument("--backend", choices=("torch", "triton"), default="torch", help="PyTorch ops or the kernels")
    sub.add_argument("--devices", metavar="MAP", help="logical devices to torch devices")
    sub.add_argument(
        "--val-fraction", type=float, default=None, metavar="X", help="as in training (default: the run's)"
    )
    sub.add_argument("--seed", type=seed_number, default=None, help="the split's seed (default: the run's)")
    sub.add_argument("--workers", type=int, default=0, metavar="N", help="data loading processes")
    sub.add_argument(
        "--skip-corrupt", action=argparse.BooleanOptionalAction, default=None,
        help="skip (and count) images that cannot be decoded, instead of stopping (default: the run's)",
    )  # fmt: skip
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def neighbours_command(path: Path, args: argparse.Namespace) -> int:
    import torch

    from netdsl.cli.filters import write_png
    from netdsl.cli.run import input_files, require_images
    from netdsl.cli.train import Member, run_folder, split_settings
    from netdsl.lang.frontend import load_graph
    from netdsl.runtime.devices import parse_devices
    from netdsl.train.data import ImageFiles, check_workers, open_data
    from netdsl.train.evaluate import class_name, probabilities, scaled_images
    from netdsl.train.features import Features, Nearest, feature_layers
    from netdsl.train.progress import Meter
    from netdsl.train.runs import RunFolder, weights_file
    from netdsl.train.world import World

    require_weights(args.weights, "neighbours compares what trained weights compute")
    args.input = input_files(args.input)
    if args.input is not None:
        require_images(args.input, "--input")
        if args.queries is not None:
            raise NetError("--queries counts validation images, and --input names the queries", where="--queries",
                           hint="leave out --queries, or --input")  # fmt: skip
    weights_path = weights_file(args.weights)
    if args.output is not None:
        read = [path, getattr(args, "given", None), weights_path, Path(args.data), *(args.input or [])]
        png_output(args.output, read)  # before the search
    if args.backend == "triton" and not torch.cuda.is_available():
        from netdsl.codegen.interpret import use_interpreter

        use_interpreter()  # the same kernels, interpreted on the CPU
    check_workers(args.workers)
    graph = load_graph(path)
    names = feature_layers(graph, args.layer)  # a layer the net lacks: said before any image is read
    model = Member.load(path, graph, weights_path, str(args.weights))
    fraction, seed, skip = split_settings(args, model)
    world = World()
    split = open_data(
        args.data, model.shape, num_outputs=model.classes, val_fraction=fraction, seed=seed, skip_corrupt=skip,
        workers=args.workers, size=None if model.own is None else model.own.size,
        scan_record=RunFolder(run_folder(model.path)).read_scan(), world=world, statistics=model.own is None,
        check=("train",) if args.input else ("train", "val"),
        meter=lambda _, images: Meter(sys.stderr, images, "reading the images", world),
    )  # fmt: skip
    preprocess = model.own or split.preprocess
    if model.own is None:
        print(f"note: {model.path} carries no preprocessing; using the data's own mean", file=sys.stderr)
    searched = split.train
    if searched is None or not len(searched):
        raise NetError("the data has no training images to search", where="--data", hint="lower --val-fraction")
    searched.preprocess = preprocess
    if args.input:  # files named on the command line
        part = ImageFiles(args.input, np.zeros(len(args.input), dtype=np.int64), preprocess)
        part.unreadable_hint = None  # the decoder's own: there is no --skip-corrupt for them
        classes = [None] * len(part)
    else:  # validation images
        if split.val is None or not len(split.val):
            raise NetError("the data has no validation images to ask about", where="--data",
                           hint="name the query images with --input")  # fmt: skip
        part = split.val.subset(np.arange(min(args.queries or QUERIES, len(split.val))))
        part.preprocess = preprocess
        classes = [split.classes[label] for label in part.labels]
    # the queries are read a batch at a time, and again for the picture
    batches = (x.flatten(0, 2) for x in scaled_images(part, (preprocess.size,), 1, args.batch, args.workers))
    sources = [part.source(index) for index in range(len(part))]
    if args.output is not None:  # before the search: a picture that cannot be drawn
        picture_size(len(sources), 1 + min(args.count, len(searched)), model.shape)
    features = Features(graph, model.weights, names, parse_devices(args.devices), args.backend)
    computed = [features(x) for x in batches]  # (features, the net's output) of each batch of queries
    asked = torch.cat([values for values, _ in computed])
    scores = None if computed[0][1] is None else torch.cat([output for _, output in computed])
    nearest = Nearest(asked, args.count)
    meter = Meter(sys.stderr, len(searched), "searching", world)
    for x in scaled_images(searched, (preprocess.size,), 1, args.batch, args.workers):
        nearest.add(features(x.flatten(0, 2))[0])
        meter.advance(len(x))
    meter.close()
    if split.skipped:
        print(f"skipped {len(split.skipped)} unreadable images (first: {split.skipped[0]})", file=sys.stderr)
    trained = list(model.own.classes) if model.own is not None and model.own.classes else list(split.classes)
    predicted = None
    if scores is not None and scores.ndim == 2 and scores.shape[1] == model.classes:
        last = graph.nodes[features.output]["layer"]
        predicted = probabilities(scores, last.op == "softmax")
    print(
        f"the {min(args.count, len(searched))} training images of {len(searched):,} nearest to each query by "
        f"{', '.join(names)} ({features.size:,} values; Euclidean distance)"
    )
    same = 0
    for number, (source, label) in enumerate(zip(sources, classes, strict=True)):
        heading = f"query {number + 1}: {source}" + ("" if label is None else f" (class {label})")
        if predicted is not None:
            best = int(predicted[number].argmax())
            heading += f", predicted {class_name(trained, best)} ({float(predicted[number, best]):.3f})"
        rows = []
        for rank, (index, distance) in enumerate(zip(nearest.indices[number], nearest.distances[number]), 1):
            found = split.classes[searched.labels[int(index)]]
            same += found == label
            rows.append((str(rank), searched.source(int(index)), found, f"{float(distance):.3f}"))
        print("\n" + heading)
        print("\n".join(format_table(("rank", "image", "class", "distance"), rows, left={1, 2})))
    if classes[0] is not None:
        found = nearest.indices.numel()
        print(f"\nneighbours of the query's class: {same:,} of {found:,} ({100 * same / found:.1f}%)")
    if args.output is not None:
        rows = [[part[number][0]] + [searched[int(index)][0] for index in nearest.indices[number]]
                for number in range(len(sources))]  # fmt: skip
        write_png(args.output, neighbour_picture(rows))
        print(f"wrote {args.output}: each query, then its neighbours nearest first")
    return 0


def neighbour_picture(rows: list[list[np.ndarray]], zoom: int | None = None) -> np.ndarray:
    """Images (C x H x W, prepared for the net) in rows, a query then its neighbours, as one picture: H x W
    uint8 for 1 channel, H x W x 3 for 3. Each image is scaled to its own range (its lowest value black, its
    highest white: what the net was given, without its mean), drawn `zoom` pixels a value (default: about TILE
    pixels a side), a pixel of white around each and GAP pixels between a query and its neighbours."""
    from netdsl.cli.filters import BACKGROUND, tile_pixels

    channels, height, width = rows[0][0].shape
    zoom = zoom or max(1, round(TILE / max(height, width)))
    tile_h, tile_w = height * zoom, width * zoom
    size = picture_size(len(rows), max(len(row) for row in rows), rows[0][0].shape, zoom)
    picture = np.full((*size, channels), BACKGROUND, np.uint8)
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            pixels = tile_pixels(image, zoom)
            top = 1 + row * (tile_h + 1)
            left = 1 + column * (tile_w + 1) + (GAP if column else 0)
            picture[top : top + tile_h, left : left + tile_w] = pixels
    return picture[:, :, 0] if channels == 1 else picture


def picture_size(rows: int, columns: int, shape: tuple[int, ...], zoom: int | None = None) -> tuple[int, int]:
    """The height and width of `neighbour_picture`'s picture of `rows` rows of `columns` images of `shape` (C x H x
    W); NetError on --output where such images cannot be drawn, or where the picture would be too large to open."""
    from netdsl.cli.filters import LARGEST

    channels, height, width = shape
    if channels not in (1, 3):
        raise NetError(f"images of {channels} channels cannot be drawn", where="--output",
                       hint="a picture shows 1 (gray) or 3 (RGB) channels; leave out --output")  # fmt: skip
    zoom = zoom or max(1, round(TILE / max(height, width)))
    size = (rows * (height * zoom + 1) + 1, columns * (width * zoom + 1) + 1 + GAP)
    if size[0] * size[1] > LARGEST:
        raise NetError(
            f"the picture would be {size[1]:,} x {size[0]:,} pixels, more than image viewers open ({LARGEST:,})",
            where="--output",
            hint="fewer queries or neighbours (--queries, --count), or leave out --output",
        )
    return size
