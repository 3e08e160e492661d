"""AlexNet's fc and LRN + max-pool steps (one tower, as the compiler emits them) under several tile
configurations, against the configuration `pick_config` chooses today and against PyTorch, on a GPU.

    python bench/step_sweep.py [--batches 128,1] [--dtype bf16] [--steps fc6,fc7,fc8,norm1,norm2]

fc steps read their two inputs in place (fc6: both towers' 128 x 6 x 6 maps; fc7, fc8: both towers'
2048 units), as the generated kernels do; LRN + max-pool steps read and write channels-last maps, as
the plan lays them out. Each row: the tile, the median time (triton.testing.do_bench), the effective
bandwidth over the fewest bytes the step must move, the error against the chosen tile's output (the
chosen tile is tested against PyTorch in tests/), and the time relative to today's choice (marked
`*`; > 1 is faster). PyTorch's time for the same computation (cuBLAS F.linear on the concatenated
input; F.local_response_norm + F.max_pool2d) is the first row of each step.

`--smoke` runs the same code on the CPU under Triton's interpreter at a tiny size, batch 1, fp32, one tile
per step (no timing meaning; `--batches` and `--dtype` are refused with it): tests/test_bench.py keeps this
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
from arguments import joined, positive_ints, settle_smoke  # noqa: E402
from timing import NO_GPU, announce_device, timer  # noqa: E402

from netdsl.codegen.fc import TUNING_TILES as FC_TILES  # noqa: E402
from netdsl.codegen.lrn import TUNING_TILES as NORM_TILES  # noqa: E402

# fc: (inputs per image, units); norm: (channels, input side, pool size, pool stride)
FC = {"fc6": ([(128, 6, 6), (128, 6, 6)], 2048), "fc7": ([(2048,), (2048,)], 2048), "fc8": ([(2048,), (2048,)], 1000)}
NORM = {"norm1": (48, 55, 3, 2), "norm2": (128, 27, 3, 2)}
# --smoke: the same steps at sizes the interpreter runs in seconds
SMOKE_FC = {"fc6": ([(8, 3, 3), (8, 3, 3)], 24), "fc7": ([(40,), (24,)], 20), "fc8": ([(40,), (24,)], 10)}
SMOKE_NORM = {"norm1": (12, 9, 3, 2), "norm2": (20, 7, 3, 2)}
FC_CONFIGS = [dict(tile) for tile in FC_TILES]  # the tiles `netdsl tune` times too
NORM_CONFIGS = [dict(tile) for tile in NORM_TILES]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def label(config: dict) -> str:
    if "BLOCK_M" in config:
        tile = f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']} s{config['num_stages']}"
    else:
        tile = f"{config['BLOCK_C']}c x {config['BLOCK_P']}p"
    return f"{tile} w{config['num_warps']}"


def rows_for(step: str, ours, torch_fn, configs, today: dict, moved: int, measure) -> list[tuple]:
    """cuBLAS/cuDNN's row, then one per configuration, checked against today's tile."""
    want = ours(None).float()
    scale = want.abs().max().clamp_min(1e-30)
    agreement = float((torch_fn().float() - want).abs().max() / scale)  # today's tile against PyTorch
    today_ms = measure(lambda: ours(None))
    theirs = measure(torch_fn)
    rows = [(step, "PyTorch", f"{theirs:.4f}", f"{moved / theirs / 1e6:.0f}", f"{agreement:.1e}",
             f"{today_ms / theirs:.2f}")]  # fmt: skip
    for config in configs:
        try:
            got = ours(config).float()
        except Exception as error:  # e.g. out of shared memory
            rows.append((step, label(config), "-", "-", type(error).__name__, ""))
            continue
        error = float((got - want).abs().max() / scale)
        ms = measure(lambda config=config: ours(config)) if error < 5e-2 else float("nan")
        mark = "*" if all(config.get(key) == value for key, value in today.items()) else ""
        rows.append((step, label(config) + mark, f"{ms:.4f}", f"{moved / ms / 1e6:.0f}", f"{error:.1e}",
                     f"{today_ms / ms:.2f}"))  # fmt: skip
        print("\t".join(rows[-1]), flush=True)
    return rows


def fc_rows(step: str, shape, configs, batch: int, dtype: torch.dtype, device: str, measure, generator) -> list[tuple]:
    from netdsl.codegen import fc

    shapes, units = shape
    inputs = [torch.randn(batch, *shape, generator=generator).to(device, dtype) for shape in shapes]
    features = sum(x[0].numel() for x in inputs)
    weight = (torch.randn(units, features, generator=generator) * features**-0.5).to(device, dtype)
    bias = torch.randn(units, generator=generator).to(device, dtype)
    out = torch.empty(batch, units, device=device, dtype=dtype)
    joined = torch.cat([x.flatten(1) for x in inputs], dim=1)

    def ours(config):
        return fc.linear(inputs, weight, bias, activation="relu", out=out, config=config)

    def theirs():
        return F.relu(F.linear(joined, weight, bias))

    moved = (weight.numel() + joined.numel() + out.numel()) * weight.element_size()
    today = fc.pick_config(batch, dtype, "ieee", joined.shape[1])
    return rows_for(step, ours, theirs, configs, today, moved, measure)


def norm_rows(
    step: str, shape, configs, batch: int, dtype: torch.dtype, device: str, measure, generator
) -> list[tuple]:
    from netdsl.codegen import lrn
    from netdsl.codegen.layouts import to_layout

    channels, side, pool, stride = shape
    x = to_layout(torch.randn(batch, channels, side, side, generator=generator).to(device, dtype), "nhwc")
    pooled = (side - pool) // stride + 1
    out = to_layout(torch.empty(batch, channels, pooled, pooled, device=device, dtype=dtype), "nhwc")

    def ours(config):
        return lrn.lrn_maxpool(x, 5, 1e-4, 0.75, 2.0, pool, stride, out=out, config=config)

    def theirs():  # PyTorch divides alpha by the window: 5e-4 / 5 is the paper's 1e-4
        return F.max_pool2d(F.local_response_norm(x, 5, alpha=5e-4, beta=0.75, k=2.0), pool, stride)

    moved = (x.numel() + out.numel()) * x.element_size()
    today = lrn.pick_config(batch, channels, pooled * pooled, channels_last=True)
    return rows_for(step, ours, theirs, configs, today, moved, measure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=positive_ints, help="comma-separated (default 128,1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16")
    parser.add_argument("--steps", default=",".join([*FC, *NORM]))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (interpreter): no timing")
    args = parser.parse_args(argv)
    settle_smoke(parser, args, {"batches": (128, 1), "dtype": "bf16"}, "batch 1 and fp32")
    unknown = [step for step in args.steps.split(",") if step not in {**FC, **NORM}]
    if unknown:  # before the GPU is looked for: a bad flag fails on any machine
        parser.error(f"unknown step: {', '.join(unknown)} (steps: {', '.join([*FC, *NORM])})")
    if args.smoke:  # what ran, exactly: --smoke sets the batch and the dtype itself
        print(f"# python bench/step_sweep.py --steps {args.steps} --smoke")
    else:
        print(
            f"# python bench/step_sweep.py --batches {joined(args.batches)} --dtype {args.dtype} --steps {args.steps}"
        )
    device = announce_device(args.smoke)
    if device is None:
        return NO_GPU

    from netdsl.tables import format_table

    measure = timer(args.smoke)
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    fc_shapes, norm_shapes, fc_configs, norm_configs = FC, NORM, FC_CONFIGS, NORM_CONFIGS
    if args.smoke:  # small steps, one configuration each, fp32 (PyTorch's LRN on the CPU)
        fc_shapes, norm_shapes, fc_configs, norm_configs = SMOKE_FC, SMOKE_NORM, FC_CONFIGS[:1], NORM_CONFIGS[2:3]
        dtype = torch.float32
    rows: list[tuple] = []
    for batch in (1,) if args.smoke else args.batches:
        for step in args.steps.split(","):
            if step in FC:
                made = fc_rows(step, fc_shapes[step], fc_configs, batch, dtype, device, measure, generator)
            else:
                made = norm_rows(step, norm_shapes[step], norm_configs, batch, dtype, device, measure, generator)
            rows += [(str(batch), *row) for row in made]
    name = next(key for key, value in DTYPES.items() if value == dtype)
    print(f"\n{name} (GB/s over the fewest bytes the step moves; x today > 1 is faster than today's tile)")
    header = ("batch", "step", "tile", "ms", "GB/s", "error", "x today")
    print("\n".join(format_table(header, rows, left={1, 2})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
