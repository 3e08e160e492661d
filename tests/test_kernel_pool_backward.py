"""The pooling backward kernels and the max pool's training forward (codegen/pool_backward.py), and the activation
backward (codegen/elementwise_backward.py), against PyTorch autograd in float64 on fresh random inputs.

The reference is F.max_pool2d / F.avg_pool2d where PyTorch can express the window (padding alike at both ends
and at most half the window; no dilation for an average), else tests/kernel_support.explicit_pool (autograd
through F.pad and F.unfold: asymmetric padding, padding past half the window, dilated averages). Max-pool inputs
hold distinct values in each plane, so no window holds a tie (except in the test of ties); they are exact in
bf16, so the float64 reference sees the kernel's values. Gradients are summed in fp32 and rounded once to their
dtype: 1e-5 relative in fp32, 2e-3 in fp16, 1.6e-2 in bf16.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE, explicit_pool, random

from netdsl.codegen.elementwise_backward import activation_backward
from netdsl.codegen.pool import pool2d
from netdsl.codegen.pool_backward import (
    avg_pool2d_backward,
    global_avg_pool2d_backward,
    max_pool2d_backward,
    max_pool2d_train,
)
from netdsl.codegen.windows import four_pads

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 2e-3, "atol": 1e-4},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3},  # one rounding to bf16 of an fp32 sum
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# name -> (batch, channels, height, width, size, stride, padding, dilation, ceil_mode)
CASES = {
    "2x2/2": (2, 3, 8, 10, 2, 2, 0, 1, False),
    "3x3/2-overlapping-odd": (2, 3, 13, 11, 3, 2, 0, 1, False),
    "3x3/1-pad1": (1, 4, 7, 9, 3, 1, 1, 1, False),
    "3x3/2-ceil": (2, 3, 8, 10, 3, 2, 0, 1, True),
    "3x3/2-pad1-ceil-odd": (1, 5, 9, 12, 3, 2, 1, 1, True),
    "3x3/2-dilation2": (2, 3, 11, 12, 3, 2, 1, 2, False),
    "3x2/2x1-pad1x0-ceil": (1, 3, 9, 8, (3, 2), (2, 1), (1, 0), 1, True),
    # Beyond PyTorch's pooling: explicit_pool is the reference.
    "asymmetric-pads-ceil": (2, 3, 9, 10, 3, 2, (0, 1, 2, 1), 1, True),
    "pads-past-half": (1, 3, 7, 8, 3, 2, 2, 1, False),
    "dilation2-asymmetric-ceil": (1, 2, 10, 9, 3, (2, 1), (1, 2, 0, 1), 2, True),
}


def pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def distinct_input(shape, dtype, seed, channels_last=False):
    """Values all different within each (n, c) plane (no window holds a tie), none zero, exact in bf16: +-1/16,
    +-2/16, ..., +-(H * W)/16 in random order with random signs."""
    n, c, h, w = shape
    assert h * w <= 256, "bf16 holds k / 16 exactly for k <= 256 only"
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.stack([torch.randperm(h * w, generator=generator) + 1 for _ in range(n * c)])
    sign = torch.randint(0, 2, magnitude.shape, generator=generator) * 2 - 1
    x = (sign * magnitude / 16).float().view(shape).to(DEVICE, dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def gradient(shape, dtype, seed):
    return random(torch.Generator().manual_seed(seed), *shape).to(DEVICE, dtype)


def torch_can_pool(kind, size, padding, dilation) -> bool:
    """Whether F.max_pool2d / F.avg_pool2d take this window: each pad alike at both ends and at most half the
    window, and no dilation for an average."""
    top, left, bottom, right = four_pads(padding)
    kh, kw = pair(size)
    symmetric = (top, left) == (bottom, right) and top <= kh // 2 and left <= kw // 2
    return symmetric and (kind == "max" or pair(dilation) == (1, 1))


def reference(x, grad_out, kind, case, count_include_pad=True):
    """(pooled output, input gradient) by float64 autograd."""
    *_, size, stride, padding, dilation, ceil_mode = case
    wide = x.double().requires_grad_()
    if not torch_can_pool(kind, size, padding, dilation):
        pooled = explicit_pool(wide, kind, pair(size), pair(stride), four_pads(padding), pair(dilation), ceil_mode,
                               count_include_pad)  # fmt: skip
    elif kind == "max":
        pooled = F.max_pool2d(wide, size, stride, four_pads(padding)[:2], dilation, ceil_mode)
    else:
        pooled = F.avg_pool2d(wide, size, stride, four_pads(padding)[:2], ceil_mode, count_include_pad)
    pooled.backward(grad_out.double())
    return pooled.detach(), wide.grad


def winner_indices(argmax, case, width):
    """The saved offsets (kh * KW + kw) as max_pool2d's indices (ih * width + iw)."""
    *_, size, stride, padding, dilation, _ = case
    kw, (sh, sw), (dh, dw) = pair(size)[1], pair(stride), pair(dilation)
    top, left, _, _ = four_pads(padding)
    oh = torch.arange(argmax.shape[2], device=argmax.device)[:, None]
    ow = torch.arange(argmax.shape[3], device=argmax.device)[None, :]
    offset = argmax.long()
    return (oh * sh - top + offset // kw * dh) * width + ow * sw - left + offset % kw * dw


def check_max(case, dtype, seed, channels_last=False, config=None):
    batch, channels, height, width, size, stride, padding, dilation, ceil_mode = case
    x = distinct_input((batch, channels, height, width), dtype, seed, channels_last)
    window = {"size": size, "stride": stride, "padding": padding, "ceil_mode": ceil_mode}
    out, argmax = max_pool2d_train(x, **window, dilation=dilation, config=config)
    assert argmax.dtype == torch.int8 and argmax.shape == out.shape
    assert torch.equal(out, pool2d(x, "max", **window, dilation=dilation)), "differs from the inference forward"
    grad_out = gradient(out.shape, dtype, seed + 1)
    if channels_last:
        grad_out = grad_out.to(memory_format=torch.channels_last)
    grad_x = max_pool2d_backward(grad_out, argmax, x.shape, **window, dilation=dilation, config=config)
    assert grad_x.shape == x.shape and grad_x.dtype == dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert grad_x.is_contiguous(memory_format=layout)

    expected_out, expected_grad = reference(x, grad_out, "max", case)
    assert torch.equal(out.double(), expected_out)
    if torch_can_pool("max", size, padding, dilation):
        _, winners = F.max_pool2d(x.float(), size, stride, four_pads(padding)[:2], dilation, ceil_mode, True)
        assert torch.equal(winner_indices(argmax, case, width), winners), "different winners"
    torch.testing.assert_close(grad_x.double(), expected_grad, **TOLERANCES[dtype])


def check_avg(case, dtype, seed, count_include_pad, channels_last=False):
    batch, channels, height, width, size, stride, padding, dilation, ceil_mode = case
    x = gradient((batch, channels, height, width), dtype, seed)  # only its shape and layout matter
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    window = {"size": size, "stride": stride, "padding": padding, "ceil_mode": ceil_mode}
    out = pool2d(x, "avg", **window, count_include_pad=count_include_pad, dilation=dilation)
    grad_out = gradient(out.shape, dtype, seed + 1)
    if channels_last:
        grad_out = grad_out.to(memory_format=torch.channels_last)
    grad_x = avg_pool2d_backward(grad_out, x.shape, **window, count_include_pad=count_include_pad, dilation=dilation)
    assert grad_x.shape == x.shape and grad_x.dtype == dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert grad_x.is_contiguous(memory_format=layout)
    _, expected = reference(x, grad_out, "avg", case, count_include_pad)
    torch.testing.assert_close(grad_x.double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_max_pool_backward(case, dtype):
    check_max(CASES[case], DTYPES[dtype], seed=len(case))


@pytest.mark.parametrize(("dtype", "count_include_pad"), [("fp32", True), ("fp32", False), ("bf16", True)])
@pytest.mark.parametrize("case", list(CASES))
def test_avg_pool_backward(case, dtype, count_include_pad):
    check_avg(CASES[case], DTYPES[dtype], seed=len(case), count_include_pad=count_include_pad)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", ["3x3/2-pad1-ceil-odd", "asymmetric-pads-ceil"])
def test_channels_last(case, dtype):
    check_max(CASES[case], DTYPES[dtype], seed=20, channels_last=True)
    check_avg(CASES[case], DTYPES[dtype], seed=21, count_include_pad=False, channels_last=True)


def test_fp16():
    check_max(CASES["3x3/2-pad1-ceil-odd"], torch.float16, seed=36)
    check_avg(CASES["3x3/2-pad1-ceil-odd"], torch.float16, seed=37, count_include_pad=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_blocks_smaller_than_the_maps(layout):
    """Blocks of 64 elements straddle rows, planes and images, in both walking orders."""
    check_max(CASES["3x3/1-pad1"], torch.float32, seed=22, channels_last=layout == "channels_last",
              config={"BLOCK": 64})  # fmt: skip


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 3, 6, 6), (2, 5, 7, 5)])
def test_global_avg_pool_backward(shape, dtype):
    x = gradient(shape, DTYPES[dtype], seed=23)
    grad_out = gradient((shape[0], shape[1], 1, 1), DTYPES[dtype], seed=24)
    grad_x = global_avg_pool2d_backward(grad_out, x.shape)
    wide = x.double().requires_grad_()
    wide.mean(dim=(2, 3), keepdim=True).backward(grad_out.double())
    torch.testing.assert_close(grad_x.double(), wide.grad, **TOLERANCES[DTYPES[dtype]])


def test_strided_views():
    """The gradient from a channel slice of a larger buffer, written into a channel slice of another, with
    argmax of its own layout (channels-last)."""
    case = CASES["3x3/2-overlapping-odd"]
    x = distinct_input(case[:4], torch.float32, seed=25)
    out, argmax = max_pool2d_train(x, 3, 2)
    argmax = argmax.contiguous(memory_format=torch.channels_last)
    grad_buffer = gradient((2, 7, *out.shape[2:]), torch.float32, seed=26)
    grad_out = grad_buffer[:, 2:5]
    target = torch.full((2, 6, *x.shape[2:]), 7.0, device=DEVICE)
    grad_x = max_pool2d_backward(grad_out, argmax, x.shape, 3, 2, grad_input=target[:, 1:4])
    _, expected = reference(x, grad_out, "max", case)
    torch.testing.assert_close(grad_x.double(), expected, **TOLERANCES[torch.float32])
    assert (target[:, :1] == 7).all() and (target[:, 4:] == 7).all()


def test_ties_go_to_the_first_in_window_order():
    """Integer inputs (and -inf) repeat values within windows: the first, in row-major window order, wins."""
    generator = torch.Generator().manual_seed(27)
    x = torch.randint(-1, 2, (2, 3, 9, 9), generator=generator).float().to(DEVICE)
    x[0, 0, :3, :3] = float("-inf")
    case = (2, 3, 9, 9, 3, 2, 1, 1, False)
    out, argmax = max_pool2d_train(x, 3, 2, 1)
    _, winners = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(winner_indices(argmax, case, 9), winners)
    grad_out = gradient(out.shape, torch.float32, seed=28)
    expected = torch.zeros(2, 3, 81, dtype=torch.float64, device=DEVICE)
    expected.scatter_add_(2, winners.flatten(2), grad_out.double().flatten(2))
    grad_x = max_pool2d_backward(grad_out, argmax, x.shape, 3, 2, 1)
    torch.testing.assert_close(grad_x.double(), expected.view(x.shape), **TOLERANCES[torch.float32])


def test_nan_wins():
    """A NaN takes over its windows, as in PyTorch (which also gives it the gradient)."""
    x = distinct_input((1, 2, 7, 7), torch.float32, seed=29)
    x[0, 1, 2, 2] = float("nan")  # under 4 overlapping windows
    out, argmax = max_pool2d_train(x, 3, 2)
    expected, winners = F.max_pool2d(x, 3, 2, return_indices=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert out[0, 1].isnan().sum() == 4
    assert torch.equal(winner_indices(argmax, (1, 2, 7, 7, 3, 2, 0, 1, False), 7), winners)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_deterministic(dtype):
    """Two launches give the same bits: each input element is written once, its sum in a fixed order."""
    dtype = DTYPES[dtype]
    x = distinct_input((2, 4, 11, 11), dtype, seed=30)
    out, argmax = max_pool2d_train(x, 3, 1, 1)
    grad_out = gradient(out.shape, dtype, seed=31)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    runs = [max_pool2d_backward(grad_out, argmax, x.shape, 3, 1, 1).view(bits) for _ in range(2)]
    runs += [avg_pool2d_backward(grad_out, x.shape, 3, 1, 1, count_include_pad=False).view(bits) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])


def test_rejects_bad_arguments():
    x = distinct_input((1, 2, 6, 6), torch.float32, seed=32)
    out, argmax = max_pool2d_train(x, 3, 2)
    with pytest.raises(ValueError, match="argmax"):
        max_pool2d_backward(out, argmax.float(), x.shape, 3, 2)
    with pytest.raises(ValueError, match="grad_out"):
        max_pool2d_backward(out[:, :1], argmax, x.shape, 3, 2)
    with pytest.raises(ValueError, match="int8"):
        max_pool2d_train(torch.ones(1, 1, 12, 12, device=DEVICE), 12, 1)
    with pytest.raises(ValueError, match="smaller than the pooling window"):
        avg_pool2d_backward(out, x.shape, 3, 2, padding=3)
    with pytest.raises(ValueError, match="grad_input"):
        avg_pool2d_backward(out, x.shape, 3, 2, grad_input=torch.empty(1, 2, 5, 5, device=DEVICE))


# The activation backward (codegen/elementwise_backward.py).


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("saved", ["output", "input"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_activation_backward(activation, saved, dtype):
    dtype = DTYPES[dtype]
    generator = torch.Generator().manual_seed(33)
    x = random(generator, 2, 5, 7, 9).to(DEVICE, dtype)
    grad_out = random(generator, *x.shape).to(DEVICE, dtype)
    wide = x.double().requires_grad_()
    y = F.relu(wide) if activation == "relu" else F.leaky_relu(wide, 0.2)
    y.backward(grad_out.double())
    kept = y.detach().to(dtype) if saved == "output" else x
    grad_x = activation_backward(grad_out, kept, activation, slope=0.2)
    assert grad_x.dtype == dtype and grad_x.shape == x.shape
    torch.testing.assert_close(grad_x.double(), wide.grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("layout", ["channels_last", "rows", "in_place", "views"])
def test_activation_backward_layouts(layout):
    """Channels-last maps, [N, F] rows, the gradient overwritten in place, and views of three different layouts."""
    generator = torch.Generator().manual_seed(34)
    x = random(generator, 3, 6, 5, 4).to(DEVICE)
    grad_out = random(generator, *x.shape).to(DEVICE)
    grad_input = None
    if layout == "channels_last":
        x, grad_out = (t.to(memory_format=torch.channels_last) for t in (x, grad_out))
    elif layout == "rows":
        x, grad_out = x.flatten(1), grad_out.flatten(1)
    elif layout == "in_place":
        grad_out = grad_out.clone()
        grad_input = grad_out
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        grad_out = random(generator, 3, 9, 5, 4).to(DEVICE)[:, 2:8]
        grad_input = torch.empty_like(x, memory_format=torch.channels_last)
    expected = torch.where(x > 0, grad_out, 0.1 * grad_out)  # before an in-place run overwrites grad_out
    grad_x = activation_backward(grad_out, F.leaky_relu(x, 0.1), "leaky_relu", slope=0.1, grad_input=grad_input)
    torch.testing.assert_close(grad_x, expected, **TOLERANCES[torch.float32])
    if layout == "channels_last":
        assert grad_x.is_contiguous(memory_format=torch.channels_last)
    if grad_input is not None:
        assert grad_x is grad_input


def test_activation_backward_rejects_bad_arguments():
    grad_out = gradient((2, 3), torch.float32, seed=35)
    with pytest.raises(ValueError, match="activation must be"):
        activation_backward(grad_out, grad_out, "none")
    with pytest.raises(ValueError, match="slope"):
        activation_backward(grad_out, grad_out, "leaky_relu", slope=-0.1)
    with pytest.raises(ValueError, match="saved"):
        activation_backward(grad_out, grad_out[:, :2], "relu")
