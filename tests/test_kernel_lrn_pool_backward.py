"""The LRN + max-pool training forward and backward (codegen/lrn_pool_backward.py) against PyTorch autograd through
the paper's LRN written out here (per channel group, its windows' sums of squares summed channel by channel) and
F.max_pool2d with the same window.

fp32: plain autograd in float64 on the same inputs; the pooled output, the saved winners (against max_pool2d's
indices) and scales are checked too. bf16: the pool's winners come from the forward in bf16, as in an unfused
bf16 network (max_pool2d over the rounded LRN output: near-ties are common at 8 bits), and the gradient flows
through those winners in float64, so the tolerance measures only the kernels (the kernel's fp32 LRN output
rounds to bf16 to nearest even, as PyTorch's `.to`, under Triton's interpreter too: netdsl.codegen.interpret).
LRN parameters are strong (AlexNet's alpha barely changes unit inputs, which would hide the gradient's
cross-channel term); one test uses AlexNet's.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE

from netdsl.codegen.lrn_pool_backward import lrn_maxpool_backward, lrn_maxpool_train

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},  # dx rounded once to bf16
}
STRONG = {"alpha": 0.3, "beta": 0.75, "k": 1.0}
ALEXNET = {"alpha": 1e-4, "beta": 0.75, "k": 2.0}
# (batch, channels, height, width, size, groups, relu_first, window, stride, padding, ceil_mode)
CASES = {
    "3x3/2-alexnet-stage": (2, 8, 11, 11, 5, 1, True, 3, 2, 0, False),
    "3x3/2-pad1-two-groups": (1, 6, 9, 8, 3, 2, False, 3, 2, 1, False),
    "2x2/2-odd-sizes": (2, 5, 7, 9, 5, 1, True, 2, 2, 0, False),
    "3x3/1-pad1-two-groups": (1, 6, 7, 7, 3, 2, True, 3, 1, 1, False),
    "3x3/1-groups-narrower-than-window": (2, 4, 6, 7, 5, 2, False, 3, 1, 0, False),
    "3x3/2-ceil-even-size": (1, 6, 8, 8, 4, 1, False, 3, 2, 0, True),
}
# Tiles smaller than the maps: LRN windows cross channel tiles and pooling windows cross pixel tiles. (The
# interpreter's time goes by program instance, so only one test uses them.)
SMALL_TILES = {"BLOCK_C": 4, "BLOCK_P": 64, "num_warps": 4}


def random_input(shape, dtype, seed, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator)).to(DEVICE, dtype)


def reference_lrn(x, size, alpha, beta, k, groups, relu_first):
    """The paper's LRN: a / (k + alpha * the sum of squares over a's window) ** beta, a = x or relu(x)."""
    a = torch.relu(x) if relu_first else x
    return a / (k + alpha * window_sums(x, size, groups, relu_first)) ** beta


def reference_backward(x, grad_out, lrn_args, pool_args, winners=None):
    """dx in float64 by autograd: through F.max_pool2d, or with `winners` (max_pool2d's indices) through those."""
    wide = x.double().requires_grad_()
    y = reference_lrn(wide, **lrn_args)
    if winners is None:
        pooled = F.max_pool2d(y, **pool_args)
    else:
        pooled = y.flatten(2).gather(2, winners.flatten(2)).view(winners.shape)
    pooled.backward(grad_out.double())
    return wide.grad


def window_sums(x, size, groups, relu_first):
    """The sum of squares over each channel's LRN window, c - (size-1)//2 .. c + size//2 within its group."""
    a = torch.relu(x) if relu_first else x
    per_group = x.shape[1] // groups
    sums = torch.empty_like(a)
    for c in range(x.shape[1]):
        begin = c // per_group * per_group
        first, last = max(begin, c - (size - 1) // 2), min(begin + per_group - 1, c + size // 2)
        sums[:, c] = a[:, first : last + 1].pow(2).sum(1)
    return sums


def winner_indices(argmax, window, stride, padding, width):
    """The kernel's window offsets as max_pool2d's indices (h * width + w in the input plane)."""
    oh = torch.arange(argmax.shape[2], device=argmax.device)[:, None]
    ow = torch.arange(argmax.shape[3], device=argmax.device)[None, :]
    offset = argmax.long()
    return (oh * stride - padding + offset // window) * width + ow * stride - padding + offset % window


def check_case(case, dtype, seed=0, lrn_params=STRONG, config=None, channels_last=False):
    batch, channels, height, width, size, groups, relu_first, window, stride, padding, ceil_mode = case
    x = random_input((batch, channels, height, width), dtype, seed)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    lrn_args = {"size": size, **lrn_params, "groups": groups, "relu_first": relu_first}
    pool_args = {"kernel_size": window, "stride": stride, "padding": padding, "ceil_mode": ceil_mode}
    ours = {**lrn_args, "pool_size": window, "pool_stride": stride, "pool_padding": padding, "ceil_mode": ceil_mode}

    out, argmax, scale = lrn_maxpool_train(x, **ours, config=config)
    grad_out = random_input(out.shape, dtype, seed + 1, scale=1.0)
    grad_x = lrn_maxpool_backward(grad_out, x, argmax, scale, **ours, config=config)
    assert grad_x.shape == x.shape and grad_x.dtype == dtype
    assert grad_x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    y = reference_lrn(x.float(), **lrn_args).to(dtype)
    pooled, winners = F.max_pool2d(y, **pool_args, return_indices=True)
    assert torch.equal(winner_indices(argmax, window, stride, padding, width), winners), "different winners"
    torch.testing.assert_close(out, pooled)
    scales = lrn_params["k"] + lrn_params["alpha"] * window_sums(x.double(), size, groups, relu_first)
    winning_scales = scales.flatten(2).gather(2, winners.flatten(2)).view(winners.shape)
    torch.testing.assert_close(scale.double(), winning_scales, **TOLERANCES[torch.float32])

    expected = reference_backward(x, grad_out, lrn_args, pool_args, winners if dtype != torch.float32 else None)
    torch.testing.assert_close(grad_x.double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_against_autograd(case, dtype):
    check_case(CASES[case], dtype, seed=len(case))


def test_tiles_smaller_than_the_maps():
    """8 channels x 121 pixels, before and after a 3x3/1 pool with padding 1, in tiles of 4 x 64."""
    check_case((1, 8, 11, 11, 5, 1, True, 3, 1, 1, False), torch.float32, seed=1, config=SMALL_TILES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_channels_last(dtype):
    check_case(CASES["3x3/2-pad1-two-groups"], dtype, seed=3, channels_last=True)


def test_alexnet_parameters():
    """AlexNet's LRN (k=2, alpha=1e-4 not divided by 5) on conv1-sized activations, so the LRN still matters."""
    check_case((1, 8, 11, 11, 5, 1, True, 3, 2, 0, False), torch.float32, seed=4, lrn_params=ALEXNET)


def test_ties_go_to_the_first_in_window_order():
    """Inputs of a few values repeat LRN outputs within windows (and the ReLU makes zeros): the first wins."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randint(-1, 2, (2, 4, 7, 7), generator=generator).float().to(DEVICE)
    lrn_args = {"size": 3, **STRONG, "groups": 1, "relu_first": True}
    ours = {**lrn_args, "pool_size": 3, "pool_stride": 2}
    out, argmax, scale = lrn_maxpool_train(x, **ours)
    _, winners = F.max_pool2d(reference_lrn(x, **lrn_args), 3, 2, return_indices=True)
    assert torch.equal(winner_indices(argmax, 3, 2, 0, 7), winners)
    grad_out = random_input(out.shape, torch.float32, 6, scale=1.0)
    grad_x = lrn_maxpool_backward(grad_out, x, argmax, scale, **ours)
    expected = reference_backward(x, grad_out, lrn_args, {"kernel_size": 3, "stride": 2}, winners)
    torch.testing.assert_close(grad_x.double(), expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic(dtype):
    """Two launches give the same bits: the gather writes each input element once."""
    x = random_input((2, 6, 9, 9), dtype, seed=7)
    ours = {"size": 5, **STRONG, "pool_size": 3, "pool_stride": 2, "relu_first": True}
    out, argmax, scale = lrn_maxpool_train(x, **ours)
    grad_out = random_input(out.shape, dtype, seed=8, scale=1.0)
    first, second = (lrn_maxpool_backward(grad_out, x, argmax, scale, **ours) for _ in range(2))
    assert torch.equal(first.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       second.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # fmt: skip


def test_rejects_bad_arguments():
    x = random_input((1, 4, 5, 5), torch.float32, seed=9)
    ours = {"size": 3, **STRONG, "pool_size": 3, "pool_stride": 2}
    out, argmax, scale = lrn_maxpool_train(x, **ours)
    with pytest.raises(ValueError, match="groups"):
        lrn_maxpool_train(x, **ours, groups=3)
    with pytest.raises(ValueError, match="int8"):
        lrn_maxpool_train(x, **{**ours, "pool_size": 12, "pool_stride": 1, "pool_padding": 4})
    with pytest.raises(ValueError, match="argmax"):
        lrn_maxpool_backward(out, x, argmax.float(), scale, **ours)
    with pytest.raises(ValueError, match="grad_out"):
        lrn_maxpool_backward(out[:, :, :1], x, argmax, scale, **ours)
