"""The training kernels against PyTorch: cross-entropy (codegen/cross_entropy.py), dropout (codegen/dropout.py),
batch norm in training (codegen/batchnorm_train.py) and the paper's SGD step (codegen/optimizer.py).

References run in float64 on the same (already rounded) inputs, with autograd for the gradients; a 16-bit
result is compared with the reference rounded once to its dtype, so the tolerances below cover the kernel's
fp32 arithmetic and about one rounding of the output (to nearest even: half a bf16 step, 2**-8 relative, on a
GPU and under Triton's interpreter as netdsl.codegen.interpret patches it). Inputs are fresh seeded random
numbers (never zeros), seeded from the test's id. Dropout's masks come from its own random stream, not
torch's: its tests check the drop rate against binomial bounds, the scale, and that forward and backward apply
the same mask. Without a GPU this runs in Triton's interpreter.
"""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from kernel_support import DEVICE

from netdsl.codegen.batchnorm_train import (
    BatchNormConfig,
    batch_norm_backward,
    batch_norm_forward,
    chunking,
    pick_config,
)
from netdsl.codegen.cross_entropy import CONFIGS as CE_CONFIGS
from netdsl.codegen.cross_entropy import CrossEntropyConfig, cross_entropy
from netdsl.codegen.dropout import dropout, dropout_backward
from netdsl.codegen.optimizer import paper_sgd_step, segments

# The interpreter warns when arithmetic overflows or meets NaN where it should not: a masked lane that leaked.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# Outputs in the input's dtype (y, dx, the logits' gradient), against the float64 reference rounded to that dtype.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 2e-3, "atol": 1e-5},  # one fp16 rounding is 2**-11 relative
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-4},  # one bf16 rounding is 2**-8 relative
}
# Per-row and mean losses, per-channel statistics and parameter gradients: fp32 results whatever the input dtype.
FP32_RESULT = {"rtol": 1e-5, "atol": 1e-5}
DTYPES = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in TOLERANCES]


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test's id: every test draws its own inputs, the same ones on every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(shape, gen, dtype=torch.float32, scale=1.0, offset=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(DEVICE, dtype)


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """`actual` (of `dtype`) against the float64 `expected` rounded once to `dtype`."""
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected.to(dtype).double(), **TOLERANCES[dtype])


def check_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **FP32_RESULT)


# --- cross-entropy ---------------------------------------------------------------------------------------------


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, smoothing: float):
    """PyTorch's mean loss, per-row losses and autograd gradient on the logits, in float64, against class indices
    or rows of target weights (PyTorch's probabilities)."""
    wide = logits.double().requires_grad_()
    target = target.double() if target.is_floating_point() else target.long()
    loss = F.cross_entropy(wide, target, label_smoothing=smoothing)
    loss.backward()
    losses = F.cross_entropy(logits.double(), target, label_smoothing=smoothing, reduction="none")
    return loss.detach(), losses, wide.grad


# Batch 1 and more; 10 classes (digits), 15 (the scene data), AlexNet's 1000, more than one tile of classes.
CE_SHAPES = [(1, 10), (130, 15), (7, 1000), (3, 4099)]


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_cross_entropy_matches_torch(shape, dtype, smoothing, gen):
    rows, classes = shape
    logits = randn(shape, gen, dtype, scale=3.0)
    target = torch.randint(0, classes, (rows,), generator=gen).to(DEVICE)
    loss, losses, grad = cross_entropy_reference(logits, target, smoothing)

    result = cross_entropy(logits, target, label_smoothing=smoothing)
    assert result.loss.dtype == result.losses.dtype == torch.float32 and result.loss.shape == ()
    check_fp32(result.loss, loss)
    check_fp32(result.losses, losses)
    check(result.grad, grad, dtype)


def test_cross_entropy_with_small_tiles_int32_targets_and_strided_views(gen):
    """Rows and classes over several tiles with ragged edges; logits a column slice, grad written into one."""
    wide = randn((9, 60), gen, scale=2.0)
    logits = wide[:, 5:42]
    target = torch.randint(0, 37, (9,), generator=gen).to(DEVICE, torch.int32)
    buffer = torch.full((9, 50), 7.0, device=DEVICE)
    result = cross_entropy(
        logits, target, label_smoothing=0.2, grad=buffer[:, 3:40], config=CrossEntropyConfig(4, 16, 4)
    )
    loss, losses, grad = cross_entropy_reference(logits, target, 0.2)
    check_fp32(result.loss, loss)
    check_fp32(result.losses, losses)
    check(buffer[:, 3:40], grad, torch.float32)
    assert (buffer[:, :3] == 7.0).all() and (buffer[:, 40:] == 7.0).all(), "wrote outside the gradient slice"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("scale", "offset"), [(1e4, 0.0), (1.0, 1e4), (1.0, -1e4)])
def test_cross_entropy_is_safe_for_large_logits(scale, offset, dtype, gen):
    logits = randn((4, 1000), gen, dtype, scale=scale, offset=offset)
    target = torch.randint(0, 1000, (4,), generator=gen).to(DEVICE)
    result = cross_entropy(logits, target, label_smoothing=0.1)
    _, losses, grad = cross_entropy_reference(logits, target, 0.1)
    assert torch.isfinite(result.losses).all() and torch.isfinite(result.grad).all()
    # fp32 holds a logit of magnitude m to about m * 6e-8, and the loss is a difference of such numbers.
    torch.testing.assert_close(result.losses.double(), losses, rtol=1e-5, atol=(scale + abs(offset)) * 2e-7)
    check(result.grad, grad, dtype)


@pytest.mark.parametrize("config", CE_CONFIGS, ids=lambda config: f"{config.BLOCK_N}x{config.BLOCK_K}")
def test_cross_entropy_with_each_gpu_tile(config, gen):
    """The tiles `pick_config` gives a GPU, run here too: 1000 classes span one or many chunks of each."""
    logits = randn((5, 1000), gen, torch.bfloat16, scale=3.0)
    target = torch.randint(0, 1000, (5,), generator=gen).to(DEVICE)
    result = cross_entropy(logits, target, label_smoothing=0.1, config=config)
    loss, losses, grad = cross_entropy_reference(logits, target, 0.1)
    check_fp32(result.loss, loss)
    check_fp32(result.losses, losses)
    check(result.grad, grad, torch.bfloat16)


def test_cross_entropy_is_deterministic_and_flags_bad_targets(gen):
    logits = randn((200, 33), gen)
    target = torch.randint(0, 33, (200,), generator=gen).to(DEVICE)
    first, second = cross_entropy(logits, target), cross_entropy(logits, target)
    assert torch.equal(first.loss, second.loss) and torch.equal(first.grad, second.grad)
    bad = cross_entropy(logits[:3], torch.tensor([0, 33, -1], device=DEVICE)).losses
    assert torch.isfinite(bad[0]) and bad[1:].isnan().all()


def soft_targets(rows: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    """Rows as a mixed batch gives them, lam * onehot(a) + (1 - lam) * onehot(b), and (every third row) weights
    on every class that do not sum to 1, which PyTorch's loss takes as they are."""
    lam = torch.rand(rows, 1, generator=gen, dtype=torch.float64)
    first, second = (torch.randint(0, classes, (rows,), generator=gen) for _ in range(2))
    target = lam * F.one_hot(first, classes) + (1 - lam) * F.one_hot(second, classes)
    target[::3] = torch.rand(len(target[::3]), classes, generator=gen, dtype=torch.float64) * 3 / classes
    return target.to(DEVICE, torch.float32)


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_cross_entropy_against_target_weights_matches_torch(shape, dtype, smoothing, gen):
    """A row of target weights per row of logits (a mixed batch's, `mixup` and `cutmix`): PyTorch's loss with
    probabilities as targets."""
    logits = randn(shape, gen, dtype, scale=3.0)
    target = soft_targets(*shape, gen)
    loss, losses, grad = cross_entropy_reference(logits, target, smoothing)
    result = cross_entropy(logits, target, label_smoothing=smoothing)
    check_fp32(result.loss, loss)
    check_fp32(result.losses, losses)
    check(result.grad, grad, dtype)


@pytest.mark.parametrize("config", CE_CONFIGS, ids=lambda config: f"{config.BLOCK_N}x{config.BLOCK_K}")
def test_cross_entropy_against_target_weights_with_each_gpu_tile_and_strided_views(config, gen):
    """The GPU's tiles; the logits and the targets column slices, the gradient written into one; a one-hot row
    gives what the class index gives."""
    logits = randn((5, 1010), gen, torch.bfloat16, scale=3.0)[:, 4:1004]
    target = torch.cat([soft_targets(5, 1000, gen), torch.zeros(5, 3, device=DEVICE)], 1)[:, :1000]
    buffer = torch.full((5, 1003), 7.0, device=DEVICE, dtype=torch.bfloat16)
    result = cross_entropy(logits, target, label_smoothing=0.1, config=config, grad=buffer[:, 2:1002])
    loss, losses, grad = cross_entropy_reference(logits, target, 0.1)
    check_fp32(result.loss, loss)
    check_fp32(result.losses, losses)
    check(buffer[:, 2:1002], grad, torch.bfloat16)
    assert (buffer[:, :2] == 7.0).all() and (buffer[:, 1002:] == 7.0).all(), "wrote outside the gradient slice"
    labels = torch.randint(0, 1000, (5,), generator=gen).to(DEVICE)
    hard = cross_entropy(logits, labels, label_smoothing=0.1, config=config)
    soft = cross_entropy(logits, F.one_hot(labels, 1000).float(), label_smoothing=0.1, config=config)
    check_fp32(soft.losses, hard.losses.double())
    torch.testing.assert_close(soft.grad, hard.grad, **TOLERANCES[torch.bfloat16])


def test_cross_entropy_rejects_bad_arguments(gen):
    logits = randn((4, 10), gen)
    target = torch.randint(0, 10, (4,), generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        cross_entropy(logits[0], target)
    with pytest.raises(ValueError, match="class indices"):
        cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(TypeError, match="cross_entropy supports"):
        cross_entropy(logits.double(), target)
    with pytest.raises(ValueError, match="grad is"):
        cross_entropy(logits, target, grad=torch.empty(4, 11, device=DEVICE))


# --- dropout ---------------------------------------------------------------------------------------------------

# Binomial counts are checked to 6 standard deviations: a correct kernel fails about once in 10**9 runs.
SIGMAS = 6.0


def assert_binomial(count: int, trials: int, probability: float, what: str) -> None:
    expected = trials * probability
    bound = SIGMAS * math.sqrt(trials * probability * (1 - probability)) + 1
    assert abs(count - expected) <= bound, f"{what}: {count} of {trials}, expected {expected:.0f} +- {bound:.0f}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_rate_scale_and_backward_mask(p, dtype, gen):
    x = randn((3, 257, 131), gen, dtype)  # ~101k values: two interpreter blocks, several GPU ones, odd sizes
    y = dropout(x, p, seed=12345, offset=99)
    kept = y != 0
    check(y, torch.where(kept, x.double() / (1 - p), 0.0), dtype)  # kept values are x / (1 - p)

    dropped = (~kept).flatten()
    assert_binomial(int(dropped.sum()), dropped.numel(), p, "dropped overall")
    for index, part in enumerate(dropped.chunk(8)):  # each eighth, so no program's share repeats another's
        assert_binomial(int(part.sum()), part.numel(), p, f"dropped in part {index}")
    both = dropped[:-1] & dropped[1:]  # neighbours drop independently
    assert_binomial(int(both.sum()), both.numel(), p * p, "neighbours both dropped")

    dy = randn(x.shape, gen, dtype)
    dx = dropout_backward(dy, p, seed=12345, offset=99)
    assert torch.equal(dx != 0, kept), "backward must apply the forward's mask"
    wide = x.double().requires_grad_()
    (wide * kept / (1 - p)).backward(dy.double())  # autograd of the forward, its mask taken as a constant
    check(dx, wide.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_edge_rates(dtype, gen):
    x = randn((5, 1001), gen, dtype)
    assert torch.equal(dropout(x, 0.0, seed=3), x)
    assert torch.equal(dropout(x, 1.0, seed=3), torch.zeros_like(x))
    assert torch.equal(dropout_backward(x, 1.0, seed=3), torch.zeros_like(x))
    p = 0.999
    y = dropout(x, p, seed=3)
    kept = y != 0
    assert_binomial(int((~kept).sum()), x.numel(), p, "dropped at p = 0.999")
    check(y[kept], x[kept].double() / (1 - p), dtype)


def test_dropout_mask_is_a_function_of_seed_and_counter(gen):
    """The same (seed, offset) gives the same mask on every launch, whatever the shape; element i's draw is
    counter offset + i, so shifting the offset shifts the mask; other seeds give unrelated masks."""
    x = randn(70_000, gen)  # more than one interpreter block; no zeros, so a zero is a dropped value
    y = dropout(x, 0.5, seed=2024)
    mask = y != 0
    assert torch.equal(y, dropout(x, 0.5, seed=2024))
    assert torch.equal(y, dropout(x.view(7, 100, 100), 0.5, seed=2024).flatten())
    assert torch.equal(y[1234:], dropout(x[1234:], 0.5, seed=2024, offset=1234))
    for other in (2025, 2**40 + 2024):
        agree = mask == (dropout(x, 0.5, seed=other) != 0)
        assert_binomial(int(agree.sum()), agree.numel(), 0.5, f"agreement with seed {other}")
    far = dropout(x[:1000], 0.5, seed=2024, offset=2**33)  # a counter past 32 bits
    assert_binomial(int((far == 0).sum()), 1000, 0.5, "dropped past 2**32")


def test_dropout_rejects_bad_arguments(gen):
    x = randn(4, gen)
    with pytest.raises(ValueError, match="rate"):
        dropout(x, 1.5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        dropout(x, 0.5, seed=-1)
    with pytest.raises(TypeError, match="dropout supports"):
        dropout(x.double(), 0.5, seed=0)
    with pytest.raises(ValueError, match="out is"):
        dropout(x, 0.5, seed=0, out=torch.empty(5, device=DEVICE))


# --- batch norm in training ------------------------------------------------------------------------------------

# Small blocks, three chunks a channel (the last one ragged): the partials are combined across programs.
SPLIT_CONFIG = BatchNormConfig(BLOCK=32, SPLIT=3, num_warps=4)
# Four channels a program, the last group ragged (6 channels), in three chunks each.
PACKED_CONFIG = BatchNormConfig(BLOCK=32, SPLIT=3, num_warps=4, CHANNELS=4)
# Batch 1 and more, odd planes, 1 x 1 planes (a batch norm after a global pool); the launcher's tiles and split ones.
BN_CASES = [
    pytest.param((1, 3, 5, 7), None, id="1x3x5x7"),
    pytest.param((2, 6, 9, 11), None, id="2x6x9x11"),
    pytest.param((5, 4, 1, 1), None, id="5x4x1x1"),
    pytest.param((2, 6, 9, 11), SPLIT_CONFIG, id="2x6x9x11-split"),
    pytest.param((2, 6, 9, 11), PACKED_CONFIG, id="2x6x9x11-split-packed"),
    pytest.param((3, 37, 1, 1), None, id="3x37x1x1"),  # (the launcher's tiles: the 37 channels in one program)
]


def batch_norm_reference(x, weight, bias, running_mean, running_var, dy, momentum, eps):
    """F.batch_norm(training=True) in float64 with autograd: y, the updated running stats, dx, dweight, dbias."""
    wide = [t.double().requires_grad_() for t in (x, weight, bias)]
    mean, var = running_mean.double(), running_var.double()
    y = F.batch_norm(wide[0], mean, var, wide[1], wide[2], training=True, momentum=momentum, eps=eps)
    y.backward(dy.double())
    return y.detach(), mean, var, *(t.grad for t in wide)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "config"), BN_CASES)
def test_batch_norm_matches_torch(shape, config, dtype, gen):
    channels = shape[1]
    x = randn(shape, gen, dtype, scale=2.0, offset=3.0)
    weight, bias, running_mean = (randn(channels, gen) for _ in range(3))
    running_var = randn(channels, gen).abs() + 0.5
    dy = randn(shape, gen, dtype)
    y, new_mean, new_var, dx, dweight, dbias = batch_norm_reference(
        x, weight, bias, running_mean, running_var, dy, 0.1, 1e-5
    )

    forward = batch_norm_forward(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5, config=config)
    check(forward.y, y, dtype)
    check_fp32(running_mean, new_mean)
    check_fp32(running_var, new_var)
    mean = x.double().mean(dim=(0, 2, 3))
    var = x.double().var(dim=(0, 2, 3), unbiased=False)
    check_fp32(forward.mean, mean)
    check_fp32(forward.invstd, (var + 1e-5).rsqrt())

    backward = batch_norm_backward(dy, x, weight, forward.mean, forward.invstd, config=config)
    check(backward.dx, dx, dtype)
    check_fp32(backward.dweight, dweight)
    check_fp32(backward.dbias, dbias)


def test_batch_norm_of_a_large_mean_with_a_small_spread(gen):
    """|mean| / std = 1e5: the shifted sums keep the variance, where sum(x^2) - M * mean^2 would lose it."""
    x = randn((4, 3, 6, 6), gen, scale=0.01, offset=1000.0)
    weight, bias = randn(3, gen), randn(3, gen)
    running_mean, running_var = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    dy = randn(x.shape, gen)
    y, _, new_var, dx, _, _ = batch_norm_reference(x, weight, bias, running_mean, running_var, dy, 0.1, 1e-5)
    forward = batch_norm_forward(x, weight, bias, running_mean, running_var, config=SPLIT_CONFIG)
    torch.testing.assert_close(forward.y.double(), y, rtol=1e-3, atol=2e-3)  # x itself holds ~6e-5 / 0.01 of noise
    torch.testing.assert_close(running_var.double(), new_var, rtol=1e-3, atol=0)
    backward = batch_norm_backward(dy, x, weight, forward.mean, forward.invstd, config=SPLIT_CONFIG)
    torch.testing.assert_close(backward.dx.double(), dx, rtol=1e-3, atol=0.1)  # dx ~ 1 / std = 100


def test_batch_norm_is_deterministic(gen):
    x = randn((3, 5, 7, 9), gen)
    weight, bias, dy = randn(5, gen), randn(5, gen), randn(x.shape, gen)
    results = []
    for _ in range(2):
        stats = [torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)]
        forward = batch_norm_forward(x, weight, bias, *stats, config=SPLIT_CONFIG)
        results.append([*forward, *stats, *batch_norm_backward(dy, x, weight, *forward[1:], config=SPLIT_CONFIG)])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


# (channels, values per channel, chunks per channel): enough programs to fill 132 SMs four times over, chunks of
# at least 4 blocks, at most 64 chunks.
GPU_SPLITS = [(3, 2, 1), (64, 128 * 32 * 32, 9), (96, 128 * 55 * 55, 6), (1, 10**7, 64), (512, 128 * 6 * 6, 1)]


@pytest.mark.parametrize(("channels", "per_channel", "expected_split"), GPU_SPLITS)
def test_batch_norm_gpu_chunks_cover_each_channel_once(channels, per_channel, expected_split):
    config = pick_config(channels, per_channel)
    chunk, split, block_split = chunking(per_channel, config)
    assert split == expected_split
    assert chunk % config.BLOCK == 0 and (split - 1) * chunk < per_channel <= split * chunk
    assert split <= block_split < 2 * split


def test_batch_norm_rejects_bad_arguments(gen):
    x = randn((2, 3, 4, 4), gen)
    vectors = [randn(3, gen).abs() + 0.5 for _ in range(4)]
    with pytest.raises(ValueError, match="more than one value"):
        batch_norm_forward(x[:1, :, :1, :1], *vectors)
    with pytest.raises(ValueError, match="contiguous"):
        batch_norm_forward(x.to(memory_format=torch.channels_last), *vectors)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        batch_norm_forward(x, randn(4, gen), *vectors[1:])
    with pytest.raises(ValueError, match=r"N, C, H, W"):
        batch_norm_forward(x[0], *vectors)
    with pytest.raises(ValueError, match="dy is"):
        batch_norm_backward(x[:1], x, *vectors[:3])


# --- the paper's SGD -------------------------------------------------------------------------------------------

# Parameters of a small net laid end to end: conv weight and bias, fc weight and bias, an empty one, a frozen one.
SIZES = [150, 6, 1201, 10, 0, 37]
LR_MULTS = [1.0, 2.0, 1.0, 2.0, 1.0, 0.0]
DECAY_MULTS = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def paper_sgd_reference(weights, velocities, grads, lr, nesterov, momentum=0.9, weight_decay=0.0005):
    """One step of the paper's rule on every parameter laid end to end, in float64, its rate and decay scaled by
    the parameter's multipliers (LR_MULTS, DECAY_MULTS): v <- momentum * v - decay * lr * w - lr * grad, then
    w <- w + v (Nesterov: w <- w + momentum * v - lr * (grad + decay * w)). Updates `weights` and `velocities`."""
    sizes = torch.tensor(SIZES)
    rate = lr * torch.tensor(LR_MULTS, dtype=torch.float64).repeat_interleave(sizes)
    decay = weight_decay * torch.tensor(DECAY_MULTS, dtype=torch.float64).repeat_interleave(sizes)
    velocities.mul_(momentum).sub_(decay * rate * weights + rate * grads)
    if nesterov:
        weights.add_(momentum * velocities - rate * (grads + decay * weights))
    else:
        weights.add_(velocities)


@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_paper_sgd_matches_the_rule_written_out(nesterov, grad_dtype, gen):
    """Six steps with the rate dropped by 10 after three, against the rule written out in float64 on the same
    (already rounded) gradients; blocks of 128 so that segments begin and end inside blocks."""
    weights = randn(sum(SIZES), gen)
    velocities = torch.zeros_like(weights)
    want_weights, want_velocities = weights.double().cpu(), velocities.double().cpu()
    table = segments(SIZES, LR_MULTS, DECAY_MULTS, device=DEVICE)
    weights_address, velocities_address = weights.data_ptr(), velocities.data_ptr()

    for step in range(6):
        lr = 0.01 if step < 3 else 0.001
        grads = randn(sum(SIZES), gen, grad_dtype)
        paper_sgd_reference(want_weights, want_velocities, grads.double().cpu(), lr, nesterov)
        paper_sgd_step(weights, grads, velocities, table, lr=lr, momentum=0.9, weight_decay=0.0005,
                       nesterov=nesterov, block=128)  # fmt: skip

    assert weights.data_ptr() == weights_address and velocities.data_ptr() == velocities_address, "not in place"
    torch.testing.assert_close(weights.double().cpu(), want_weights, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(velocities.double().cpu(), want_velocities, rtol=1e-5, atol=3e-8)


def test_paper_sgd_in_one_program_per_default_block(gen):
    """The launcher's own block, one segment: the paper's numbers (lr 0.01, momentum 0.9, decay 0.0005)."""
    weights = randn(5000, gen)
    velocities = randn(5000, gen, scale=0.01)
    grads = randn(5000, gen)
    expected_velocities = 0.9 * velocities.double() - 0.0005 * 0.01 * weights.double() - 0.01 * grads.double()
    expected_weights = weights.double() + expected_velocities
    paper_sgd_step(weights, grads, velocities, segments([5000], [1.0], [1.0], device=DEVICE), lr=0.01)
    torch.testing.assert_close(velocities.double(), expected_velocities, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weights.double(), expected_weights, rtol=1e-6, atol=1e-7)


def test_paper_sgd_rejects_bad_arguments():
    table = segments([3, 4], [1.0, 1.0], [1.0, 0.0], device=DEVICE)
    buffers = [torch.zeros(7, device=DEVICE) for _ in range(3)]
    with pytest.raises(TypeError, match="float32"):
        paper_sgd_step(buffers[0].half(), *buffers[1:], table, lr=0.1)
    with pytest.raises(ValueError, match="7 elements"):
        paper_sgd_step(torch.zeros(8, device=DEVICE), *buffers[1:], table, lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        paper_sgd_step(*buffers, table, lr=0.0)
    with pytest.raises(ValueError, match="Nesterov"):
        paper_sgd_step(*buffers, table, lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="one size"):
        segments([3, 4], [1.0], [1.0, 1.0])


def test_batch_norm_refuses_a_kernel_role_it_does_not_run(gen):
    """The emitted files pass their kernel copies by role; a misspelt role would silently run the originals."""
    x = randn((2, 3, 4, 4), gen)
    weight, bias, mean = randn(3, gen), randn(3, gen), randn(3, gen)
    var = randn(3, gen).abs() + 0.5
    with pytest.raises(ValueError, match=r"unknown kernel roles \['backward'\]"):
        batch_norm_forward(x, weight, bias, mean, var, kernels={"backward": None})
