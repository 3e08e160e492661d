"""Writes the golden outputs tests/golden/<net>.npz, one per net in nets/.

    .venv/bin/python tests/golden/regenerate.py            # every net
    .venv/bin/python tests/golden/regenerate.py lenet5     # some of them

For each net: the weights are `netdsl.runtime.weights.init_weights(netdsl.load_graph(nets/<net>.net),
seed=SEED, scheme="he")` (He's scheme, so that activations keep their size through the layers and the
output depends on every layer; the weights are data, not computation, so taking them from netdsl is
no loss of independence), except that the biases and batch-norm tensors, which that scheme leaves at
0 / the identity, get seeded numpy draws (`_varied`) so that bias adds and batch-norm folding are
tested too; AlexNet's fc8 is scaled by 1/16 (`LOGIT_GAIN`); the input is one image (batch 1) drawn from
numpy's generator seeded by (SEED, CRC-32 of the net's name), of standard deviation 1 and rounded to
multiples of 1/64, or pixel-like whole numbers of standard deviation 50 for AlexNet (`INPUTS`) (exact
in float32, and the files compress to less than half), and the expected output is what the hand-written PyTorch model of
tests/golden/models.py computes from them in float64. Each file holds `input` (float32,
1 x C x H x W), `output` (float64, the net's output for it), and `seed`, `scheme` and `net` to say how
it was made. Files are written with np.savez_compressed.

WHEN A GOLDEN MAY CHANGE. Regenerate a file only when what it records has changed:

- the net's meaning changed on purpose (its .net file computes something else: a layer, a parameter,
  a shape — and tests/golden/models.py was changed to match, by hand, from the intended meaning);
- SEED or the weight scheme changed here, or `netdsl.runtime.weights.init_weights` deliberately draws other
  numbers (a new weight-initialization rule is a data change);
- numpy's random stream changed (a numpy release that changes `default_rng` / `standard_normal`
  output; `test_golden` then fails on the stored input or weights, not on netdsl's output).

NEVER regenerate to make a failing netdsl test pass: the goldens come from the hand-written models,
not from netdsl, and a netdsl output that disagrees with them is a netdsl bug until shown otherwise.
Review the diff of models.py with any regenerated file; `test_golden` checks that each stored output
still equals the hand-written model re-run.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
NETS = HERE.parent.parent / "nets"
if __package__ in (None, ""):  # run as a script: make `golden.models` importable
    sys.path.insert(0, str(HERE.parent))

import netdsl  # noqa: E402
from golden.models import MODELS, build, run  # noqa: E402
from netdsl.runtime.weights import init_weights  # noqa: E402

SEED = 2012  # the weights' and the inputs' seed
SCHEME = "he"

# net -> (standard deviation, step) of its input; other nets: (1, 1/64). AlexNet is fed what the paper
# feeds it, 8-bit pixels minus the mean pixel: whole numbers, spread like an image's (std 50). At std 1
# the paper's LRN (alpha 1e-4, k 2) is nearly a constant factor 2^-0.75, and a wrong window, alpha or
# grouping would change the output by less than the tests' tolerance.
INPUTS = {"alexnet": (50.0, 1.0), "alexnet_1gpu": (50.0, 1.0)}
# net -> (layer, gain): that layer's weight and bias are multiplied by the gain (a power of two: exact),
# so that AlexNet's logits, which pixel-scale inputs make large (std ~35), have a std of about 2 and the
# softmax does not saturate (a saturated softmax hides errors in the logits).
LOGIT_GAIN = {"alexnet": ("fc8", 1 / 16), "alexnet_1gpu": ("fc8", 1 / 16)}


def net_path(net: str) -> Path:
    return NETS / f"{net}.net"


def golden_path(net: str) -> Path:
    return HERE / f"{net}.npz"


def golden_weights(net: str) -> dict[str, np.ndarray]:
    """The golden's weights: netdsl's deterministic He initialization of the net (seed SEED), with the
    tensors that scheme leaves constant drawn instead (see `_varied`)."""
    weights = _varied(init_weights(netdsl.load_graph(net_path(net)), seed=SEED, scheme=SCHEME))
    if net in LOGIT_GAIN:
        layer_name, gain = LOGIT_GAIN[net]
        for tensor in ("weight", "bias"):
            weights[f"{layer_name}.{tensor}"] = weights[f"{layer_name}.{tensor}"] * np.float32(gain)
    return weights


def _varied(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """He's scheme starts every bias at 0 and every batch norm at the identity (weight 1, bias 0, mean 0,
    var 1): a net that forgot its bias adds, or folded batch norm wrongly, would still match. So those
    tensors get seeded draws: conv/fc biases N(0, 0.1^2); batch norm weight U(0.5, 1.5), bias N(0, 0.1^2),
    running_mean N(0, 0.1^2), running_var U(1, 4) (which also keeps SimpleNet's softmax
    from saturating). A batch norm is a layer with a `running_var`."""
    batchnorms = {name.rsplit(".", 1)[0] for name in weights if name.endswith(".running_var")}
    varied = dict(weights)
    for name, value in weights.items():
        layer_name, tensor = name.rsplit(".", 1)
        rng = np.random.default_rng(np.random.SeedSequence([SEED, zlib.crc32(name.encode("utf-8")), 1]))
        if layer_name in batchnorms and tensor == "weight":
            draw = rng.uniform(0.5, 1.5, value.shape)
        elif layer_name in batchnorms and tensor == "running_var":
            draw = rng.uniform(1.0, 4.0, value.shape)
        elif tensor in ("bias", "running_mean"):
            draw = 0.1 * rng.standard_normal(value.shape)
        else:
            continue
        varied[name] = draw.astype(np.float32)
    return varied


def golden_input(net: str) -> np.ndarray:
    """The golden's input: 1 x C x H x W, normal values of mean 0 and standard deviation `std`, rounded
    to multiples of `step` (exact in float32), with (std, step) = INPUTS.get(net, (1, 1/64))."""
    _, shape = MODELS[net]
    std, step = INPUTS.get(net, (1.0, 1 / 64))
    rng = np.random.default_rng(np.random.SeedSequence([SEED, zlib.crc32(net.encode("utf-8"))]))
    values = rng.standard_normal((1, *shape)) * std
    return (np.round(values / step) * step).astype(np.float32)


def expected_output(net: str, x: np.ndarray, weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The hand-written model's output for `x`, computed in float64."""
    model = build(net, golden_weights(net) if weights is None else weights, dtype=torch.float64)
    return run(model, x.astype(np.float64))


def write(net: str) -> Path:
    x = golden_input(net)
    y = expected_output(net, x)
    path = golden_path(net)
    np.savez_compressed(path, input=x, output=y, seed=np.int64(SEED), scheme=np.str_(SCHEME), net=np.str_(net))
    return path


def main(argv: list[str]) -> int:
    nets = argv or list(MODELS)
    unknown = [net for net in nets if net not in MODELS]
    if unknown:
        print(f"unknown net {unknown[0]!r}; nets: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    for net in nets:
        path = write(net)
        with np.load(path) as golden:
            x, y = golden["input"], golden["output"]
        top = np.argsort(y[0])[::-1][:3]
        print(
            f"wrote {path.relative_to(HERE.parent.parent)}: {path.stat().st_size / 1024:.0f} KiB, "
            f"input {x.dtype} {x.shape}, output {y.dtype} {y.shape}, max |output| {np.abs(y).max():.4g}, "
            f"top-3 {top.tolist()}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
