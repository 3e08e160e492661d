"""Max and average pooling kernels against PyTorch's pooling on fresh random inputs."""

import random

import pytest
import torch
from kernel_support import DEVICE, explicit_pool, onnx_length
from torch.nn.functional import avg_pool2d, max_pool2d

from netdsl.codegen.pool import global_avg_pool2d, pool2d, pooled_size

# Max pooling only moves values, so it is exact in every dtype; averages are summed in fp32 and rounded once.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 2e-3, "atol": 1e-4},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3},
}

# (size, stride, padding, ceil_mode): overlapping, non-overlapping, padded, ceil-mode and rectangular windows.
WINDOWS = [
    (3, 2, 0, False),
    (3, 2, 0, True),
    (2, 2, 0, False),
    (2, 2, 0, True),
    (3, 2, 1, False),
    (3, 2, 1, True),
    (3, 1, 1, False),
    (5, 3, 2, True),
    ((3, 2), (2, 1), (1, 0), True),
]


def random_input(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(DEVICE, dtype)


def reference(x, kind, size, stride, padding, ceil_mode, count_include_pad=True):
    """PyTorch pooling in fp32, rounded to the input's dtype."""
    if kind == "max":
        result = max_pool2d(x.float(), size, stride, padding, ceil_mode=ceil_mode)
    else:
        result = avg_pool2d(x.float(), size, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    return result.to(x.dtype)


@pytest.mark.parametrize(("size", "stride", "padding", "ceil_mode"), WINDOWS)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_matches_torch(kind, size, stride, padding, ceil_mode):
    x = random_input((2, 3, 11, 10), seed=1)
    got = pool2d(x, kind, size, stride, padding, ceil_mode)
    torch.testing.assert_close(got, reference(x, kind, size, stride, padding, ceil_mode), **TOLERANCES[x.dtype])


@pytest.mark.parametrize(("size", "stride", "padding", "ceil_mode"), [w for w in WINDOWS if w[2] != 0])
def test_avg_pool_excluding_padding(size, stride, padding, ceil_mode):
    x = random_input((1, 3, 9, 12), seed=2)
    got = pool2d(x, "avg", size, stride, padding, ceil_mode, count_include_pad=False)
    expected = reference(x, "avg", size, stride, padding, ceil_mode, count_include_pad=False)
    torch.testing.assert_close(got, expected, **TOLERANCES[x.dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_low_precision_dtypes(kind, dtype):
    x = random_input((2, 5, 13, 13), dtype, seed=3)
    got = pool2d(x, kind, 3, 2, 1, True)
    assert got.dtype == dtype
    expected = reference(x, kind, 3, 2, 1, True)
    if kind == "max":
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize(("block", "channels"), [(128, 1), (128, 48), (512, 50)])
def test_blocks_split_across_planes(block, channels):
    """Blocks of the flattened (n, c, oh, ow) index that straddle channel and image boundaries."""
    x = random_input((2, channels, 13, 13), seed=4)
    got = pool2d(x, "max", 3, 2, config={"BLOCK": block, "num_warps": 4})
    torch.testing.assert_close(got, reference(x, "max", 3, 2, 0, False), rtol=0, atol=0)


def test_max_pool_propagates_nan():
    x = random_input((1, 2, 7, 7), seed=9)
    x[0, 1, 2, 2] = float("nan")  # under 4 overlapping windows
    got = pool2d(x, "max", 3, 2)
    torch.testing.assert_close(got, reference(x, "max", 3, 2, 0, False), rtol=0, atol=0, equal_nan=True)
    assert got[0, 1].isnan().sum() == 4


def test_strided_input_and_output_slices():
    """One tower's channels of a two-tower tensor in, a channel slice of a concatenation buffer out."""
    both_towers = random_input((2, 8, 13, 13), seed=5)
    tower = both_towers[:, 4:]
    buffer = torch.full((2, 10, 6, 6), 7.0, device=DEVICE)
    got = pool2d(tower, "max", 3, 2, out=buffer[:, 3:7])
    torch.testing.assert_close(got, reference(tower, "max", 3, 2, 0, False), rtol=0, atol=0)
    torch.testing.assert_close(buffer[:, :3], torch.full((2, 3, 6, 6), 7.0, device=DEVICE))
    torch.testing.assert_close(buffer[:, 7:], torch.full((2, 3, 6, 6), 7.0, device=DEVICE))


def test_non_contiguous_spatial_strides():
    x = random_input((1, 3, 12, 9), seed=6).transpose(2, 3)
    got = pool2d(x, "avg", 2, 2, ceil_mode=True)
    torch.testing.assert_close(got, reference(x, "avg", 2, 2, 0, True), **TOLERANCES[x.dtype])


@pytest.mark.parametrize("shape", [(1, 3, 6, 6), (2, 50, 7, 5), (1, 128, 13, 13)])
def test_global_avg_pool(shape):
    x = random_input(shape, seed=7)
    got = global_avg_pool2d(x)
    torch.testing.assert_close(got, x.mean(dim=(2, 3), keepdim=True), **TOLERANCES[x.dtype])


def test_alexnet_pool5():
    """conv5's pool on one tower: 128 x 13 x 13 -> 6 x 6, max 3x3 stride 2."""
    x = random_input((1, 128, 13, 13), seed=8)
    got = pool2d(x, "max", 3, 2)
    assert got.shape == (1, 128, 6, 6)
    torch.testing.assert_close(got, reference(x, "max", 3, 2, 0, False), rtol=0, atol=0)


@pytest.mark.parametrize("size", range(1, 6))
@pytest.mark.parametrize("stride", range(1, 4))
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_output_size_rule_matches_torch(size, stride, ceil_mode):
    for length in range(size, 16):
        for padding in range(size // 2 + 1):
            expected = max_pool2d(
                torch.zeros(1, 1, 1, length), (1, size), (1, stride), (0, padding), ceil_mode=ceil_mode
            )
            assert pooled_size(length, size, stride, padding, ceil_mode) == expected.shape[-1]


def test_rejects_bad_arguments():
    x = random_input((1, 2, 6, 6))
    with pytest.raises(ValueError, match="kind"):
        pool2d(x, "min", 2, 2)
    with pytest.raises(ValueError, match="smaller than the pooling window"):
        pool2d(x, "max", 3, 2, padding=3)
    with pytest.raises(ValueError, match="out must be"):
        pool2d(x, "max", 2, 2, out=torch.empty(1, 2, 4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="4-D"):
        pool2d(x[0], "max", 2, 2)


def _onnx_windows(count: int, seed: int = 11) -> list[tuple]:
    """Random windows PyTorch's pooling cannot express: each side padded on its own up to size - 1, dilations,
    ceil mode, on small maps; only those where every window reads an input value (netdsl refuses the rest)."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        size = (rng.randint(1, 4), rng.randint(1, 4))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.randint(1, 3), rng.randint(1, 3))
        pads = tuple(rng.randint(0, size[axis % 2] - 1) for axis in range(4))
        ceil_mode = rng.random() < 0.5
        shape = (rng.randint(1, 2), 3, rng.randint(3, 8), rng.randint(3, 8))
        rows = onnx_length(shape[2], size[0], stride[0], pads[0], pads[2], dilation[0], ceil_mode)
        cols = onnx_length(shape[3], size[1], stride[1], pads[1], pads[3], dilation[1], ceil_mode)
        if min(rows, cols) < 1:
            continue  # no window fits
        if explicit_pool(torch.zeros(1, 1, *shape[2:]), "max", size, stride, pads, dilation, ceil_mode).isinf().any():
            continue  # a window reads only padding
        cases.append((shape, size, stride, pads, dilation, ceil_mode))
    return cases


ONNX_WINDOWS = _onnx_windows(40)


@pytest.mark.parametrize(
    ("shape", "size", "stride", "pads", "dilation", "ceil_mode"),
    ONNX_WINDOWS,
    ids=[f"k{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}{'-ceil' if c[5] else ''}".replace(" ", "") for c in ONNX_WINDOWS],
)
def test_padding_and_dilation_as_onnx_defines_them(shape, size, stride, pads, dilation, ceil_mode):
    """Against explicitly padded PyTorch (tests/kernel_support.py): max, and averages with and without padding
    in the divisor."""
    x = random_input(shape, seed=sum(shape) + sum(pads))
    for kind, count_include_pad in (("max", True), ("avg", True), ("avg", False)):
        got = pool2d(x, kind, size, stride, pads, ceil_mode, count_include_pad, dilation=dilation)
        expected = explicit_pool(x, kind, size, stride, pads, dilation, ceil_mode, count_include_pad).float()
        torch.testing.assert_close(got, expected, **TOLERANCES[x.dtype])


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_same_padding_of_even_windows(kind):
    """TensorFlow's SAME for a 2x2 window of stride 2 on odd maps pads the bottom and the right only; SAME_LOWER
    the top and the left."""
    x = random_input((2, 3, 7, 9), seed=12)
    for pads in ((0, 0, 1, 1), (1, 1, 0, 0)):
        got = pool2d(x, kind, 2, 2, pads, count_include_pad=False)
        assert got.shape == (2, 3, 4, 5)
        expected = explicit_pool(x, kind, (2, 2), (2, 2), pads, count_include_pad=False).float()
        torch.testing.assert_close(got, expected, **TOLERANCES[x.dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_padding_and_dilation_in_low_precision(dtype):
    x = random_input((1, 4, 9, 8), dtype, seed=13)
    got = pool2d(x, "avg", (3, 2), 2, (2, 0, 1, 1), True, True, dilation=(2, 3))
    expected = explicit_pool(x.float(), "avg", (3, 2), (2, 2), (2, 0, 1, 1), (2, 3), True, True).to(dtype)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


def test_rejects_padding_it_cannot_pool():
    x = random_input((1, 2, 6, 6))
    with pytest.raises(ValueError, match="smaller than the pooling window"):
        pool2d(x, "avg", 3, 1, (0, 0, 3, 0))
    with pytest.raises(ValueError, match="bad pooling window"):
        pool2d(x, "max", 3, 1, (0, -1, 0, 0))
    with pytest.raises(ValueError, match="reads only padding"):
        pool2d(x[:, :, :2, :2], "max", 2, 2, 1, dilation=3)


def test_a_batch_past_the_flat_index_runs_in_slices_and_writes_nothing_outside(monkeypatch):
    """The kernel's flat output index is 32-bit: a batch with more outputs than that runs in slices of whole
    images (the limit lowered here to 2 images' outputs, so a batch of 5 stands for a huge one), each written
    where it belongs and nothing before or after the output."""
    import netdsl.codegen.pool as pool

    torch.manual_seed(4)
    x = torch.randn(5, 3, 9, 9, device=DEVICE)
    room = torch.full((2 * 5 * 3 * 4 * 4,), float("nan"), device=DEVICE)
    out = room[5 * 3 * 4 * 4 // 2 :][: 5 * 3 * 4 * 4].view(5, 3, 4, 4)  # with NaN guards on both sides
    monkeypatch.setattr(pool, "MAX_FLAT_INDEX", 2 * 3 * 4 * 4 + 7)
    pool.pool2d(x, "max", (3, 3), (2, 2), (0, 0), False, out=out)
    torch.testing.assert_close(out, max_pool2d(x, 3, 2), rtol=0, atol=0)
    assert int(torch.isnan(room).sum()) == room.numel() - out.numel()
