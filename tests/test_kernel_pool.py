"""Max and average pooling kernels against PyTorch's pooling on fresh random inputs."""

import pytest
import torch
from kernel_support import DEVICE
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
    with pytest.raises(ValueError, match="half the pooling window"):
        pool2d(x, "max", 3, 2, padding=2)
    with pytest.raises(ValueError, match="out must be"):
        pool2d(x, "max", 2, 2, out=torch.empty(1, 2, 4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="4-D"):
        pool2d(x[0], "max", 2, 2)
