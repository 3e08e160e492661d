"""Test-wide set-up: without a GPU, Triton kernels run under Triton's interpreter on the CPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from netdsl.codegen.interpret import widen_bf16_dots  # after the variable is set

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # pytest-xdist's processes (`-n N`) each run one test at a time: one thread each, so that N of them share
    # N cores without PyTorch's thread pools taking turns on them (a process a test starts inherits it too)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_curves(monkeypatch, request):
    """A run's curves.png, drawn by matplotlib at the end of a run (and of an epoch, now and then) of every
    in-process training, costs the suite about half a minute and is read by none of its tests but those that
    ask for `curves` (which draw it, and check it)."""
    if "curves" not in request.fixturenames:
        monkeypatch.setattr("netdsl.train.runs.plot_curves", lambda path, epochs: False)


@pytest.fixture
def curves():
    """The real curves.png (see `no_curves`)."""


@pytest.fixture
def interpreter_bf16_dot():
    """Triton's interpreter multiplies bf16 dot operands as raw bits (triton-lang/triton#11584); importing
    netdsl.codegen widens them to fp32 first (codegen/interpret.py). Tests of bf16 dots check it is so."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert widen_bf16_dots()


@pytest.fixture(scope="module")
def weights():
    """net -> the weights of its golden (tests/golden/regenerate.py), made once per test module:
    VGG-16's take a second and half a GB, so they are dropped when the module is done."""
    from golden.regenerate import golden_weights

    cache = {}

    def get(net: str):
        if net not in cache:
            cache[net] = golden_weights(net)
        return cache[net]

    yield get
    cache.clear()
