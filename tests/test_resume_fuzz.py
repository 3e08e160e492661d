"""Fuzzing `netdsl train --resume`: a run stopped and resumed trains exactly as the run that never stopped.

Each case draws (seeded) a tiny net with dropout and batch norm, a tiny .npz data set with a validation part
and a recipe: sgd (momentum, Nesterov, weight decay, lr and decay multipliers) or adamw; a constant, step,
multistep, cosine, poly, exp, inv or plateau schedule with or without a warm-up; --steps or --epochs; --val-every,
--keep-best, --clip-grad, --label-smoothing, fp32, bf16 or fp16 (loss scaling), batches in two parts or whole;
random crops, flips, PCA colour noise, colour jitter and rotation, the mean and std measured or not; no loading
process or one; and, drawn later, recompute, early stopping, an average of the weights, mixed batches,
checkpoints every few steps, images scaled to a size drawn per presentation (scale jittering) or random-resized
crops.
It trains the recipe straight through, then again with one or more stops:

- `signal`: SIGTERM during step k (the run ends the step, checkpoints and exits 143), k anywhere, an
  epoch's last step and the run's final one included;
- `validation`: SIGTERM while the end of the epoch that step k ends validates (the run stops after the next
  step), also the end a resume does after a stop during that step;
- `short`: the run (re)started with a shorter --steps (or --epochs) that ends at step k, then resumed with
  the longer one (only for schedules that do not follow the run's length: not cosine),
- `crash`: the run dies as step k begins, with no signal and no checkpoint (with `--checkpoint-every`): it
  resumes from the latest checkpoint and takes the steps after it again (or starts again, with none yet),

each followed by `netdsl train --resume RUN`, and requires the two run folders to hold the same training bit
for bit: metrics.jsonl less images/s (a `short` stop adds the records of the run that ended there: its last
step's line and its last weights' validation), weights.safetensors, the same checkpoint files, and in each
checkpoint the weights, the optimizer's state, every random generator's state, the run's record (epoch, step,
sums, schedule state, best checkpoints; the recipe's values, not where they came from) and the preprocessing.
Resuming a finished run must change nothing.

Everything runs in this process (the CLI's `main`) on the torch backend, on one thread, except a named case on
the triton backend (and, from NETDSL_FUZZ_SCALE=4 on, one random case per 4 of the scale); curves.png is not
drawn (matplotlib's layout costs most of a tiny run; it is drawn from metrics.jsonl, compared here).
NETDSL_FUZZ_SCALE (default 1) multiplies the number of cases; NETDSL_FUZZ_SEED picks other cases. A failing
case prints itself; every defect a campaign found is a named test at the end.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from netdsl.cli.main import main
from netdsl.train import loop
from netdsl.train.checkpoint import load_checkpoint
from netdsl.train.loop import Trainer
from netdsl.train.runs import MEASURED

SCALE = float(os.environ.get("NETDSL_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("NETDSL_FUZZ_SEED", "0"))
CASES = max(1, round(5 * SCALE))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets run on one thread: two threads of torch fight each other and any other process for 2 busy cores
    (the fuzzer took 2-3 times as long). Both runs of a case take the same, so their bits may be compared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a case ---------------------------------------------------------------------------------------------------


@dataclass
class Stop:
    kind: str  # "signal", "validation", "short" or "crash"
    step: int  # signal: during this step (from 1); validation: of the epoch it ends; short: the shorter run's last;
    # crash: the run dies as this step begins, without a signal or a checkpoint (it goes on from the latest)
    epochs: bool = False  # short: given as --epochs (the step ends an epoch), not --steps


@dataclass
class Case:
    net: str  # the .net text
    images: int  # training images
    val_images: int  # x_val's images (0: none; the validation part is split off by --val-fraction)
    size: int  # the data's images are size x size (the net's input or larger: crop room with --resize)
    classes: int
    flags: list[str]  # the recipe, less the run's length
    steps: int | None  # the run's length: --steps, or --epochs
    epochs: int | None
    stops: list[Stop] = field(default_factory=list)
    seed: int = 0  # the data's

    @property
    def steps_per_epoch(self) -> int:
        """Full batches of the training part: each class's n images (the labels are arange(images) % classes,
        shuffled) less the round(n * val_fraction) held out (at least one, never all: docs/training.md's split)."""
        fraction = float(flag(self.flags, "--val-fraction"))
        kept = 0
        for label in range(self.classes):
            count = len(range(label, self.images, self.classes))
            held = min(count - 1, max(int(fraction > 0), round(count * fraction))) if not self.val_images else 0
            kept += count - held
        return kept // int(flag(self.flags, "--batch"))

    @property
    def total(self) -> int:
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch


def flag(flags: list[str], name: str, default=None):
    return flags[flags.index(name) + 1] if name in flags else default


def draw_net(rng: random.Random, channels: int, size: int, classes: int) -> str:
    """A tiny net: one or two convs (batch norm, max-pooling), an fc with dropout, sometimes two towers."""
    lines = ["net fuzz"]
    towers = rng.random() < 0.2
    if towers:
        lines.append("device gpu0, gpu1")
    lines.append(f"input image: {channels} x {size} x {size}")
    indent = "    " if towers else ""
    body = []
    chain = f"conv(image, {rng.randint(2, 4)}, size=3, pad=1)"
    chain += " | batchnorm" if rng.random() < 0.7 else ""
    chain += " | relu | maxpool(2)" if rng.random() < 0.7 else " | relu"
    body.append(f"c1 = {chain}")
    previous = "c1"
    if rng.random() < 0.3:
        body.append(f"c2 = conv(c1, {rng.randint(2, 4)}, size=3, pad=1) | relu")
        previous = "c2"
    fc_input = f"all {previous}" if towers else previous
    hidden = f"fc({fc_input}, {rng.randint(4, 8)})"
    hidden += " | batchnorm" if rng.random() < 0.3 else ""
    hidden += f" | relu | dropout({rng.choice([0.2, 0.5])})"
    body.append(f"f = {hidden}")
    if towers:
        lines.append("towers gpu0, gpu1 {")
    lines += [indent + line for line in body]
    if towers:
        lines.append("}")
    out_input = "all f" if towers else "f"
    lines.append(f"out = fc({out_input}, {classes})" + (" on gpu0" if towers else ""))
    if rng.random() < 0.3:
        lines += ["prob = softmax(out)", "output prob"]
    else:
        lines.append("output out")
    return "\n".join(lines) + "\n"


def draw_case(rng: random.Random, kernels: bool = False) -> Case:
    """A random case; `kernels`: on the triton backend (under the interpreter on a CPU), fp32, at most 4 steps."""
    channels = rng.choice([1, 3, 3])
    net_size = rng.choice([6, 8])
    classes = rng.randint(3, 5)
    batch = rng.choice([4, 6, 8])
    steps_per_epoch = rng.randint(2, 4)
    if kernels:
        net_size, batch, steps_per_epoch = 6, 4, 2
    val_images = rng.choice([0, 0, 5])
    val_fraction = rng.choice([0.2, 0.3]) if val_images == 0 else 0.0
    # enough images for steps_per_epoch batches after the validation split (drop_last: a few more are fine)
    images = round(batch * steps_per_epoch / (1 - val_fraction)) + classes + rng.randint(0, batch // 2)
    size = net_size + rng.choice([0, 0, 2])
    flags = ["--batch", str(batch), "--seed", str(rng.randint(0, 2**32 - 1)), "--init", rng.choice(["he", "paper"])]
    flags += ["--val-fraction", str(val_fraction), "--log-every", str(rng.randint(1, 4))]
    flags += ["--workers", "1" if rng.random() < 0.1 else "0"]  # a loading process: the same batches
    # the optimizer
    if rng.random() < 0.7:
        momentum = rng.choice([0.0, 0.5, 0.9, 0.9])
        flags += ["--optimizer", "sgd", "--lr", str(rng.choice([0.01, 0.05, 0.1])), "--momentum", str(momentum)]
        if momentum and rng.random() < 0.4:
            flags.append("--nesterov")
    else:
        flags += ["--optimizer", "adamw", "--lr", str(rng.choice([0.001, 0.01])), "--betas", "0.8,0.99"]
        flags += ["--eps", str(rng.choice([1e-8, 1e-6]))]
    flags += ["--weight-decay", str(rng.choice([0.0, 0.0005, 0.01]))]
    if rng.random() < 0.4:  # `f*`: a tower's weights are f@gpu0.weight, ...
        flags += ["--lr-mult", f"{rng.choice(['f*', 'c1*', '*.bias'])}={rng.choice([0, 0.5, 2])}"]
    if rng.random() < 0.4:
        flags += ["--decay-mult", "*.bias=0"]
    # the schedule
    schedule = rng.choice(["constant", "step", "multistep", "cosine", "plateau", "plateau", "inv", "exp"])
    flags += ["--schedule", schedule, "--gamma", str(rng.choice([0.1, 0.5]))]
    if schedule == "step":
        flags += ["--step-epochs", str(rng.randint(1, 2))]
    elif schedule == "multistep":
        flags += ["--milestones", rng.choice(["1", "1,2", "2,3"])]
    elif schedule == "cosine":
        flags += ["--cosine-floor", str(rng.choice([0.0, 0.1]))]
    elif schedule == "inv":  # Caffe's, counting the steps across a resume
        flags += ["--power", str(rng.choice([0.75, 2.0]))]
    elif schedule == "plateau":
        flags += ["--patience", str(rng.randint(0, 1)), "--threshold", str(rng.choice([0.0, 0.1, 0.5]))]
        flags += ["--max-drops", rng.choice(["0", "1", "2", "none"])]
    if rng.random() < 0.4:
        flags += ["--warmup-epochs", str(rng.choice([0.5, 1, 1.5]))]
    # validation, the rest of the step
    flags += ["--val-every", str(rng.choice([1, 1, 2])), "--keep-best", str(rng.choice([0, 1, 2, 3]))]
    flags += ["--views", rng.choice(["1", "1", "10"])]
    if rng.random() < 0.4:
        flags += ["--clip-grad", str(rng.choice([0.1, 1.0, 5.0]))]
    if rng.random() < 0.4:
        flags += ["--label-smoothing", str(rng.choice([0.1, 0.3]))]
    dtype = rng.choice(["fp32", "fp32", "fp32", "fp32", "bf16", "bf16", "fp16"])
    flags += ["--dtype", "fp32", "--backend", "triton"] if kernels else ["--dtype", dtype]
    # the data's augmentation and normalization
    flags.append(rng.choice(["--flip", "--no-flip"]))
    flags += ["--pca-noise", str(rng.choice([0.0, 0.1, 0.5]))]
    if rng.random() < 0.3:  # Darknet's colour jitter: hue and saturation on colour images only
        flags += ["--exposure", "1.5", *(["--saturation", "1.5", "--hue", "0.1"] if channels == 3 else [])]
        flags += ["--angle", str(rng.choice([0, 7, 30]))]
    flags += ["--mean", rng.choice(["auto", "none"]), "--std", rng.choice(["auto", "false"])]
    if size > net_size:
        flags += ["--resize", str(size)]  # the shorter side stays `size`: random crops of the net's input
    case = Case(draw_net(rng, channels, net_size, classes), images, val_images, size, classes, flags, None, None)
    case.seed = rng.randint(0, 10**6)
    per = case.steps_per_epoch
    epochs = rng.randint(2, max(2, (4 if kernels else 12) // per))
    if rng.random() < 0.5:
        case.steps = rng.randint(per + 1, epochs * per)
    else:
        case.epochs = epochs
    case.stops = draw_stops(rng, case, schedule)
    if rng.random() < 0.3:  # drawn last: the cases drawn before parts existed stay as they were
        case.flags += ["--accumulate", "2"]  # every batch drawn is even
    if rng.random() < 0.3:  # likewise drawn after what was there before
        case.flags += ["--recompute", rng.choice(["cheap", "all"])]
    if rng.random() < 0.3 and (case.val_images or float(flag(case.flags, "--val-fraction"))):
        case.flags += ["--early-stop", str(rng.randint(1, 2))]  # where it stops, the straight run tells
    if rng.random() < 0.3:
        case.flags += ["--ema", str(rng.choice([0.5, 0.9, 0.99]))]
    if rng.random() < 0.3:
        case.flags += rng.choice([["--mixup", "0.4"], ["--cutmix", "1"], ["--mixup", "1", "--cutmix", "1"]])
    if rng.random() < 0.3:  # checkpoints inside epochs too: the stops resume from the latest
        case.flags += ["--checkpoint-every", str(rng.randint(1, 3))]
        # not at another stop's step, nor the step after a stop during validation (its run ends after that step)
        taken = {stop.step for stop in case.stops} | {stop.step + 1 for stop in case.stops if stop.kind == "validation"}
        free = [step for step in range(1, case.total + 1) if step not in taken]
        if free and rng.random() < 0.7:
            case.stops = sorted([*case.stops, Stop("crash", rng.choice(free))], key=lambda stop: stop.step)
    if schedule == "cosine" and rng.random() < 0.5:  # the other schedule that follows the run's length (no short stops)
        case.flags[case.flags.index("--schedule") + 1] = "poly"
        at = case.flags.index("--cosine-floor")
        case.flags[at : at + 2] = ["--power", str(rng.choice([0.5, 1.0, 2.0]))]
    if rng.random() < 0.25:  # scale jittering: the shorter side drawn for each presentation, up to the net's + 4
        if "--resize" in case.flags:
            del case.flags[case.flags.index("--resize") : case.flags.index("--resize") + 2]
        case.flags += ["--resize", f"{net_size},{net_size + rng.randint(1, 4)}"]
    elif rng.random() < 0.25:  # random-resized crops: boxes of the stored images, scaled to the net's input
        case.flags += [
            "--crop-area",
            rng.choice(["0.08,1", "0.5,1"]),
            "--crop-aspect",
            rng.choice(["0.75,1.3333", "0.5,2"]),
        ]
    if case.val_images and rng.random() < 0.3:  # the validation images in a file apart (`write_inputs` names it)
        case.flags += ["--val-data", "val.npz"]
    return case


def draw_stops(rng: random.Random, case: Case, schedule: str) -> list[Stop]:
    """One to three stops at distinct steps, often at an epoch's end (where validation and the plateau watch
    run) and at the run's last step; a stop during an epoch's last step may be followed by one during the
    validation its resume does."""
    total, per = case.total, case.steps_per_epoch
    ends = list(range(per, total + 1, per))
    chosen: set[int] = set()
    for _ in range(rng.choice([1, 1, 2, 3])):
        chosen.add(rng.choice([*ends, total]) if rng.random() < 0.5 else rng.randint(1, total))
    stops: list[Stop] = []
    reached = 0  # the step the stops so far leave the run at
    for step in sorted(chosen):
        validates = step % per == 0 and (step // per) % int(flag(case.flags, "--val-every")) == 0
        kinds = ["signal", "signal"] if step > reached else []  # a step a resume still takes
        if validates:
            kinds += ["validation", "validation"]
        if step < total and schedule != "cosine":
            kinds += ["short", "short"]
        if not kinds:
            continue
        kind = rng.choice(kinds)
        by_epochs = kind == "short" and case.epochs is not None and step % per == 0 and rng.random() < 0.5
        stops.append(Stop(kind, step, epochs=by_epochs))
        if kind == "signal" and validates and rng.random() < 0.3:
            stops.append(Stop("validation", step))  # during the validation the resume does for that epoch's end
        reached = min(step + 1, total) if stops[-1].kind == "validation" else step  # it stops after the next step
    return stops


# --- running a case -------------------------------------------------------------------------------------------


def train(*args) -> int:
    return main(["train", *map(str, args)])


def write_inputs(folder: Path, case: Case) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    net = folder / "fuzz.net"
    net.write_text(case.net)
    channels = int(case.net.split("input image: ")[1].split(" x ")[0])
    rng = np.random.default_rng(case.seed)
    shape = (channels, case.size, case.size)
    arrays = {
        "x": rng.integers(0, 256, (case.images, *shape), dtype=np.uint8),
        "y": rng.permutation(np.arange(case.images) % case.classes),
    }
    if case.val_images:
        arrays["x_val"] = rng.integers(0, 256, (case.val_images, *shape), dtype=np.uint8)
        arrays["y_val"] = rng.integers(0, case.classes, case.val_images)
    if "--val-data" in case.flags:  # --val-data: the same images, as x and y of a file of their own
        np.savez(folder / "val.npz", x=arrays.pop("x_val"), y=arrays.pop("y_val"))
        case.flags[case.flags.index("--val-data") + 1] = str(folder / "val.npz")
    data = folder / "data.npz"
    np.savez(data, **arrays)
    return net, data


class CrashError(Exception):
    """A run dying as a machine fault kills it: no signal handler, no checkpoint."""


class Signals:
    """SIGTERM as the run's signal handler would see it: during a step (after its update, as stop_during_step in
    test_train_loop.py), or while an epoch's end validates."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.during_step: int | None = None
        self.during_validation: int | None = None  # the step that ends the epoch whose validation is stopped
        self.crash: int | None = None  # the step as which the run dies
        step, validate = Trainer._train_step, Trainer.validate
        signals = self

        def step_then_signal(trainer, x, y):
            if trainer.step + 1 == signals.crash:
                signals.crash = None
                raise CrashError(f"at step {trainer.step + 1}")
            result = step(trainer, x, y)
            if trainer.step + 1 == signals.during_step:
                trainer._signal = signal.SIGTERM
            return result

        def validate_then_signal(trainer):
            tally = validate(trainer)
            if trainer.step == signals.during_validation and trainer.batch_in_epoch == trainer.steps_per_epoch:
                trainer._signal = signal.SIGTERM
                signals.during_validation = None
            return tally

        monkeypatch.setattr(Trainer, "_train_step", step_then_signal)
        monkeypatch.setattr(Trainer, "validate", validate_then_signal)
        monkeypatch.setattr("netdsl.train.runs.plot_curves", lambda path, epochs: None)


def length_flags(case: Case, stop: Stop | None) -> list[str]:
    """The run's length for a call that ends at `stop` (a short one) or at the end of the run."""
    if stop is None:
        return ["--steps", case.steps] if case.steps is not None else ["--epochs", case.epochs, "--steps", "none"]
    if stop.epochs:
        return ["--epochs", stop.step // case.steps_per_epoch, "--steps", "none"]
    return ["--steps", stop.step] + (["--epochs", case.epochs] if case.epochs is not None else [])


def run_case(tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    print(case)
    net, data = write_inputs(tmp_path / "inputs", case)
    signals = Signals(monkeypatch)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    full = length_flags(case, None)
    assert train(net, "--data", data, "--out", straight, *case.flags, *full) == 0
    end = load_checkpoint(straight / "checkpoints" / "last.ckpt").state["step"]
    assert end == case.total or ("--early-stop" in case.flags and end < case.total and end % case.steps_per_epoch == 0)
    # a run stopped early ends at `end`: the stops after it are not reached (nor a shorter run's end at it)
    stops = [stop for stop in case.stops if stop.step <= end and not (stop.kind == "short" and stop.step >= end)]

    started, length = False, None
    for index, stop in enumerate(stops):
        # the length of the call that reaches this stop: the next short stop's, or the whole run's
        short = next((later for later in stops[index:] if later.kind == "short"), None)
        wanted = length_flags(case, short)
        if started:
            args = ["--resume", parts, *(wanted if wanted != length else [])]
        else:
            args = [net, "--data", data, "--out", parts, *case.flags, *wanted]
        started, length = True, wanted
        signals.during_step = stop.step if stop.kind == "signal" else None
        signals.during_validation = stop.step if stop.kind == "validation" else None
        signals.crash = stop.step if stop.kind == "crash" else None
        code = train(*args)
        ended = stop.kind == "validation" and stop.step == end  # nothing after that validation to stop
        want = 0 if stop.kind == "short" or ended else 128 + signal.SIGTERM
        if stop.kind == "crash":  # an internal error to main; a crash before the first checkpoint: start again
            want, started = 2, (parts / "checkpoints" / "last.ckpt").is_file()
        assert code == want, f"stop {stop}"
    signals.during_step = signals.during_validation = signals.crash = None
    if started:
        assert train("--resume", parts, *(full if full != length else [])) == 0
    else:
        assert train(net, "--data", data, "--out", parts, *case.flags, *full) == 0
    shorts = {stop.step for stop in stops if stop.kind == "short"}
    assert_same_training(straight, parts, shorts)
    # resuming a run that has trained all its steps changes nothing
    finished = tmp_path / "finished"
    shutil.copytree(parts, finished)
    assert train("--resume", parts) == 0
    assert_unchanged(finished, parts)


# --- comparing two runs ---------------------------------------------------------------------------------------


def metric_lines(run: Path) -> list[dict]:
    """metrics.jsonl less images/s, the one thing that depends on the clock."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in line.items() if key not in MEASURED} for line in lines]


def assert_unchanged(before: Path, after: Path) -> None:
    """The run folder `after` holds what its copy `before` held: the same files, each with the same bytes but
    the checkpoints, which hold the same training (a rewritten checkpoint may order its header otherwise)."""
    files = [sorted(str(path.relative_to(run)) for path in run.rglob("*") if path.is_file()) for run in (before, after)]
    assert files[0] == files[1]
    for name in files[0]:
        if name.endswith(".ckpt"):
            assert_same_checkpoints(before / name, after / name)
        else:
            assert (before / name).read_bytes() == (after / name).read_bytes(), name


def recipe_values(recipe: dict) -> dict:
    """A recipe as `Recipe.to_dict` writes it, less where each value came from (a flag at resume, or not)."""
    values = {}
    for name, entry in recipe["settings"].items():
        if isinstance(entry, list):
            values[name] = [(item["pattern"], item["value"]) for item in entry]
        else:
            values[name] = entry["value"]
    return values


def assert_same_checkpoints(one: Path, two: Path, length_may_differ: bool = False) -> None:
    """Two checkpoints hold the same training; `length_may_differ`: but the one was written by a run given a
    shorter length (a best checkpoint before a `short` stop), which its recipe records."""
    first, second = load_checkpoint(one), load_checkpoint(two)
    states = [dict(checkpoint.state) for checkpoint in (first, second)]
    recipes = [recipe_values(state.pop("recipe")) for state in states]
    if length_may_differ:
        for recipe in recipes:
            del recipe["steps"], recipe["epochs"]
    assert states[0] == states[1], one.name
    assert recipes[0] == recipes[1], one.name
    assert first.preprocess == second.preprocess, one.name
    for mine, theirs, what in [
        (first.weights, second.weights, "weight"),
        (first.rng, second.rng, "random state"),
        (first.live, second.live, "live weight"),  # with `ema` (`weights` are then the average)
    ]:
        assert mine.keys() == theirs.keys(), (one.name, what)
        for name, value in mine.items():
            assert torch.equal(value, theirs[name]), (one.name, what, name)
    assert first.optimizer.keys() == second.optimizer.keys(), one.name
    for name, state in first.optimizer.items():
        assert state.keys() == second.optimizer[name].keys(), (one.name, name)
        for key, value in state.items():
            assert torch.equal(value, second.optimizer[name][key]), (one.name, "optimizer", name, key)


def assert_same_training(straight: Path, parts: Path, shorts: set[int]) -> None:
    """`parts` (stopped and resumed) holds `straight`'s training; a run that ended early at a step of `shorts`
    wrote the records such a run writes there (its last step's line, its last weights' `final` validation)."""
    want, got = metric_lines(straight), metric_lines(parts)
    have = {(line["kind"], line["step"]) for line in want}
    extra = [line for line in got if line["step"] in shorts and line["kind"] in ("step", "final")]
    extra = [line for line in extra if (line["kind"], line["step"]) not in have]
    assert [line for line in got if line not in extra] == want
    assert (straight / "weights.safetensors").read_bytes() == (parts / "weights.safetensors").read_bytes()
    names = [sorted(path.name for path in (run / "checkpoints").iterdir()) for run in (straight, parts)]
    assert names[0] == names[1]
    for name in names[0]:
        best = name != "last.ckpt" and bool(shorts)
        assert_same_checkpoints(straight / "checkpoints" / name, parts / "checkpoints" / name, best)
    recipes = [recipe_values(json.loads((run / "recipe.json").read_text())["recipe"]) for run in (straight, parts)]
    assert recipes[0] == recipes[1]


# --- the fuzzer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", range(CASES))
def test_a_resumed_run_trains_as_the_straight_run(number, tmp_path, monkeypatch):
    case = draw_case(random.Random(f"{SEED}:resume:{number}"))
    print(f"case {number} (NETDSL_FUZZ_SEED={SEED})")
    run_case(tmp_path, case, monkeypatch)


@pytest.mark.skipif(SCALE < 4, reason="campaigns only (NETDSL_FUZZ_SCALE=4 and above): a second a step")
@pytest.mark.parametrize("number", range(max(1, int(SCALE // 4))))
def test_a_resumed_run_on_the_triton_backend_trains_as_the_straight_run_random(number, tmp_path, monkeypatch):
    case = draw_case(random.Random(f"{SEED}:resume-kernels:{number}"), kernels=True)
    print(f"triton case {number} (NETDSL_FUZZ_SEED={SEED})")
    run_case(tmp_path, case, monkeypatch)


def test_the_generator_is_reproducible_and_varied():
    cases = [draw_case(random.Random(f"0:resume:{number}")) for number in range(60)]
    assert cases[0] == draw_case(random.Random("0:resume:0"))
    kinds = {stop.kind for case in cases for stop in case.stops}
    assert kinds == {"signal", "validation", "short", "crash"}
    schedules = {flag(case.flags, "--schedule") for case in cases}
    assert schedules == {"constant", "step", "multistep", "cosine", "poly", "exp", "inv", "plateau"}
    assert {flag(case.flags, "--optimizer") for case in cases} == {"sgd", "adamw"}
    assert any(stop.step == case.total for case in cases for stop in case.stops)
    assert any(stop.epochs for case in cases for stop in case.stops)
    assert any([stop.kind for stop in case.stops].count("validation") for case in cases)
    assert any(
        (one.kind, two.kind, one.step) == ("signal", "validation", two.step)
        for case in cases
        for one, two in zip(case.stops, case.stops[1:])
    )
    assert {flag(case.flags, "--dtype") for case in cases} == {"fp32", "bf16", "fp16"}
    assert {flag(case.flags, "--workers") for case in cases} == {"0", "1"}
    assert {flag(case.flags, "--accumulate", "1") for case in cases} == {"1", "2"}
    assert {flag(case.flags, "--recompute", "none") for case in cases} == {"none", "cheap", "all"}
    assert {flag(case.flags, "--early-stop", "none") for case in cases} == {"none", "1", "2"}
    assert {flag(case.flags, "--ema", "none") for case in cases} == {"none", "0.5", "0.9", "0.99"}
    mixes = {(flag(case.flags, "--mixup", "0"), flag(case.flags, "--cutmix", "0")) for case in cases}
    assert mixes == {("0", "0"), ("0.4", "0"), ("0", "1"), ("1", "1")}
    assert any("," in flag(case.flags, "--resize", "auto") for case in cases)
    assert any(flag(case.flags, "--crop-area", "none") != "none" for case in cases)
    assert any("towers" in case.net for case in cases) and any("softmax" in case.net for case in cases)


# --- found by fuzzing -----------------------------------------------------------------------------------------


NET = """\
net small
input image: 3 x 8 x 8
c1 = conv(image, 4, size=3, pad=1) | batchnorm | relu | maxpool(2)
f = fc(c1, 6) | relu | dropout(0.5)
out = fc(f, 3)
output out
"""


def recipe_flags(**settings) -> list[str]:
    """Flags for `settings` (`nesterov=True`: --nesterov), over a plain recipe: sgd at a constant rate, a batch of
    4, the validation images of the data's own, no augmentation."""
    plain = {"batch": 4, "seed": 5, "val_fraction": 0, "workers": 0, "log_every": 1, "schedule": "constant",
             "lr": 0.05, "flip": False, "pca_noise": 0, "mean": "none", "std": "false"}  # fmt: skip
    flags = []
    for name, value in {**plain, **settings}.items():
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(option if value else "--no-" + option[2:])
        else:
            flags += [option, str(value)]
    return flags


def small_case(steps: int | None, epochs: int | None, stops: list[Stop], **settings) -> Case:
    """NET on 14 training images (3 steps an epoch at a batch of 4) and 5 validation ones."""
    return Case(NET, 14, 5, 8, 3, recipe_flags(**settings), steps, epochs, stops, seed=1)


def test_a_stop_during_the_runs_last_step_inside_an_epoch_measures_the_last_weights_at_resume(tmp_path, monkeypatch):
    """--steps 4 ends inside the second epoch (3 steps an epoch): the straight run measures its last weights (the
    `final` record). Stopped during step 4, the run checkpointed there, and its resume found nothing left to train
    and skipped that measurement: the record was missing (fixed: the checkpoint says whether the run had ended)."""
    run_case(tmp_path, small_case(4, None, [Stop("signal", 4)]), monkeypatch)
    assert [line["step"] for line in metric_lines(tmp_path / "parts") if line["kind"] == "final"] == [4]


class Killed(BaseException):
    """A kill -9 stand-in: nothing of the run catches it."""


def test_a_resume_killed_before_the_checkpoint_that_ends_the_run_records_the_last_weights_once(tmp_path, monkeypatch):
    """Stopped during its last step (inside an epoch), resumed, and killed once the last weights' record was written
    but before the checkpoint that ends the run: resumed again, the run measures them again, and records them once."""
    case = small_case(4, None, [])
    net, data = write_inputs(tmp_path / "inputs", case)
    signals = Signals(monkeypatch)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert train(net, "--data", data, "--out", straight, *case.flags, "--steps", 4) == 0
    signals.during_step = 4
    assert train(net, "--data", data, "--out", parts, *case.flags, "--steps", 4) == 128 + signal.SIGTERM
    signals.during_step = None
    real = loop.save_checkpoint

    def killed_before_the_last(paths, checkpoint):
        if checkpoint.state["ended"]:
            raise Killed
        real(paths, checkpoint)

    monkeypatch.setattr(loop, "save_checkpoint", killed_before_the_last)
    with pytest.raises(Killed):
        train("--resume", parts)
    assert [line["kind"] for line in metric_lines(parts)][-1] == "final"
    monkeypatch.setattr(loop, "save_checkpoint", real)
    assert train("--resume", parts) == 0
    assert_same_training(straight, parts, set())


def test_a_shorter_run_ending_off_the_log_interval_leaves_the_next_line_the_straight_runs(tmp_path, monkeypatch):
    """A line every 2 steps (3 an epoch); a run of 5 steps logs its last step too (its last line), then is resumed
    to 6: the line at step 6 covers steps 5-6 as the straight run's does (it covered step 6 alone: the run's last
    line had emptied the window, and the checkpoint saved it empty)."""
    case = small_case(6, None, [Stop("short", 5)], log_every=2)
    run_case(tmp_path, case, monkeypatch)
    steps = [line["step"] for line in metric_lines(tmp_path / "parts") if line["kind"] == "step"]
    assert steps == [2, 4, 5, 6]


TRITON_NET = """\
net kernels
input image: 1 x 6 x 6
c1 = conv(image, 2, size=3, pad=1) | batchnorm | relu | maxpool(2)
f = fc(c1, 4) | relu | dropout(0.5)
out = fc(f, 3)
output out
"""


def test_a_resumed_run_on_the_triton_backend_trains_as_the_straight_run(tmp_path, monkeypatch):
    """netdsl's kernels (under the interpreter on a CPU): the fused SGD's flat velocities and the dropout kernel's
    seeds come back from the checkpoint. Two steps, a stop during the first; no validation (a second a step)."""
    case = Case(TRITON_NET, 8, 0, 6, 3, recipe_flags(backend="triton", momentum=0.9), 2, None, [Stop("signal", 1)])
    run_case(tmp_path, case, monkeypatch)
