"""AlexNet's convolutions, one tower each: netdsl's conv kernel under several tile configurations, and
its channels-last variant (codegen/conv_nhwc.py), against cuDNN, on a GPU. What the next change to the
conv kernels should be measured with.

    python bench/conv_sweep.py [--batch 128] [--dtypes bf16,tf32] [--layers conv1,conv2,...] [--configs all]

For each layer and dtype: cuDNN's time (F.conv2d + bias + ReLU, TF32 allowed only for tf32) on NCHW
and on channels-last tensors, then each configuration's time for `conv.py` on NCHW and, where the layer
has 16 input channels or more, for `conv_nhwc.py` on channels-last maps and weights (the layout change is
not timed) (triton.testing.do_bench, median), its TFLOP/s, and whether its output matches
cuDNN's (relative error over the largest |output|; a mismatch is printed, not timed as a win). The
configuration `pick_config` chooses today is marked `*`. One table per dtype at the end.

For conv1 (3 input channels, stride 4) it also times `conv_nhwc.py` on the space-to-depth rewrite of
the layer (a 3 x 3 stride-1 conv over 48 channels of 4 x 4 pixel blocks: the compiler's `space_to_depth`
pass, `--space-to-depth`), and, apart, the transform kernel that rearranges the input on every run
(codegen/space_to_depth.py): what the compiler gains by lowering such convs so. `--dtypes tf32x3` times
fp32 with three TF32 products against cuDNN's exact fp32.

`--smoke` runs the same code on the CPU under Triton's interpreter at a tiny size, batch 1, one tile (no
timing meaning; `--batch` and `--configs` are refused with it): tests/test_bench.py uses it to keep this
script working between GPU leases. Without a GPU (and without `--smoke`) it says so and exits with status 4.
"""

from __future__ import annotations

import argparse
import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from arguments import positive_int, settle_smoke  # noqa: E402
from timing import NO_GPU, announce_device, timer  # noqa: E402

from netdsl.codegen.conv import TUNING_TILES  # noqa: E402

# name: (input channels, output channels, kernel, stride, padding, input size) of one tower
LAYERS = {
    "conv1": (3, 48, 11, 4, 0, 227),
    "conv2": (48, 128, 5, 1, 2, 27),
    "conv3": (256, 192, 3, 1, 1, 13),
    "conv4": (192, 192, 3, 1, 1, 13),
    "conv5": (192, 128, 3, 1, 1, 13),
}
PRECISIONS = {
    "fp32": (torch.float32, "ieee"), "tf32": (torch.float32, "tf32"), "tf32x3": (torch.float32, "tf32x3"),
    "bf16": (torch.bfloat16, "ieee"),
}  # fmt: skip
CONFIGS = [dict(tile) for tile in TUNING_TILES]  # the tiles `netdsl tune` times too
TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "tf32x3": 1e-4, "bf16": 2e-2}


def label(config: dict) -> str:
    return (
        f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']} "
        f"w{config['num_warps']} s{config['num_stages']}"
    )


def space_to_depth(x: torch.Tensor, weight: torch.Tensor, stride: int, pad: int):
    """A stride-s convolution as the compiler's `space_to_depth` pass lowers it: the input cut into blocks of
    s x s pixels by netdsl's transform kernel (channels-last), the filter rearranged to match (both
    netdsl.codegen.space_to_depth). conv1: 3 x 227 x 227 -> 48 x 57 x 57, 11 x 11 / 4 -> 3 x 3 / 1 over 48
    channels, the same 55 x 55 outputs (19% more multiply-adds for the zero taps). Returns the rearranged
    input and filter, and the input's transform alone, to time it."""
    from netdsl.codegen.space_to_depth import space_to_depth as blocks_of
    from netdsl.codegen.space_to_depth import space_to_depth_weight
    from netdsl.compiler.space_to_depth import space_to_depth_geometry

    geometry = space_to_depth_geometry(tuple(x.shape[1:]), weight.shape[-2:], (stride, stride), (pad,) * 4)

    def transform() -> torch.Tensor:
        return blocks_of(x, geometry.block, geometry.pad, 1, geometry.size)

    filters = space_to_depth_weight(weight, geometry.block).contiguous(memory_format=torch.channels_last)
    return transform(), filters, transform


def sweep(layer: str, shape: tuple, name: str, batch: int, device: str, configs: list[dict], measure, generator):
    """The rows of one layer in one precision: cuDNN's, then one per configuration."""
    from netdsl.codegen import conv_nhwc
    from netdsl.codegen.conv import conv2d, pick_config
    from netdsl.codegen.tile_rules import exact_fp32

    dtype, precision = PRECISIONS[name]
    c_in, c_out, size, stride, pad, side = shape
    x = torch.randn(batch, c_in, side, side, generator=generator).to(device, dtype)
    w = torch.randn(c_out, c_in, size, size, generator=generator) * (c_in * size * size) ** -0.5
    w = w.to(device, dtype)
    b = torch.randn(c_out, generator=generator).to(device, dtype)

    def cudnn():
        return F.relu(F.conv2d(x, w, b, stride=stride, padding=pad))

    want = cudnn().float()
    out_side = want.shape[-1]
    flops = 2 * batch * c_out * out_side * out_side * c_in * size * size
    x_last, w_last = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))

    def cudnn_last():
        return F.relu(F.conv2d(x_last, w_last, b, stride=stride, padding=pad))

    cudnn_ms = measure(cudnn)
    last_ms = measure(cudnn_last)
    rows = [
        (layer, "cuDNN", f"{cudnn_ms:.3f}", f"{flops / cudnn_ms / 1e9:.1f}", "", ""),
        (layer, "cuDNN channels-last", f"{last_ms:.3f}", f"{flops / last_ms / 1e9:.1f}", "", ""),
    ]
    cudnn_ms = min(cudnn_ms, last_ms)  # the ratio is to cuDNN's better layout
    today = pick_config(batch * out_side * out_side, c_out, exact=exact_fp32(dtype, precision))
    variants = [("", config) for config in configs]
    if c_in >= 16:
        variants += [("nhwc ", config) for config in configs]
    elif stride > 1 and c_in * stride * stride >= 16:  # conv1: as a stride-1 conv over blocks of pixels
        x_blocks, w_blocks, transform = space_to_depth(x, w, stride, pad)
        transform_ms = measure(transform)
        rows.append((layer, "s2d input transform (netdsl kernel)", f"{transform_ms:.3f}", "", "", ""))
        print("\t".join(rows[-1]), flush=True)
        variants += [("s2d ", config) for config in configs]
    for variant, config in variants:

        def ours(config=config, variant=variant):
            if variant == "s2d ":  # the transformed input and weight are made once, not timed
                return conv_nhwc.conv2d_nhwc(x_blocks, w_blocks, b, activation="relu", input_precision=precision,
                                             config=config)  # fmt: skip
            if variant:
                return conv_nhwc.conv2d_nhwc(x_last, w_last, b, stride, pad, activation="relu",
                                             input_precision=precision, config=config)  # fmt: skip
            return conv2d(x, w, b, stride, pad, activation="relu", input_precision=precision, config=config)

        try:
            got = ours().float()
        except Exception as error:  # e.g. out of shared memory for this tile
            rows.append((layer, variant + label(config), "-", "-", type(error).__name__, ""))
            continue
        error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        ok = error <= TOLERANCE[name]
        ms = measure(ours) if ok else float("nan")
        mark = "*" if not variant and {k: config[k] for k in today} == today else ""
        rows.append((layer, variant + label(config) + mark, f"{ms:.3f}", f"{flops / ms / 1e9:.1f}",
                     f"{error:.1e}" + ("" if ok else " WRONG"), f"{cudnn_ms / ms:.2f}"))  # fmt: skip
        print("\t".join(map(str, rows[-1])), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, help="images per conv (default 128)")
    parser.add_argument("--dtypes", default="bf16,tf32")
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--configs", help="`all` (the default), or indices into CONFIGS: 0,3,4")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (interpreter): no timing")
    args = parser.parse_args(argv)
    settle_smoke(parser, args, {"batch": 128, "configs": "all"}, "batch 1 and one tile")
    unknown = [d for d in args.dtypes.split(",") if d not in PRECISIONS]
    unknown += [layer for layer in args.layers.split(",") if layer not in LAYERS]
    if args.configs != "all":
        unknown += [i for i in args.configs.split(",") if not (i.isdigit() and int(i) < len(CONFIGS))]
    if unknown:  # before the GPU is looked for: a bad flag fails on any machine
        parser.error(f"unknown dtype, layer or config index: {', '.join(unknown)} (dtypes: {', '.join(PRECISIONS)}; "
                     f"layers: {', '.join(LAYERS)}; configs: 0 to {len(CONFIGS) - 1})")  # fmt: skip
    swept = f"--dtypes {args.dtypes} --layers {args.layers}"
    if args.smoke:  # what ran, exactly: --smoke sets the batch and the tile itself
        print(f"# python bench/conv_sweep.py {swept} --smoke")
    else:
        print(f"# python bench/conv_sweep.py --batch {args.batch} {swept} --configs {args.configs}")
    device = announce_device(args.smoke)
    if device is None:
        return NO_GPU

    from netdsl.tables import format_table

    batch = 1 if args.smoke else args.batch
    chosen = CONFIGS if args.configs == "all" else [CONFIGS[int(i)] for i in args.configs.split(",")]
    if args.smoke:  # one tile the interpreter runs in seconds
        chosen = [{**CONFIGS[0], "BLOCK_M": 512, "BLOCK_K": 128, "num_stages": 1}]
    measure = timer(args.smoke)
    tables: dict[str, list[tuple]] = {}
    generator = torch.Generator().manual_seed(0)
    for name in args.dtypes.split(","):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
        for layer in args.layers.split(","):
            shape = LAYERS[layer]
            if args.smoke:  # a few channels, a map just larger than the window
                c_in, c_out, size, stride, pad, side = shape
                shape = (min(c_in, 16), min(c_out, 16), size, stride, pad, min(side, 2 * size + 3))
            rows = sweep(layer, shape, name, batch, device, chosen, measure, generator)
            tables.setdefault(name, []).extend(rows)
    for name, rows in tables.items():
        print(f"\n{name}, batch {batch} (TFLOP/s counts 2 per multiply-add; x cuDNN > 1 is faster than cuDNN)")
        print("\n".join(format_table(("layer", "tile", "ms", "TFLOP/s", "error", "x cuDNN"), rows, left={0, 1})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
