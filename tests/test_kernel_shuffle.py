"""The channel shuffle kernel (codegen/shuffle.py) against PyTorch on fresh random inputs (on the GPU when there is
one, else under Triton's interpreter on the CPU): NCHW, channels-last and strided maps, outputs written into a
channel slice, every dtype. A shuffle only moves values, so the results must be equal bit for bit."""

import zlib

import pytest
import torch
from kernel_support import DEVICE

from netdsl.codegen.shuffle import CONFIGS, pick_config, shuffle

DTYPES = [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in (torch.float32, torch.float16)]
DTYPES.append(pytest.param(torch.bfloat16, id="bfloat16"))
# (N, C, H, W) and groups: one group and one channel per group (both the identity), odd sizes, a 1 x 1 map,
# more channels than one tile holds.
CASES = [
    ((2, 12, 5, 7), 3),
    ((1, 8, 1, 1), 2),
    ((3, 6, 4, 4), 6),
    ((2, 10, 3, 2), 1),
    ((1, 24, 9, 9), 4),
    ((2, 1040, 1, 2), 8),
]


def case_id(case) -> str:
    (n, c, h, w), groups = case
    return f"{n}x{c}x{h}x{w}-g{groups}"


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def by_hand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """PyTorch's own: torch.nn.ChannelShuffle, which is x.view(N, g, C/g, H, W).transpose(1, 2) laid out again."""
    return torch.nn.ChannelShuffle(groups)(x.cpu()).contiguous()


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """`x` as NCHW, channels-last, and a view whose rows are two apart (its H and W do not fold into one axis)."""
    n, c, h, w = x.shape
    spaced = torch.zeros(n, c, 2 * h, w, dtype=x.dtype, device=x.device)
    spaced[:, :, ::2] = x
    return {
        "nchw": x.contiguous(),
        "nhwc": x.contiguous(memory_format=torch.channels_last),
        "strided": spaced[:, :, ::2],
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_shuffle_matches_torch_in_every_layout(case, dtype, gen):
    shape, groups = case
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    want = by_hand(x, groups)
    for name, source in layouts(x).items():
        got = shuffle(source, groups)
        assert got.stride() == torch.empty_like(source).stride(), name  # the output keeps the input's layout
        assert torch.equal(got.cpu(), want), name


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_shuffle_writes_into_a_channel_slice_of_any_layout(layout, gen):
    x = torch.randn(2, 12, 3, 5, generator=gen).to(DEVICE)
    buffer = torch.full((2, 20, 3, 5), 7.0, device=DEVICE)
    if layout == "nhwc":
        buffer = buffer.contiguous(memory_format=torch.channels_last)
    source = layouts(x)[layout]
    shuffle(source, 4, out=buffer[:, 5:17])
    assert torch.equal(buffer[:, 5:17].cpu(), by_hand(x, 4))
    assert (buffer[:, :5] == 7.0).all() and (buffer[:, 17:] == 7.0).all()


def test_shuffle_reads_a_channel_slice(gen):
    """A map that is part of a larger buffer (a concat's slice) is read in place."""
    big = torch.randn(2, 16, 4, 4, generator=gen).to(DEVICE)
    assert torch.equal(shuffle(big[:, 4:12], 2).cpu(), by_hand(big[:, 4:12], 2))


def test_tiles_follow_the_contiguous_axis():
    assert pick_config(12, 35, channels_last=False).BLOCK_S == 64
    assert pick_config(12, 35, channels_last=True).BLOCK_C == 16
    assert pick_config(3000, 1, channels_last=True).BLOCK_C == 1024
    assert pick_config(4, 100_000, channels_last=False).BLOCK_S == 1024
    assert all(config.BLOCK_C * config.BLOCK_S == 1024 for config in CONFIGS)


def test_launcher_errors():
    x = torch.zeros(1, 12, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="12 channels cannot be shuffled in 5 groups: C must be a multiple of groups"):
        shuffle(x, 5)
    with pytest.raises(ValueError, match="cannot be shuffled in 0 groups"):
        shuffle(x, 0)
    with pytest.raises(ValueError, match=r"shuffle takes \[N, C, H, W\]"):
        shuffle(torch.zeros(2, 12, device=DEVICE), 3)
    with pytest.raises(TypeError, match="shuffle supports"):
        shuffle(x.to(torch.int32), 3)
    with pytest.raises(ValueError, match="out is"):
        shuffle(x, 3, out=torch.zeros(1, 12, 2, 3, device=DEVICE))
