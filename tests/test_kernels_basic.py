"""Softmax and elementwise kernels against PyTorch on fresh random inputs (on the GPU when there is one, else
under Triton's interpreter on the CPU).

The reference runs in fp32 on the same (already rounded) inputs and is rounded once to the kernel's dtype, so the
tolerances below only have to cover the kernel's own arithmetic and that last rounding.
"""

import zlib

import pytest
import torch
from kernel_support import DEVICE
from torch.nn import functional

from netdsl.codegen import elementwise as ew
from netdsl.codegen.softmax import softmax

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
}
DTYPES = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in TOLERANCES]

# Feature rows and maps: batch 1 and more, odd sizes, sizes that are not a multiple of any block.
ROW_SHAPES = [(1, 10), (3, 1000), (2, 4099)]
MAP_SHAPES = [(1, 7, 5, 5), (2, 21, 13, 11), (3, 5, 1, 1)]


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test's id: every test draws its own inputs, the same ones on every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def randn(shape, dtype, gen, scale=1.0, offset=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale + offset).to(DEVICE, dtype)


def check(actual: torch.Tensor, expected_fp32: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected_fp32.to(dtype).float(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES + MAP_SHAPES, ids=shape_id)
def test_softmax_matches_torch(shape, dtype, gen):
    x = randn(shape, dtype, gen, scale=3.0)
    check(softmax(x), torch.softmax(x.float(), dim=1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("scale", "offset"), [(1e4, 0.0), (1.0, 1e4), (1.0, -1e4)])
@pytest.mark.parametrize("shape", [(2, 4099), (2, 21, 13, 11)], ids=shape_id)
def test_softmax_is_safe_for_large_logits(shape, scale, offset, dtype, gen):
    x = randn(shape, dtype, gen, scale=scale, offset=offset)
    y = softmax(x)
    assert torch.isfinite(y).all()
    check(y, torch.softmax(x.float(), dim=1), dtype)


def test_softmax_writes_into_a_channel_slice(gen):
    x = randn((2, 6, 5, 3), torch.float32, gen)
    buffer = torch.full((2, 10, 5, 3), 7.0, device=DEVICE)
    softmax(x, out=buffer[:, 2:8])
    check(buffer[:, 2:8], torch.softmax(x, dim=1), torch.float32)
    assert (buffer[:, :2] == 7.0).all() and (buffer[:, 8:] == 7.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES[:2] + MAP_SHAPES, ids=shape_id)
def test_relu_and_leaky_relu_match_torch(shape, dtype, gen):
    x = randn(shape, dtype, gen)
    check(ew.relu(x), functional.relu(x.float()), dtype)
    check(ew.leaky_relu(x, slope=0.1), functional.leaky_relu(x.float(), negative_slope=0.1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu"])
@pytest.mark.parametrize("shape", [ROW_SHAPES[1], MAP_SHAPES[1]], ids=shape_id)
def test_add_matches_torch(shape, activation, dtype, gen):
    x, y = randn(shape, dtype, gen), randn(shape, dtype, gen)
    expected = x.float() + y.float()
    if activation == "relu":
        expected = functional.relu(expected)
    elif activation == "leaky_relu":
        expected = functional.leaky_relu(expected, negative_slope=0.01)
    check(ew.add(x, y, activation=activation), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("shape", [ROW_SHAPES[1], *MAP_SHAPES], ids=shape_id)
def test_batch_norm_matches_torch(shape, activation, dtype, gen):
    channels = shape[1]
    x = randn(shape, dtype, gen)
    mean, weight, bias = (torch.randn(channels, generator=gen).to(DEVICE) for _ in range(3))
    var = torch.rand(channels, generator=gen).to(DEVICE) + 0.5
    expected = functional.batch_norm(x.float(), mean, var, weight, bias, training=False, eps=1e-5)
    if activation == "relu":
        expected = functional.relu(expected)
    check(ew.batch_norm(x, mean, var, weight, bias, eps=1e-5, activation=activation), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [ROW_SHAPES[0], MAP_SHAPES[1]], ids=shape_id)
def test_concat_matches_torch_cat(shape, dtype, gen):
    widths = (3, 1, 4)
    parts = [randn((shape[0], width, *shape[2:]), dtype, gen) for width in widths]
    check(ew.concat(parts), torch.cat([part.float() for part in parts], dim=1), dtype)


def test_copy_and_activation_into_a_channel_slice_leave_the_rest_alone(gen):
    x = randn((2, 3, 4, 5), torch.float16, gen)
    buffer = torch.full((2, 8, 4, 5), 7.0, dtype=torch.float16, device=DEVICE)
    ew.relu(x, out=buffer[:, 4:7])
    check(buffer[:, 4:7], functional.relu(x.float()), torch.float16)
    assert (buffer[:, :4] == 7.0).all() and (buffer[:, 7:] == 7.0).all()


def test_inputs_that_are_strided_views(gen):
    big = randn((2, 9, 6, 7), torch.float32, gen)
    sliced = big[:, 1:8:2]  # channel stride 2 * H * W
    transposed = big[:, :4].transpose(2, 3)  # height and width do not fold: copied before the launch
    check(ew.add(sliced, transposed.transpose(2, 3)), sliced + big[:, :4], torch.float32)
    check(ew.relu(transposed), functional.relu(transposed), torch.float32)
    check(softmax(transposed), torch.softmax(transposed, dim=1), torch.float32)


def test_launchers_reject_bad_arguments(gen):
    x = randn((2, 3, 4, 4), torch.float32, gen)
    with pytest.raises(ValueError, match="op must be"):
        ew.elementwise(x, "mul")
    with pytest.raises(ValueError, match="add needs"):
        ew.add(x, randn((2, 3, 4, 5), torch.float32, gen))
    with pytest.raises(ValueError, match="scale"):
        ew.affine(x, randn((4,), torch.float32, gen), randn((3,), torch.float32, gen))
    with pytest.raises(TypeError, match="softmax supports"):
        softmax(x.double())
    with pytest.raises(ValueError, match="out is"):
        softmax(x, out=torch.empty(2, 3, 4, 5, device=DEVICE))


def test_the_interpreter_rounds_float32_to_bf16_as_a_gpu_does():
    """Under the interpreter (patched by netdsl.codegen) a float32 -> bf16 cast rounds to nearest even, bit
    for bit as PyTorch's, NaN and infinities included; unpatched it truncates towards zero."""
    import triton
    import triton.language as tl

    from netdsl.codegen.interpret import interpreting

    if not interpreting():
        pytest.skip("the interpreter's casts only")

    @triton.jit
    def cast(x, y, SIZE: tl.constexpr):  # noqa: N803 -- a constexpr, named as the kernels name theirs
        offsets = tl.arange(0, SIZE)
        tl.store(y + offsets, tl.load(x + offsets).to(tl.bfloat16))

    x = torch.randn(4096, generator=torch.Generator().manual_seed(3)) * 100
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38])  # the last rounds up to inf
    y = torch.empty(4096, dtype=torch.bfloat16)
    cast[(1,)](x, y, SIZE=4096)
    want = x.to(torch.bfloat16)
    assert torch.isnan(y[0]) and torch.equal(y[1:].view(torch.int16), want[1:].view(torch.int16))


def test_the_interpreter_skips_only_overflow_checks_that_cannot_report():
    """Triton's interpreter works out an overflow check for each 32-bit integer add, subtract and multiply,
    and reports one only in debug mode, which it never turns on: netdsl.codegen turns the checks off (about
    half of a conv kernel's time there), results unchanged, and leaves them on where debug is on."""
    import dataclasses

    import triton
    import triton.language as tl

    from netdsl.codegen.interpret import interpreting, skip_dead_overflow_checks

    if not interpreting():
        pytest.skip("the interpreter's settings only")
    from triton.runtime import interpreter
    from triton.runtime.errors import InterpreterError

    @triton.jit
    def times(x, y, factor, SIZE: tl.constexpr):  # noqa: N803 -- a constexpr, named as the kernels name theirs
        offsets = tl.arange(0, SIZE)
        tl.store(y + offsets, tl.load(x + offsets) * factor)

    def run(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        times[(1,)](x, y, 65536, SIZE=x.numel())
        return y

    builder = interpreter.interpreter_builder
    assert builder.options.sanitize_overflow is False and builder.options.debug is False
    x = torch.randint(-(2**20), 2**20, (64,), dtype=torch.int32, generator=torch.Generator().manual_seed(5))
    wrapped = ((x.long() * 65536 + 2**31) % 2**32 - 2**31).int()  # two's complement, as a GPU's multiply
    assert (x.long() * 65536 != wrapped.long()).sum() > 32  # most of them overflow
    assert torch.equal(run(x), wrapped)
    original = builder.options
    try:
        builder.options = dataclasses.replace(original, sanitize_overflow=True)  # Triton's own default
        assert torch.equal(run(x), wrapped)  # checked, and not reported
        builder.options = dataclasses.replace(original, sanitize_overflow=True, debug=True)
        assert skip_dead_overflow_checks() is False and builder.options.sanitize_overflow
        with pytest.raises(InterpreterError, match="int32 overflow"):
            run(x)

        @dataclasses.dataclass(frozen=True)
        class NoDebugSwitch:  # a Triton whose interpreter could not be told to stay quiet: the checks stay
            sanitize_overflow: bool = True

        builder.options = NoDebugSwitch()
        assert skip_dead_overflow_checks() is False and builder.options.sanitize_overflow
    finally:
        builder.options = original
