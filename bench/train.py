"""How fast is a training step? netdsl's step (the net's layer graph under autograd, `GraphModule`; softmax
cross-entropy on the logits; the paper's SGD) against a hand-written PyTorch loop on the same machine, in
the same run: the independent models of tests/golden/models.py in training mode, `torch.optim.SGD`.

    python bench/train.py                        # CPU: lenet5 and simplenet at batch 64, alexnet at batch 4
    python bench/train.py --nets lenet5 --batch 128 --steps 20
    python bench/train.py --nets simplenet --recompute none,cheap,all   # what running layers again costs
    python bench/train.py --gpu                  # a GPU: AlexNet at batch 128 in bf16, also under torch.compile
    python bench/train.py --smoke                # tiny sizes: the code path runs, the numbers mean nothing

Each row times `--steps` steps after `--warmup` untimed ones on fresh seeded random images and labels, the
median of `--repeats` repetitions; images/s is batch / step time. The ratio is the hand-written loop's time
over netdsl's: above 1.0, netdsl is faster. Data loading is not included: bench/train_data.py measures the
loader (decoded and augmented images/s per worker), which must outrun the step.

`--smoke` sets the nets, the batch and the step counts itself (those flags are refused with it). `--gpu`
without a GPU says so before the CPU table and exits with status 4 (with `--smoke`: the GPU table is skipped).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # the hand-written models
sys.path.insert(0, str(ROOT / "bench"))

from arguments import non_negative_int, positive_int, recompute_modes, settle_smoke  # noqa: E402
from golden.models import MODELS  # noqa: E402
from timing import no_gpu  # noqa: E402

import netdsl  # noqa: E402
from netdsl.runtime.module import GraphModule  # noqa: E402
from netdsl.runtime.weights import init_weights  # noqa: E402
from netdsl.tables import format_table  # noqa: E402
from netdsl.train.optim import make_optimizer, param_groups, set_learning_rate  # noqa: E402

CPU_BATCH = {"lenet5": 64, "simplenet": 64, "alexnet": 4}


def _data(shape: tuple[int, ...], batch: int, classes: int, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *shape), generator=generator).to(device)
    y = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return x, y


def _netdsl_step(net: str, batch: int, device: str, dtype: str | None, recompute: str = "none"):
    graph = netdsl.load_graph(ROOT / "nets" / f"{net}.net")
    module = GraphModule(graph, devices=device, init="he", recompute=recompute).train()
    groups = param_groups(module.named_parameters(), [], [])
    optimizer = make_optimizer("sgd", groups, 0.001, momentum=0.9, weight_decay=0.0005)
    x, y = _data(MODELS[net][1], batch, graph.nodes[graph.graph["outputs"][0]]["layer"].shape[0], device)

    def step():
        set_learning_rate(optimizer, 0.001)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            logits = module.logits(x).float().flatten(1)
        F.cross_entropy(logits, y).backward()
        optimizer.step()

    return step


def _torch_step(net: str, batch: int, device: str, dtype: str | None, compile_it: bool = False):
    cls, shape = MODELS[net]
    graph = netdsl.load_graph(ROOT / "nets" / f"{net}.net")
    model = cls().load(init_weights(graph, seed=0, scheme="he")).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9, weight_decay=0.0005)
    forward = torch.compile(model) if compile_it else model
    out = graph.nodes[graph.graph["outputs"][0]]["layer"]
    ends_in_softmax = out.op == "softmax"
    x, y = _data(shape, batch, out.shape[0], device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            scores = forward(x).float()
        # the hand-written models end in softmax where the net does: the loss takes log-probabilities then
        loss = F.nll_loss(scores.clamp_min(1e-30).log(), y) if ends_in_softmax else F.cross_entropy(scores, y)
        loss.backward()
        optimizer.step()

    return step


def _autocast(device: str, dtype: str | None):
    if dtype is None:
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def _time(step, steps: int, warmup: int, repeats: int, device: str) -> float:
    """Median ms per step."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - began) * 1e3 / steps)
    return statistics.median(times)


def cpu_table(
    nets: list[str], batches: dict[str, int], steps: int, warmup: int, repeats: int, modes: tuple[str, ...] = ("none",)
) -> list[str]:
    """A row per net and `recompute` setting (the hand-written loop timed once per net)."""
    rows = []
    for net in nets:
        batch = batches[net]
        theirs = _time(_torch_step(net, batch, "cpu", None), steps, warmup, repeats, "cpu")
        for mode in modes:
            ours = _time(_netdsl_step(net, batch, "cpu", None, mode), steps, warmup, repeats, "cpu")
            rows.append(
                (net, str(batch), mode, f"{ours:,.1f}", f"{batch * 1e3 / ours:,.0f}", f"{theirs:,.1f}",
                 f"{batch * 1e3 / theirs:,.0f}", f"{theirs / ours:.2f}x")
            )  # fmt: skip
    header = ("net", "batch", "recompute", "netdsl ms/step", "netdsl img/s", "PyTorch ms/step", "PyTorch img/s",
              "ratio")  # fmt: skip
    return format_table(header, rows, left={0, 2})


def gpu_table(
    batch: int, dtype: str, steps: int, warmup: int, repeats: int, modes: tuple[str, ...] = ("none",)
) -> list[str]:
    """AlexNet's step: netdsl's with each `recompute` setting, PyTorch eager's and torch.compile's."""
    rows = []
    ours = [
        ("netdsl (GraphModule)" + (f", recompute {mode}" if mode != "none" else ""),
         _netdsl_step("alexnet", batch, "cuda", dtype, mode))
        for mode in modes
    ]  # fmt: skip
    for name, step in (
        *ours,
        ("PyTorch eager", _torch_step("alexnet", batch, "cuda", dtype)),
        ("torch.compile", _torch_step("alexnet", batch, "cuda", dtype, compile_it=True)),
    ):
        ms = _time(step, steps, warmup, repeats, "cuda")
        rows.append((name, f"{ms:,.2f}", f"{batch * 1e3 / ms:,.0f}"))
    return format_table((f"AlexNet, batch {batch}, {dtype}", "ms/step", "img/s"), rows, left={0})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", help="comma-separated nets of nets/ (default lenet5,simplenet,alexnet)")
    parser.add_argument("--batch", type=positive_int, help="one batch for every net (default: 64, alexnet 4)")
    parser.add_argument("--steps", type=positive_int, help="timed steps per repetition (default 10)")
    parser.add_argument("--warmup", type=non_negative_int, help="untimed steps first (default 3)")
    parser.add_argument("--repeats", type=positive_int, help="repetitions; the median is reported (default 3)")
    parser.add_argument(
        "--recompute",
        type=recompute_modes,
        default=("none",),
        help="netdsl's `recompute` settings, a row each (default none)",
    )
    parser.add_argument("--gpu", action="store_true", help="AlexNet at --gpu-batch in bf16 on a GPU")
    parser.add_argument("--gpu-batch", type=positive_int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one step: checks the code path only")
    args = parser.parse_args(argv)
    # --batch stays None where not given: each net's own batch (CPU_BATCH)
    defaults = {"nets": "lenet5,simplenet,alexnet", "batch": None, "steps": 10, "warmup": 3, "repeats": 3}
    settle_smoke(parser, args, defaults, "the nets, the batch and the step counts")
    nets = args.nets.split(",")
    unknown = [net for net in nets if net not in MODELS]
    if unknown:
        parser.error(f"no hand-written model for: {', '.join(unknown)} (nets: {', '.join(sorted(MODELS))})")
    batches = {net: args.batch or CPU_BATCH.get(net, 32) for net in nets}
    steps, warmup, repeats = args.steps, args.warmup, args.repeats
    if args.smoke:
        nets, batches, steps, warmup, repeats = ["lenet5"], {"lenet5": 2}, 1, 1, 1
    command = shlex.join(["python", "bench/train.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# training step: netdsl vs a hand-written PyTorch loop; reproduce: {command}")
    gpu = args.gpu and torch.cuda.is_available()
    if args.gpu and not gpu and not args.smoke:  # before minutes of the CPU table
        return no_gpu("--gpu: run this on a machine with one, or leave out --gpu for the CPU table")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {repeats} x {steps} steps after {warmup} warm-up"
    )
    print("\n".join(cpu_table(nets, batches, steps, warmup, repeats, args.recompute)))
    if gpu:
        print(f"\n# {torch.cuda.get_device_name()}")
        print("\n".join(gpu_table(args.gpu_batch, "bf16", steps, warmup, repeats, args.recompute)))
    elif args.gpu:
        print("no CUDA GPU here: the GPU table is skipped (--smoke)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
