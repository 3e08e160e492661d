"""`netdsl filters`: a trained net's first-layer filters as a picture, as the AlexNet paper's Figure 3 shows the 96
kernels its conv1 learned (the 48 of one GPU above the 48 of the other: the towers specialise, one colour-blind,
the other colour-specific). Any conv whose filters read 1 (gray) or 3 (RGB) channels can be drawn."""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np

from netdsl.cli.flags import png_output, require_weights
from netdsl.errors import NetError, did_you_mean
from netdsl.files import write_atomic_bytes

HELP = "draw a trained net's first-layer filters as a PNG (a block per tower, as the AlexNet paper's Figure 3)"
TILE = 48  # about this many pixels a side per filter, unless --zoom says otherwise
COLUMNS = 16
BACKGROUND = 255  # white between the tiles
LARGEST = 89_478_485  # pixels: Pillow's bound on the images it opens without a warning of a decompression bomb


def add_command(commands, positive) -> None:
    sub = commands.add_parser("filters", help=HELP, description=HELP)
    sub.add_argument("net", nargs="?", type=Path, help="a .net file or an .onnx model (default: the bundled net)")
    sub.add_argument("--weights", type=Path, metavar="W", help="trained weights or a run folder (ONNX: the model's)")
    sub.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.png", help="the picture to write")
    sub.add_argument(
        "--layer",
        metavar="NAME",
        help="the conv to draw, by name (a tower's name draws every tower's copy); default: the convs that read "
        "the net's input",
    )
    sub.add_argument("--columns", type=positive, default=COLUMNS, metavar="N", help="filters per row (default 16)")
    sub.add_argument("--zoom", type=positive, metavar="N", help=f"pixels per weight (default: tiles of about {TILE})")
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def filters_command(path: Path, args: argparse.Namespace) -> int:
    from netdsl.lang.frontend import load_graph
    from netdsl.runtime.weights import load_weights
    from netdsl.train.runs import weights_file

    require_weights(args.weights, "filters draws trained weights")
    weights_path = weights_file(args.weights)
    png_output(args.output, [path, getattr(args, "given", None), weights_path])
    graph = load_graph(path)
    chosen = chosen_convs(graph, args.layer)
    weights = load_weights(weights_path, graph)
    kernels = [weights[f"{name}.weight"] for name in chosen]
    write_png(args.output, filter_picture(kernels, args.columns, args.zoom))
    count, channels, height, width = sum(len(kernel) for kernel in kernels), *kernels[0].shape[1:]
    print(f"wrote {args.output}: {count} filters of {', '.join(chosen)} ({height} x {width} x {channels})")
    return 0


def chosen_convs(graph, layer: str | None) -> list[str]:
    """The convs to draw: `layer` (a conv's name, or a towers block's name for all its copies), or by default
    those that read the net's input; each with filters over 1 or 3 channels, all of one shape."""
    from netdsl.ir import layers
    from netdsl.runtime.weights import base_name, weight_specs

    convs = [item for item in layers(graph) if item.op == "conv"]
    if layer is None:
        inputs = set(graph.graph["inputs"])
        chosen = [item for item in convs if set(item.inputs) & inputs]
        if not chosen:
            raise NetError("no conv reads the net's input", where="--layer", hint="name the conv to draw: --layer NAME")
    else:
        chosen = [item for item in layers(graph) if layer in (item.name, base_name(item.name))]
        if not chosen:
            hint = did_you_mean(layer, [base_name(item.name) for item in convs]) or "name a conv of the net"
            raise NetError(f"the net has no layer `{layer}`", where="--layer", hint=hint)
        if any(item.op != "conv" for item in chosen):
            raise NetError(f"`{layer}` is a {chosen[0].op} layer, not a conv", where="--layer",
                           hint="filters are a conv's weights: name a conv")  # fmt: skip
    specs = weight_specs(graph)
    shapes = {specs[f"{item.name}.weight"][1:] for item in chosen}  # channels x kh x kw
    channels = next(iter(shapes))[0]
    if channels not in (1, 3):
        raise NetError(
            f"the filters of `{chosen[0].name}` read {channels} channels; a picture shows 1 (gray) or 3 (RGB)",
            where="--layer",
            hint="draw a conv that reads the image (the default)",
        )
    if len(shapes) > 1:
        raise NetError("the convs chosen have filters of different shapes", where="--layer", hint="name one conv")
    return [item.name for item in chosen]


def filter_picture(kernels: list[np.ndarray], columns: int = COLUMNS, zoom: int | None = None) -> np.ndarray:
    """The filters of one or more convs as one picture: H x W uint8 for filters over 1 channel, H x W x 3 over
    3. Each conv's filters (out x C x kh x kw) fill rows of `columns` tiles, one block per conv, the blocks one
    below another half a tile apart (the paper's figure: one GPU's kernels above the other's). Each filter is
    scaled to its own range (its lowest weight black, its highest white; a constant one mid-gray) and each
    weight drawn `zoom` pixels a side (default: tiles of about TILE pixels), a pixel of white around every tile."""
    _, channels, height, width = kernels[0].shape
    zoom = zoom or max(1, round(TILE / max(height, width)))
    tile_h, tile_w = height * zoom, width * zoom
    columns = min(columns, max(len(kernel) for kernel in kernels))
    rows = sum(math.ceil(len(kernel) / columns) for kernel in kernels)
    size = (rows * (tile_h + 1) + len(kernels) + (len(kernels) - 1) * (tile_h // 2), columns * (tile_w + 1) + 1)
    if size[0] * size[1] > LARGEST:
        raise NetError(
            f"the picture would be {size[1]:,} x {size[0]:,} pixels, more than image viewers open ({LARGEST:,})",
            where="--zoom",
            hint="a smaller --zoom (the default gives tiles of about 48 pixels), or fewer --columns",
        )
    blocks = []
    for kernel in kernels:
        rows = math.ceil(len(kernel) / columns)
        block = np.full((rows * (tile_h + 1) + 1, columns * (tile_w + 1) + 1, channels), BACKGROUND, np.uint8)
        for number, weights in enumerate(kernel):
            pixels = tile_pixels(weights, zoom)
            top, left = 1 + (number // columns) * (tile_h + 1), 1 + (number % columns) * (tile_w + 1)
            block[top : top + tile_h, left : left + tile_w] = pixels
        blocks.append(block)
    space = np.full((tile_h // 2, blocks[0].shape[1], channels), BACKGROUND, np.uint8)
    picture = np.concatenate([part for block in blocks for part in (block, space)][:-1])
    return picture[:, :, 0] if channels == 1 else picture


def tile_pixels(values: np.ndarray, zoom: int) -> np.ndarray:
    """C x h x w values as (h * zoom) x (w * zoom) x C pixels, scaled to their own range: the lowest black, the
    highest white, all alike mid-gray."""
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    scaled = np.full(values.shape, 0.5) if high == low else (values - low) / (high - low)
    pixels = np.round(scaled * 255).astype(np.uint8).transpose(1, 2, 0)
    return pixels.repeat(zoom, axis=0).repeat(zoom, axis=1)


def write_png(path: Path, picture: np.ndarray) -> None:
    """An H x W (gray) or H x W x 3 (RGB) uint8 picture written as a PNG file, whole or not at all."""
    from netdsl.train.augment import import_pillow

    buffer = io.BytesIO()
    import_pillow().fromarray(picture, "L" if picture.ndim == 2 else "RGB").save(buffer, format="PNG")
    write_atomic_bytes(path, buffer.getvalue())
