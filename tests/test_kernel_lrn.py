"""LRN and fused LRN + max-pool kernels against PyTorch and a hand-written loop of the paper's formula.

PyTorch's local_response_norm divides alpha by the window size, the paper does not: the PyTorch reference is
called with alpha * size. For even sizes the two windows differ (PyTorch's sits one channel lower), so those are
checked against the loop only.
"""

import numpy as np
import pytest
import torch
from kernel_support import DEVICE, explicit_pool
from torch.nn.functional import local_response_norm, max_pool2d

from netdsl.codegen.lrn import lrn, lrn_maxpool

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 2e-3, "atol": 1e-4},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3},
}

ALEXNET = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0}
# Parameters whose normalization visibly changes the values of unit-variance inputs (AlexNet's barely does).
STRONG = [
    {"size": 5, "alpha": 0.2, "beta": 0.75, "k": 2.0},
    {"size": 3, "alpha": 0.5, "beta": 0.5, "k": 1.0},
    {"size": 7, "alpha": 0.1, "beta": 1.0, "k": 0.5},
    {"size": 1, "alpha": 1.0, "beta": 0.75, "k": 1.0},
]
# (pool_size, pool_stride, pool_padding, ceil_mode)
POOLS = [
    (3, 2, 0, False),
    (3, 2, 0, True),
    (2, 2, 0, False),
    (3, 2, 1, True),
    ((3, 2), (2, 1), (1, 0), False),
]
# Small tiles, so LRN windows cross channel tiles and pooled pixels span several pixel tiles.
SMALL_TILES = {"BLOCK_C": 16, "BLOCK_P": 16, "num_warps": 4}
# One tile per image: the interpreter's cost is per program instance, and the sweeps below are wide.
ONE_TILE = {"BLOCK_C": 64, "BLOCK_P": 128, "num_warps": 4}


def random_input(shape, dtype=torch.float32, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator)).to(DEVICE, dtype)


def torch_lrn(x, size, alpha, beta, k):
    return local_response_norm(x.float(), size, alpha=alpha * size, beta=beta, k=k)


def paper_lrn(x, size, alpha, beta, k):
    """b[c] = a[c] / (k + alpha * sum of a[j]^2 over j = c - (size-1)//2 .. c + size//2, clipped) ** beta."""
    a = x.double().cpu().numpy()
    channels = a.shape[1]
    lo, hi = (size - 1) // 2, size // 2
    out = np.empty_like(a)
    for c in range(channels):
        window = a[:, max(0, c - lo) : min(channels, c + hi + 1)]
        out[:, c] = a[:, c] / (k + alpha * (window**2).sum(axis=1)) ** beta
    return torch.from_numpy(out).float().to(x.device)


@pytest.mark.parametrize("channels", [1, 3, 48, 50])
@pytest.mark.parametrize("params", [ALEXNET, *STRONG], ids=lambda p: f"n{p['size']}a{p['alpha']}b{p['beta']}k{p['k']}")
def test_lrn_matches_torch_and_paper(params, channels):
    x = random_input((2, channels, 5, 7), seed=channels, scale=2.0)
    got = lrn(x, **params, config=ONE_TILE)
    torch.testing.assert_close(got, torch_lrn(x, **params), **TOLERANCES[x.dtype])
    torch.testing.assert_close(got, paper_lrn(x, **params), **TOLERANCES[x.dtype])


@pytest.mark.parametrize(("size", "channels"), [(4, 6), (2, 3), (6, 50), (9, 3)])
def test_even_and_oversized_windows_match_paper_loop(size, channels):
    """Windows wider than the channel count, and even sizes (window c-(n-1)//2 .. c+n//2), against the loop."""
    x = random_input((1, channels, 4, 6), seed=size, scale=2.0)
    params = {"size": size, "alpha": 0.3, "beta": 0.75, "k": 1.0}
    torch.testing.assert_close(lrn(x, **params), paper_lrn(x, **params), **TOLERANCES[x.dtype])


def test_lrn_across_channel_tiles():
    x = random_input((2, 50, 6, 7), seed=11, scale=2.0)
    got = lrn(x, **STRONG[0], config=SMALL_TILES)
    torch.testing.assert_close(got, paper_lrn(x, **STRONG[0]), **TOLERANCES[x.dtype])


def test_relu_first():
    x = random_input((1, 8, 5, 5), seed=12, scale=2.0)
    got = lrn(x, **STRONG[0], relu_first=True)
    torch.testing.assert_close(got, paper_lrn(torch.relu(x), **STRONG[0]), **TOLERANCES[x.dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lrn_low_precision(dtype):
    x = random_input((2, 48, 5, 6), dtype, seed=13, scale=2.0)
    got = lrn(x, **STRONG[0])
    assert got.dtype == dtype
    torch.testing.assert_close(got, torch_lrn(x, **STRONG[0]).to(dtype), **TOLERANCES[dtype])


def test_tower_slice_sees_only_its_channels():
    """A tower's LRN over a channel slice of a two-tower tensor, written into a slice of a larger buffer."""
    both_towers = random_input((1, 16, 5, 5), seed=14, scale=2.0)
    buffer = torch.full((1, 20, 5, 5), float("nan"), device=DEVICE)  # a value never written stays NaN
    lrn(both_towers[:, 8:], **STRONG[0], out=buffer[:, 2:10])
    torch.testing.assert_close(buffer[:, 2:10], paper_lrn(both_towers[:, 8:].contiguous(), **STRONG[0]))
    assert buffer[:, :2].isnan().all() and buffer[:, 10:].isnan().all(), "wrote outside the output slice"


def grouped(function, x, groups, *args, **kwargs):
    """`function` on each of `groups` channel slices of x apart, joined: what `groups=` computes in one launch."""
    return torch.cat([function(part.contiguous(), *args, **kwargs) for part in x.chunk(groups, dim=1)], dim=1)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("groups, channels", [(2, 16), (3, 21), (2, 96)])
def test_groups_normalize_apart_in_one_launch(groups, channels, layout):
    """AlexNet's towers merged onto one device: each group's windows stop at its edges (small tiles, so tiles and
    windows straddle the groups' boundaries), plain and fused with the pool, against the paper's loop per group."""
    x = random_input((2, channels, 9, 9), seed=30 + groups, scale=2.0)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    got = lrn(x, **STRONG[0], groups=groups, config=SMALL_TILES)
    torch.testing.assert_close(got, grouped(paper_lrn, x, groups, **STRONG[0]), **TOLERANCES[x.dtype])
    pooled = lrn_maxpool(x, **STRONG[1], pool_size=3, pool_stride=2, relu_first=True, groups=groups, config=SMALL_TILES)
    want = max_pool2d(grouped(paper_lrn, torch.relu(x), groups, **STRONG[1]), 3, 2)
    torch.testing.assert_close(pooled, want, **TOLERANCES[x.dtype])
    apart = lrn_maxpool(x, **STRONG[1], pool_size=3, pool_stride=2, relu_first=True, config=SMALL_TILES)
    assert (apart - want).abs().max() > 1e-3  # the groups matter: one window across all channels differs


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_zero_k_and_zero_window_gives_nan_like_torch():
    x = random_input((1, 4, 3, 3), seed=15, scale=2.0)
    x[:, :, 1, 1] = 0.0
    got = lrn(x, size=3, alpha=0.5, beta=0.75, k=0.0)
    assert got[:, :, 1, 1].isnan().all()
    assert torch_lrn(x, size=3, alpha=0.5, beta=0.75, k=0.0)[:, :, 1, 1].isnan().all()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, :, 1, 1] = False
    torch.testing.assert_close(got[mask], paper_lrn(x, 3, 0.5, 0.75, 0.0)[mask], **TOLERANCES[x.dtype])
    pooled = lrn_maxpool(x, size=3, alpha=0.5, beta=0.75, k=0.0, pool_size=3, pool_stride=2)
    assert pooled.isnan().all(), "the max-pool keeps the NaN, as max_pool2d does"


@pytest.mark.parametrize(("pool_size", "pool_stride", "pool_padding", "ceil_mode"), POOLS)
@pytest.mark.parametrize(("batch", "channels"), [(1, 1), (2, 3), (2, 48), (1, 50)])
def test_lrn_maxpool_matches_torch(batch, channels, pool_size, pool_stride, pool_padding, ceil_mode):
    x = random_input((batch, channels, 9, 8), seed=channels, scale=2.0)
    params = STRONG[0]
    got = lrn_maxpool(x, **params, pool_size=pool_size, pool_stride=pool_stride, pool_padding=pool_padding,
                      ceil_mode=ceil_mode, config=ONE_TILE)  # fmt: skip
    expected = max_pool2d(torch_lrn(x, **params), pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)
    torch.testing.assert_close(got, expected, **TOLERANCES[x.dtype])


@pytest.mark.parametrize(
    ("pool_size", "pool_stride", "pool_padding", "ceil_mode"),
    [
        (2, 2, (0, 0, 1, 1), False),
        (2, 2, (1, 1, 0, 0), True),
        (3, 2, (2, 0, 1, 2), False),
        ((4, 3), 1, (3, 2, 0, 1), True),
    ],
)
def test_lrn_maxpool_with_padding_pytorch_cannot_express(pool_size, pool_stride, pool_padding, ceil_mode):
    """Padding (top, left, bottom, right) that differs at the two ends or passes half the window: against the max
    of explicitly padded PyTorch (tests/kernel_support.py)."""
    x = random_input((2, 6, 9, 8), seed=17, scale=2.0)
    params = STRONG[1]
    got = lrn_maxpool(x, **params, pool_size=pool_size, pool_stride=pool_stride, pool_padding=pool_padding,
                      ceil_mode=ceil_mode, config=ONE_TILE)  # fmt: skip
    window = pool_size if isinstance(pool_size, tuple) else (pool_size, pool_size)
    expected = explicit_pool(torch_lrn(x, **params), "max", window, (pool_stride, pool_stride), pool_padding,
                             ceil_mode=ceil_mode).float()  # fmt: skip
    torch.testing.assert_close(got, expected, **TOLERANCES[x.dtype])


@pytest.mark.parametrize("relu_first", [False, True])
def test_lrn_maxpool_across_tiles_matches_paper_loop(relu_first):
    x = random_input((2, 40, 11, 11), seed=16, scale=2.0)
    params = STRONG[2]
    got = lrn_maxpool(x, **params, pool_size=3, pool_stride=2, relu_first=relu_first, config=SMALL_TILES)
    a = torch.relu(x) if relu_first else x
    torch.testing.assert_close(got, max_pool2d(paper_lrn(a, **params), 3, 2), **TOLERANCES[x.dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lrn_maxpool_low_precision(dtype):
    x = random_input((2, 50, 7, 7), dtype, seed=17, scale=2.0)
    got = lrn_maxpool(x, **STRONG[0], pool_size=3, pool_stride=2, ceil_mode=True, config=ONE_TILE)
    assert got.dtype == dtype
    expected = max_pool2d(torch_lrn(x, **STRONG[0]), 3, 2, ceil_mode=True).to(dtype)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


def test_alexnet_lrn1_pool1():
    """One tower of AlexNet's first stage: ReLU -> LRN(5, 1e-4, 0.75, 2) -> max-pool 3x3/2, 48x55x55 -> 48x27x27.

    The tile is set explicitly: pick_config's batch-1 choice (many small tiles) is slow under the interpreter."""
    x = random_input((1, 48, 55, 55), seed=18, scale=30.0)  # conv1-sized activations, so LRN changes them
    got = lrn_maxpool(x, **ALEXNET, pool_size=3, pool_stride=2, relu_first=True,
                      config={"BLOCK_C": 16, "BLOCK_P": 256, "num_warps": 4})  # fmt: skip
    assert got.shape == (1, 48, 27, 27)
    expected = max_pool2d(torch_lrn(torch.relu(x), **ALEXNET), 3, 2)
    torch.testing.assert_close(got, expected, **TOLERANCES[x.dtype])


def test_rejects_bad_arguments():
    x = random_input((1, 4, 5, 5))
    with pytest.raises(ValueError, match="k >= 0"):
        lrn(x, k=-1.0)
    with pytest.raises(ValueError, match="size"):
        lrn(x, size=0)
    with pytest.raises(ValueError, match="4 channels do not split into 3 groups"):
        lrn(x, groups=3)
    with pytest.raises(ValueError, match="smaller than the pooling window"):
        lrn_maxpool(x, 5, 1e-4, 0.75, 2.0, pool_size=2, pool_stride=2, pool_padding=2)
    with pytest.raises(ValueError, match="out must be"):
        lrn_maxpool(x, 5, 1e-4, 0.75, 2.0, pool_size=3, pool_stride=2, out=torch.empty(1, 4, 3, 3, device=DEVICE))
