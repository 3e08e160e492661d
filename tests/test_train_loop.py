"""`netdsl train`: the loop against a hand-written PyTorch loop, bit-identical resume, checkpoints that
survive a kill, signals, divergence, and the run folder.

Data sets here are small seeded .npz arrays (float images used as they are: no mean, no crop room), so
each test runs in seconds; convergence on real data is in test_train_convergence.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from golden.models import build
from train_support import TINY

import netdsl
from netdsl.cli.main import main
from netdsl.runtime.weights import init_weights, load_weights
from netdsl.train import loop
from netdsl.train.checkpoint import load_checkpoint, save_checkpoint
from netdsl.train.loop import Trainer
from netdsl.train.runs import MEASURED
from netdsl.train.start import saved_preprocess

ROOT = Path(__file__).resolve().parents[1]
LENET = str(ROOT / "nets" / "lenet5.net")
PLAIN = ("--mean", "none", "--std", "false", "--no-flip", "--pca-noise", "0", "--workers", "0", "--log-every", "1")

# A small net with everything that draws random numbers or keeps state: dropout, batch norm, two towers.
SMALL = """\
net small
device gpu0, gpu1
input image: 3 x 12 x 12

towers gpu0, gpu1 {
    c = conv(image, 4, size=3, pad=1) | batchnorm | relu | maxpool(2)
    f = fc(all c, 8) | relu | dropout(0.5)
}
out = fc(all f, 5) on gpu0
prob = softmax(out)
output prob
"""


def arrays(path: Path, shape, count: int, classes: int, seed: int, val: int = 8) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x=rng.standard_normal((count, *shape)).astype(np.float32),
        y=rng.integers(0, classes, count),
        x_val=rng.standard_normal((val, *shape)).astype(np.float32),
        y_val=rng.integers(0, classes, val),
    )
    return path


def train(*args: str) -> int:
    return main(["train", *map(str, args)])


def checkpoint_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.ckpt").weights


# --- the update rule --------------------------------------------------------------------------------------


def test_sgd_steps_equal_a_hand_written_loop_with_a_rate_drop(tmp_path):
    """Four full-batch steps of the paper's rule (momentum, weight decay, no decay on biases, f7 at twice the
    rate), the rate divided by 10 after two, against the same steps written out on the hand-written LeNet-5."""
    data = arrays(tmp_path / "d.npz", (1, 32, 32), 64, 10, seed=1)
    run = tmp_path / "run"
    code = train(
        LENET, "--data", data, "--batch", 64, "--epochs", 4, "--schedule", "step", "--step-epochs", 2,
        "--gamma", 0.1, "--lr", 0.01, "--momentum", 0.9, "--weight-decay", 0.0005, "--decay-mult", "*.bias=0",
        "--lr-mult", "f7.*=2", "--init", "he", "--seed", 3, "--keep-best", 0, "--out", run, *PLAIN,
    )  # fmt: skip
    assert code == 0
    got = checkpoint_weights(run)

    with np.load(data) as stored:
        x, y = torch.from_numpy(stored["x"]), torch.from_numpy(stored["y"])
    graph = netdsl.load_graph(LENET)
    model = build("lenet5", init_weights(graph, seed=3, scheme="he"), dtype=torch.float32).train()
    tensors = model.tensors()
    velocity = {name: torch.zeros_like(t) for name, t in tensors.items()}
    for step in range(4):
        lr = 0.01 * (0.1 if step >= 2 else 1.0)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for name, w in tensors.items():
                rate = lr * (2.0 if name.startswith("f7.") else 1.0)
                decay = 0.0 if name.endswith(".bias") else 0.0005
                velocity[name] = 0.9 * velocity[name] - decay * rate * w - rate * w.grad
                w += velocity[name]
    for name, want in tensors.items():
        np.testing.assert_allclose(got[name].numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=name)
    start = init_weights(graph, 3, "he")
    moved = max(float((got[name] - torch.from_numpy(value)).abs().max()) for name, value in start.items())
    assert moved > 1e-3  # the steps did something


def tiny_run_args(tmp_path: Path, count: int = 40) -> tuple[Path, Path]:
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    return net, arrays(tmp_path / "tiny.npz", (1, 8, 8), count, 10, seed=2)


def gray_folder(folder: Path, shape: tuple[int, int], seed: int, torn: str) -> Path:
    """Six seeded random gray images in each of folder/a and folder/b, and one file `torn` that is no image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for index in range(6):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name / f"{index}.png")
    (folder / torn).write_bytes(b"\x89PNG not an image")
    return folder


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lr_mult_0_on_the_first_group_freezes_it_and_logs_the_base_rate(tmp_path):
    """`c1`'s weights, the first parameter group, at rate 0: they stay as initialized (no weight decay either,
    which the paper's rule scales by the rate) while f2 learns, and the logs show the base rate, not c1's."""
    net, data = tiny_run_args(tmp_path)
    run = tmp_path / "run"
    code = train(
        net, "--data", data, "--batch", 8, "--steps", 6, "--lr", 0.05, "--schedule", "constant", "--init", "he",
        "--seed", 4, "--lr-mult", "c1.*=0", "--out", run, *PLAIN,
    )  # fmt: skip
    assert code == 0
    got = checkpoint_weights(run)
    start = init_weights(netdsl.load_graph(net), seed=4, scheme="he")
    for name in ("c1.weight", "c1.bias"):
        assert np.array_equal(got[name].numpy(), start[name]), name
    assert not np.array_equal(got["f2.weight"].numpy(), start["f2.weight"])
    lines = metric_lines(run)
    assert lines and all(line["lr"] == 0.05 for line in lines)


def test_a_log_line_says_the_step_of_the_total_and_the_time_left():
    """The time left is the steps left times the batch over this line's images per second (250 steps of 32
    images at 64 images/s: 125 s); none on the last step; durations as a person reads them."""
    import io

    from netdsl.train.progress import Progress, duration
    from netdsl.train.world import World

    stream = io.StringIO()
    progress = Progress(stream, 50, "epoch 1/6", World.from_environment())
    record = {"step": 50, "loss": 0.5, "top1": 0.25, "lr": 0.01, "images_per_s": 64.0}
    progress.show(record, 300, 32)
    progress.show(dict(record, step=300), 300, 32)
    progress.show(record)  # without the run's length: the step alone, as before
    first, last, plain = stream.getvalue().splitlines()
    assert first.startswith("epoch 1/6  step 50/300  loss 0.5000") and first.endswith("64 img/s  ~2m05s left")
    assert last.startswith("epoch 1/6  step 300/300") and "left" not in last
    assert plain.startswith("epoch 1/6  step 50  loss") and "left" not in plain
    cases = {0.4: "0s", 59.4: "59s", 60: "1m00s", 3599: "59m59s", 3600: "1h00m", 86399: "23h59m", 90061: "1d01h"}
    assert {seconds: duration(seconds) for seconds in cases} == cases
    progress.show(dict(record, data_wait=0.34), 300, 32)
    progress.show(dict(record, data_wait=0.05), 300, 32)
    slow, quick = stream.getvalue().splitlines()[3:]
    assert slow.endswith("~2m05s left  waiting for data 34%") and "waiting" not in quick


def test_the_wait_for_each_batch_is_what_the_loader_took():
    """`waited` adds to clock[2] the time each `next` of the batches took after the first (the loader's
    start-up), on a clock that the loader alone advances here (by 3, 5 then 7 units), and nothing for the time
    between batches (the step's)."""
    from netdsl.train.progress import waited

    ticks = [0.0]
    now = lambda: ticks[0]  # noqa: E731

    def batches():
        for delay in (3.0, 5.0, 7.0):
            ticks[0] += delay
            yield delay

    clock = [0.0, 0, 0.0]
    seen = []
    for batch in waited(batches(), clock, now):
        seen.append(batch)
        ticks[0] += 100.0  # the step: not waiting
    assert seen == [3.0, 5.0, 7.0] and clock[2] == 12.0


def test_the_first_reading_of_a_large_folder_shows_its_progress(monkeypatch):
    """On a stream that is not a terminal, reading 20,000 images says so at each tenth, with the time left,
    and at the end the time it took; a pass under 5,000 images (seconds), a rank other than 0 and a pass each
    epoch repeats (validation: a bar on a terminal only) say nothing."""
    import io

    from netdsl.train.progress import Meter
    from netdsl.train.world import World

    stream = io.StringIO()
    meter = Meter(stream, 20_000, "reading the training images", World())
    for start in range(0, 20_000, 32):
        meter.advance(min(32, 20_000 - start))
    meter.close()
    lines = stream.getvalue().splitlines()
    counts = [f"{32 * -(-2000 * tenth // 32):,}/20,000" for tenth in range(1, 10)] + ["20,000/20,000"]
    assert [line.split(": ")[1].split()[0] for line in lines] == counts
    assert all(re.fullmatch(r"reading the training images: [\d,/]+ images, ~\w+ left", line) for line in lines[:-1])
    assert re.fullmatch(r"reading the training images: 20,000/20,000 images, in \w+", lines[-1])
    small, other_rank = Meter(stream, 4_999, "small", World()), Meter(stream, 20_000, "rank 1", World(1, 2))
    for quiet in (small, other_rank, Meter(stream, 20_000, "validating", World(), plain=False)):
        quiet.advance(20_000)
        quiet.close()
    assert stream.getvalue().splitlines() == lines

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with monkeypatch.context() as patch:  # a terminal without tqdm (netdsl's core install) has the lines too
        patch.setitem(sys.modules, "tqdm", None)
        terminal = Terminal()
        meter = Meter(terminal, 20_000, "reading the training images", World())
        meter.advance(20_000)
        assert meter.bar is None and terminal.getvalue().startswith("reading the training images: 20,000/20,000")


@pytest.mark.parametrize("steps", [7, 12])
def test_cosine_and_poly_over_steps_follow_the_documented_curves_to_the_runs_end(tmp_path, steps):
    """`cosine` with --steps: step s of T takes floor + (1 - floor) * (1 + cos(pi s / T)) / 2, and `poly`
    (1 - s / T) ** power, T the run's steps even where they end inside an epoch (5 steps per epoch here: 7
    ends inside the second, 12 inside the third)."""
    net, data = tiny_run_args(tmp_path)
    run = tmp_path / "run"
    code = train(
        net, "--data", data, "--batch", 8, "--steps", steps, "--lr", 0.05, "--schedule", "cosine",
        "--cosine-floor", 0.1, "--out", run, *PLAIN,
    )  # fmt: skip
    assert code == 0
    logged = {line["step"]: line["lr"] for line in metric_lines(run) if line["kind"] == "step"}
    assert sorted(logged) == list(range(1, steps + 1))
    for step, lr in logged.items():
        want = 0.05 * (0.1 + 0.9 * (1 + np.cos(np.pi * (step - 1) / steps)) / 2)
        assert lr == pytest.approx(want, rel=1e-12), step
    code = train(
        net, "--data", data, "--batch", 8, "--steps", steps, "--lr", 0.05, "--schedule", "poly", "--power", 0.9,
        "--out", tmp_path / "poly", *PLAIN,
    )  # fmt: skip
    assert code == 0
    logged = {line["step"]: line["lr"] for line in metric_lines(tmp_path / "poly") if line["kind"] == "step"}
    assert logged == pytest.approx({step: 0.05 * (1 - (step - 1) / steps) ** 0.9 for step in range(1, steps + 1)})


def test_caffes_inv_and_exp_count_the_runs_steps_across_epochs(tmp_path):
    """`--schedule inv` (Caffe's: lr (1 + gamma s) ** -power) and `exp` (lr gamma ** s), s the steps done before
    each one, counted across the epochs (5 steps per epoch, 12 steps), as metrics.jsonl logs each step's rate."""
    net, data = tiny_run_args(tmp_path)
    flags = ("--data", data, "--batch", 8, "--steps", 12, "--lr", 0.05, *PLAIN)
    assert train(net, *flags, "--schedule", "inv", "--gamma", 0.3, "--power", 0.75, "--out", tmp_path / "inv") == 0
    logged = {line["step"]: line["lr"] for line in metric_lines(tmp_path / "inv") if line["kind"] == "step"}
    assert logged == pytest.approx({step: 0.05 * (1 + 0.3 * (step - 1)) ** -0.75 for step in range(1, 13)}, rel=1e-12)
    assert train(net, *flags, "--schedule", "exp", "--gamma", 0.8, "--out", tmp_path / "exp") == 0
    logged = {line["step"]: line["lr"] for line in metric_lines(tmp_path / "exp") if line["kind"] == "step"}
    assert logged == pytest.approx({step: 0.05 * 0.8 ** (step - 1) for step in range(1, 13)}, rel=1e-12)


# --- resume -------------------------------------------------------------------------------------------------


def small_run_args(tmp_path: Path) -> tuple[Path, Path]:
    net = tmp_path / "small.net"
    net.write_text(SMALL)
    data = arrays(tmp_path / "small.npz", (3, 12, 12), 48, 5, seed=7)
    return net, data


def small_train(net, data, out, *extra) -> int:
    return train(
        net, "--data", data, "--batch", 8, "--schedule", "step", "--step-epochs", 1, "--gamma", 0.5, "--lr", 0.05,
        "--seed", 11, "--mean", "auto", "--std", "auto", "--workers", 0, "--log-every", 2, "--out", out, *extra,
    )  # fmt: skip


def test_resume_is_bit_identical(tmp_path):
    """9 steps in one go == 4 steps, a resume, 5 more: weights, momentum, batch norm statistics, metrics.
    The steps cross an epoch boundary (6 per epoch), dropout draws masks, flips and colour noise are on."""
    net, data = small_run_args(tmp_path)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert small_train(net, data, straight, "--steps", 9) == 0
    assert small_train(net, data, parts, "--steps", 4) == 0
    assert load_checkpoint(parts / "checkpoints" / "last.ckpt").state["step"] == 4
    assert train("--resume", parts, "--steps", 9) == 0
    one, two = (load_checkpoint(run / "checkpoints" / "last.ckpt") for run in (straight, parts))
    assert one.state["step"] == two.state["step"] == 9
    for name in one.weights:
        assert torch.equal(one.weights[name], two.weights[name]), name
    assert one.optimizer.keys() == two.optimizer.keys()
    for name in one.optimizer:
        assert torch.equal(one.optimizer[name]["velocity"], two.optimizer[name]["velocity"]), name
    lines = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (straight, parts)
    ]
    strip = [[{k: v for k, v in line.items() if k not in MEASURED} for line in run] for run in lines]
    # the first part ended at step 4 and measured its last weights there: the one record the other run lacks
    assert [line["step"] for line in strip[1] if line["kind"] == "final"] == [4, 9]
    assert strip[0] == [line for line in strip[1] if (line["kind"], line["step"]) != ("final", 4)]
    assert any(line["kind"] == "epoch" for line in strip[0])


def test_a_resumed_run_reuses_its_scan_of_the_image_folder(tmp_path, monkeypatch, capsys):
    """The scan of an image folder (each file decoded once: the unreadable ones, the training set's sums) is
    saved in the run folder: a resume with the same files decodes none of them again and trains the straight
    run's bits, and `eval` of the run's validation split decodes nothing before measuring; a file changed
    since, or a damaged record, has the folder scanned again. `eval` of other files with the weights' own
    preprocessing looks only at the split it measures, and measures nothing."""
    from netdsl.train import scan

    folder = gray_folder(tmp_path / "images", (10, 9), 21, "b/torn.png")
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    flags = ("--data", folder, "--batch", 4, "--schedule", "constant", "--skip-corrupt", "--val-fraction", 0.2)
    assert train(net, *flags, "--steps", 6, "--out", tmp_path / "straight", *PLAIN) == 0
    assert train(net, *flags, "--steps", 3, "--out", tmp_path / "parts", *PLAIN) == 0
    record = json.loads((tmp_path / "parts" / "data_scan.json").read_text())
    assert sorted(len(part) for part in record["bad"]) == [0, 1]  # torn.png, in training or validation
    scans = []
    real = scan.decode
    monkeypatch.setattr(scan, "decode", lambda *args: scans.append(args) or real(*args))
    assert train("--resume", tmp_path / "parts", "--steps", 6) == 0
    assert scans == []
    one, two = (checkpoint_weights(tmp_path / run) for run in ("straight", "parts"))
    assert all(torch.equal(one[name], two[name]) for name in one)
    assert (tmp_path / "parts" / "data_scan.json").read_text() == (tmp_path / "straight" / "data_scan.json").read_text()

    def evaluate(data: Path) -> tuple[str, str]:
        capsys.readouterr()
        assert main(["eval", str(net), "--weights", str(tmp_path / "parts"), "--data", str(data)]) == 0
        out, err = capsys.readouterr()
        return out, err.replace(str(data), "DATA")

    own = evaluate(folder)
    assert scans == []
    other = evaluate(shutil.copytree(folder, tmp_path / "copy"))  # other paths: the record does not apply
    assert [(len(args[0]), args[1]) for args in scans] == [(2, False)]  # the 2 validation files, unmeasured
    assert own == other
    # what has the folder scanned again: a file changed since, a damaged record, another crop
    from netdsl.train.runs import RunFolder

    paths = [np.asarray([bytes(path) for path in sorted(folder.rglob("*.png"))]), None]
    settings = {"size": 9, "crop": [8, 8], "channels": 1, "skip_corrupt": True}
    key = scan.fingerprint(paths, settings)
    sums = [4, np.asarray([0.1]), np.asarray([[1 / 3]])]
    saved = scan.to_record(key, [[2], []], sums)
    assert scan.from_record(json.loads(json.dumps(saved)), key, [13, 0], 1) == ([[2], []], sums)
    assert scan.fingerprint(paths, dict(settings, crop=[7, 7])) != key
    os.utime(folder / "a" / "0.png", ns=(1, 1))
    assert scan.fingerprint(paths, settings) != key
    for damaged in ({**saved, "bad": [[13], []]}, {**saved, "total": ["0x1p+0", "0x1p+0"]}, {**saved, "count": "4"},
                    {**saved, "bad": [[True], []]}, {**saved, "outer": ["zz"]}, [], None):  # fmt: skip
        assert scan.from_record(damaged, key, [13, 0], 1) is None, damaged
    (tmp_path / "parts" / "data_scan.json").write_bytes(b'{"format": 1, "key": [\xff')
    assert RunFolder(tmp_path / "parts").read_scan() is None


def straight_and_resumed(tmp_path: Path, seed: int, *augment: str) -> tuple[Path, tuple]:
    """A tiny net trained 5 steps on a seeded gray image folder with the `augment` flags, into
    tmp_path/straight, and 2 steps into tmp_path/parts resumed to 5; the net and the flags, less `augment`."""
    folder = gray_folder(tmp_path / "images", (12, 10), seed, "b/torn.png")
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    flags = ("--data", folder, "--batch", 4, "--schedule", "constant", "--skip-corrupt", "--val-fraction", 0.2, *PLAIN)
    assert train(net, *flags, *augment, "--steps", 5, "--out", tmp_path / "straight") == 0
    assert train(net, *flags, *augment, "--steps", 2, "--out", tmp_path / "parts") == 0
    assert train("--resume", tmp_path / "parts", "--steps", 5) == 0
    return net, flags


def test_scale_jittering_resumes_bit_for_bit_and_saves_the_middle_size(tmp_path, capsys, monkeypatch):
    """`--resize 8,12` on an image folder: 5 steps straight equal 2, a resume and 3 more, bit for bit (the
    drawn sizes come from each image's generator), and equal the run loading in a worker process (`--workers
    3` on one CPU: one, with a note); the weights record the middle size, 10, for `run` and `eval`; the banner
    says so; and the steps differ from a fixed `--resize 10` run's (the sizes are drawn)."""
    net, flags = straight_and_resumed(tmp_path, 23, "--resize", "8,12")
    assert "each training image scaled to 8..12 (validation 10)" in capsys.readouterr().err
    assert train(net, *flags, "--resize", "10", "--steps", 5, "--out", tmp_path / "fixed") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0}, raising=False)
    capsys.readouterr()
    assert train(net, *flags, "--resize", "8,12", "--steps", 5, "--workers", 3, "--out", tmp_path / "worker") == 0
    assert "note: --workers 3 is more than the 1 CPU this process may use; loading with 1" in capsys.readouterr().err
    one, two, fixed, worker = (checkpoint_weights(tmp_path / run) for run in ("straight", "parts", "fixed", "worker"))
    assert all(torch.equal(one[name], two[name]) and torch.equal(one[name], worker[name]) for name in one)
    assert not all(torch.equal(one[name], fixed[name]) for name in one)
    preprocess = saved_preprocess(tmp_path / "straight" / "weights.safetensors")
    assert preprocess.size == 10 and preprocess.crop == (8, 8)


def test_a_range_of_sizes_is_checked_at_its_top_before_training(tmp_path, capsys, monkeypatch):
    """`--resize 8,40` with Pillow's bound lowered between the 12 x 10 images at 24 (the middle) and at 40:
    the run stops before its first step, naming an image and the size, rather than at the batch drawing it."""
    folder = gray_folder(tmp_path / "images", (12, 10), 25, "a/notes.txt")
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    monkeypatch.setattr("netdsl.train.augment.MAX_RESIZED_PIXELS", 1000)  # 29 x 24 passes, 48 x 40 does not
    flags = ("--data", folder, "--batch", 4, "--steps", 2, "--out", tmp_path / "run", *PLAIN)
    assert train(net, *flags, "--resize", "8,40") == 1
    err = capsys.readouterr().err
    assert "its shorter side scaled to 40, would be 48 x 40 pixels" in err and ".png" in err and "epoch" not in err
    assert train(net, *flags, "--resize", "8,28") == 0  # 34 x 28 at its top


def test_random_resized_crops_resume_bit_for_bit_and_refuse_a_range_of_sizes(tmp_path, capsys):
    """`--crop-area 0.3,1`: 5 steps straight equal 2, a resume and 3 more, bit for bit, and differ from plain
    crops; with `resize` a range the run stops before training, naming crop_area."""
    net, flags = straight_and_resumed(tmp_path, 24, "--crop-area", "0.3,1")
    assert "random-resized crops of 30%..100% of each image's area" in capsys.readouterr().err
    assert train(net, *flags, "--steps", 5, "--out", tmp_path / "plain") == 0
    one, two, plain = (checkpoint_weights(tmp_path / run) for run in ("straight", "parts", "plain"))
    assert all(torch.equal(one[name], two[name]) for name in one)
    assert not all(torch.equal(one[name], plain[name]) for name in one)
    capsys.readouterr()
    code = train(net, *flags, "--crop-area", "0.3,1", "--resize", "8,12", "--out", tmp_path / "both")
    err = capsys.readouterr().err
    assert code == 1 and "--crop-area: error: random-resized crops (crop_area) take their boxes" in err, err
    assert "Traceback" not in err
    code = train(net, *flags, "--resize", "6,12", "--out", tmp_path / "small")
    err = capsys.readouterr().err
    assert code == 1 and "--resize: error: resize's low 6 is below the net's input 8 x 8" in err, err
    assert "hint: give a low of at least 8, e.g. resize = (8, 16)" in err


def test_resume_says_what_a_flag_overrides(tmp_path, capsys):
    net, data = small_run_args(tmp_path)
    run = tmp_path / "run"
    assert small_train(net, data, run, "--steps", 2) == 0
    capsys.readouterr()
    assert train("--resume", run, "--steps", 3, "--lr", 0.01) == 0
    err = capsys.readouterr().err
    assert "lr = 0.01 (--lr; was 0.05)" in err and "the flag wins" in err
    assert json.loads((run / "recipe.json").read_text())["recipe"]["settings"]["lr"]["value"] == 0.01


def stop_during_step(monkeypatch, step: int) -> None:
    """As if SIGTERM arrived during step `step` (from 1): the run ends that step, checkpoints and stops."""
    original = Trainer._train_step

    def step_then_signal(self, x, y):
        result = original(self, x, y)
        if self.step + 1 == step:
            self._signal = signal.SIGTERM
        return result

    monkeypatch.setattr(Trainer, "_train_step", step_then_signal)


def without_speed(run: Path) -> list[dict]:
    """metrics.jsonl less images/s, the one thing that depends on the clock."""
    return [{key: value for key, value in line.items() if key not in MEASURED} for line in metric_lines(run)]


def assert_same_runs(one: Path, two: Path) -> None:
    """Two run folders hold the same training: metrics, weights.safetensors, checkpoints and their state."""
    assert without_speed(one) == without_speed(two)
    assert (one / "weights.safetensors").read_bytes() == (two / "weights.safetensors").read_bytes()
    names = [sorted(path.name for path in (run / "checkpoints").iterdir()) for run in (one, two)]
    assert names[0] == names[1]
    first, second = (load_checkpoint(run / "checkpoints" / "last.ckpt") for run in (one, two))
    assert first.state == second.state
    for name, value in first.weights.items():
        assert torch.equal(value, second.weights[name]), name


@pytest.mark.parametrize("stop_at", [6, 12])
def test_a_stop_during_an_epochs_last_step_ends_that_epoch_at_resume(tmp_path, monkeypatch, stop_at):
    """Stopped during the first epoch's last step (6 steps an epoch) or the run's final one: the checkpoint is
    taken before the epoch's end, which the resumed run does (validation, record, best checkpoint, weights)."""
    net, data = small_run_args(tmp_path)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert small_train(net, data, straight, "--epochs", 2) == 0
    stop_during_step(monkeypatch, stop_at)
    assert small_train(net, data, parts, "--epochs", 2) == 128 + signal.SIGTERM
    saved = load_checkpoint(parts / "checkpoints" / "last.ckpt").state
    assert (saved["step"], saved["batch_in_epoch"]) == (stop_at, 6)
    monkeypatch.undo()
    assert train("--resume", parts) == 0
    assert [line["epoch"] for line in metric_lines(parts) if line["kind"] == "epoch"] == [1, 2]
    assert_same_runs(straight, parts)


class Killed(BaseException):
    """A kill -9 stand-in: nothing of the run catches it."""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_beside_the_epoch_end_checkpoint_loses_and_repeats_no_record(tmp_path, monkeypatch, when):
    """A run stopped during the first epoch's last step is resumed and killed just before, or just after, the
    checkpoint that ends that epoch is written; resumed again, it is the uninterrupted run: the epoch's record
    neither lost (after) nor written twice (before), weights.safetensors current."""
    net, data = small_run_args(tmp_path)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert small_train(net, data, straight, "--epochs", 2) == 0
    stop_during_step(monkeypatch, 6)
    assert small_train(net, data, parts, "--epochs", 2) == 128 + signal.SIGTERM
    monkeypatch.undo()
    real = loop.save_checkpoint

    def save_and_die(paths, checkpoint):
        ends_the_epoch = (checkpoint.state["step"], checkpoint.state["batch_in_epoch"]) == (6, 0)
        if ends_the_epoch and when == "before":
            raise Killed
        real(paths, checkpoint)
        if ends_the_epoch:
            raise Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_and_die)
    with pytest.raises(Killed):
        train("--resume", parts)
    monkeypatch.undo()
    assert train("--resume", parts) == 0
    assert_same_runs(straight, parts)


def test_a_resume_inside_a_log_interval_logs_what_the_straight_run_does(tmp_path, monkeypatch):
    """A line every 4 steps, a stop during step 5: the line at step 8 covers steps 5-8 as in the straight run
    (the interval's sums are in the checkpoint). A checkpoint without them (older netdsl) still resumes."""
    net, data = small_run_args(tmp_path)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert small_train(net, data, straight, "--epochs", 2, "--log-every", 4) == 0
    stop_during_step(monkeypatch, 5)
    assert small_train(net, data, parts, "--epochs", 2, "--log-every", 4) == 128 + signal.SIGTERM
    monkeypatch.undo()
    older = tmp_path / "older"
    shutil.copytree(parts, older)
    assert train("--resume", parts) == 0
    assert_same_runs(straight, parts)

    last = older / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(last)
    del saved.state["window_sums"]
    save_checkpoint([last], saved)
    assert train("--resume", older) == 0
    assert load_checkpoint(last).state["step"] == 12


def test_a_run_folder_is_not_overwritten(tmp_path, capsys):
    net, data = small_run_args(tmp_path)
    run = tmp_path / "run"
    assert small_train(net, data, run, "--steps", 1) == 0
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert small_train(net, data, run, "--steps", 1) == 1
    assert "already holds a training run" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before


KILLER = """\
import os, signal, sys
import netdsl.train.checkpoint as checkpoint
from netdsl.files import new_temporary

calls = {"n": 0}
real = checkpoint.write_atomic_bytes

def write_then_die(path, data):
    calls["n"] += 1
    if calls["n"] < int(os.environ["KILL_AT_WRITE"]):
        return real(path, data)
    handle, temporary = new_temporary(path)
    os.write(handle, data[: len(data) // 2])  # half of the new checkpoint is on disk ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... when the process is killed

checkpoint.write_atomic_bytes = write_then_die
from netdsl.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_while_writing_a_checkpoint_leaves_the_last_one_loadable(tmp_path):
    net, data = small_run_args(tmp_path)
    run = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(KILLER)
    command = [
        sys.executable, str(driver), "train", str(net), "--data", str(data), "--batch", "8", "--epochs", "3",
        "--workers", "0", "--keep-best", "0", "--out", str(run),
    ]  # fmt: skip
    result = subprocess.run(
        command, env={**os.environ, "KILL_AT_WRITE": "2"}, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    leftovers = [path.name for path in (run / "checkpoints").iterdir() if path.name.startswith(".")]
    assert leftovers, "the half-written temporary should be there"
    saved = load_checkpoint(run / "checkpoints" / "last.ckpt")  # the first epoch's, whole
    assert saved.state["step"] == 6
    assert train("--resume", run, "--workers", 0) == 0
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").state["step"] == 18
    assert not [path for path in (run / "checkpoints").iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize(
    "workers, signum, group",
    [(0, signal.SIGTERM, False), (2, signal.SIGTERM, True), (2, signal.SIGINT, True)],
    ids=["sigterm", "sigterm-to-the-group", "ctrl-c-to-the-group"],
)
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, workers, signum, group):
    """SIGTERM to the training process; or, with two loading processes, SIGTERM or Ctrl-C's SIGINT to the whole
    process group (as `timeout`, a terminal or a cluster's scheduler send them): the loaders leave it to the
    training process, which ends its step, writes a checkpoint and stops (a loader killed by SIGTERM was an
    internal error)."""
    net, data = small_run_args(tmp_path)
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "netdsl", "train", str(net), "--data", str(data), "--batch", "2", "--epochs", "100000",
        "--workers", str(workers), "--log-every", "1", "--out", str(run),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=group)
    seen = []
    try:
        deadline = time.monotonic() + 90
        for line in proc.stderr:
            seen.append(line)
            if " step 3/" in line or time.monotonic() > deadline:  # "epoch 1/N  step 3/M  loss ..."
                break
        assert seen and " step 3/" in seen[-1], "no third step logged:\n" + "".join(seen)
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, "".join(seen) + rest
    assert "continue with netdsl train --resume" in rest and "Traceback" not in rest
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").state["step"] >= 3


# --- divergence -------------------------------------------------------------------------------------------


def test_a_nan_in_the_data_is_traced_to_the_input(tmp_path, capsys):
    data = tmp_path / "nan.npz"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 32, 32)).astype(np.float32)
    x[5, 0, 3, 4] = np.nan
    x_val = rng.standard_normal((4, 1, 32, 32)).astype(np.float32)  # no NaN: the training batch holds it
    np.savez(data, x=x, y=rng.integers(0, 10, 16), x_val=x_val, y_val=np.arange(4))
    code = train(LENET, "--data", data, "--batch", 16, "--epochs", 1, "--out", tmp_path / "run", *PLAIN)
    err = capsys.readouterr().err
    assert code == 1
    assert "step 1 (epoch 1)" in err and "in the net's input `image`" in err and "Traceback" not in err
    assert "no checkpoint was written yet" in err
    assert "hint: look for NaN or infinite pixels in the data" in err and "--lr" not in err
    code = train(LENET, "--data", data, "--batch", 16, "--accumulate", 2, "--out", tmp_path / "parts", *PLAIN)
    err = capsys.readouterr().err
    assert code == 1 and "(the data), in part 1 of 2" in err and "hint: look for NaN or infinite pixels" in err


def test_a_diverging_rate_stops_at_the_first_bad_layer_and_keeps_the_checkpoint(tmp_path, capsys):
    """An epoch at a sane rate, then a resume at a rate that blows the weights up within a few steps."""
    data = arrays(tmp_path / "d.npz", (1, 32, 32), 32, 10, seed=2)
    run = tmp_path / "run"
    assert train(LENET, "--data", data, "--batch", 16, "--epochs", 1, "--init", "he", "--out", run, *PLAIN) == 0
    capsys.readouterr()
    code = train("--resume", run, "--epochs", 20, "--lr", 1e4, "--workers", 0)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-2000:]
    message = err[err.index("error:") :]
    assert "the first non-finite value is in the" in message and "layer `" in message
    assert "the step was not applied" in message and "lower the learning rate" in message
    state = load_checkpoint(run / "checkpoints" / "last.ckpt").state
    assert f"(step {state['step']})" in message
    weights = checkpoint_weights(run)
    assert all(bool(torch.isfinite(value).all()) for value in weights.values())


# --- the run folder ---------------------------------------------------------------------------------------


def test_the_run_folder_holds_what_it_promises(tmp_path, curves):
    net, data = small_run_args(tmp_path)
    run = tmp_path / "run"
    assert small_train(net, data, run, "--epochs", 3, "--keep-best", 2) == 0
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["recipe"]["settings"]["lr"] == {"value": 0.05, "from": "--lr"}
    assert recipe["recipe"]["settings"]["momentum"] == {"value": 0.9, "from": "default"}
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in epochs if line["kind"] == "epoch"] == [1, 2, 3]
    steps = [line for line in epochs if line["kind"] == "step"]
    assert steps and all(line["images_per_s"] > 0 and 0 <= line["data_wait"] <= 1 for line in steps)
    best = sorted(path.name for path in (run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 2
    state = load_checkpoint(run / "checkpoints" / "last.ckpt").state
    assert sorted(entry[2] for entry in state["best"]) == best
    # named by epoch as the run counts them, from 1 (entries hold the epoch counted from 0)
    assert all(name == f"best-e{epoch + 1:04d}.ckpt" for _, epoch, name in state["best"])
    graph = netdsl.load_graph(net)
    weights = load_weights(run / "weights.safetensors", graph)  # the best epoch's, a plain weights file
    top = max(state["best"], key=lambda entry: entry[0])
    best_weights = load_checkpoint(run / "checkpoints" / top[2]).weights
    for name, value in weights.items():
        np.testing.assert_array_equal(value, best_weights[name].numpy())
    checkpoint_as_weights = load_weights(run / "checkpoints" / "last.ckpt", graph)
    assert set(checkpoint_as_weights) == set(weights)
    pytest.importorskip("matplotlib")
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("seconds", [1.0, 60.0])
def test_curves_are_redrawn_as_often_as_a_twentieth_of_the_time_allows(tmp_path, monkeypatch, seconds):
    """On a clock of our own: epochs of a second put the drawing (a quarter second each) off until 10 s have
    passed (20 times the half second first assumed), then to every 5 s (20 times what it took), and the run's end
    draws every epoch; epochs of a minute are each drawn at their end."""
    from netdsl.train import runs

    now, drawn = [100.0], []

    def draw(path, epochs):
        drawn.append([line["epoch"] for line in epochs])
        now[0] += 0.25

    monkeypatch.setattr(runs, "plot_curves", draw)
    metrics = runs.Metrics(tmp_path / "metrics.jsonl")
    curves = runs.Curves(tmp_path / "curves.png", metrics, clock=lambda: now[0])
    for epoch in range(1, 43):
        now[0] += seconds
        metrics.add({"kind": "step", "epoch": epoch})  # not an epoch's record: not drawn
        metrics.add({"kind": "epoch", "epoch": epoch})
        curves.epoch_ended()
    curves.finish()
    want = [10, 15, 20, 25, 30, 35, 40, 42] if seconds == 1.0 else list(range(1, 43))
    assert drawn == [list(range(1, last + 1)) for last in want]
    curves.finish()  # nothing put off: nothing drawn again
    assert len(drawn) == len(want)


def test_a_stopped_run_draws_the_epochs_it_ended(tmp_path, monkeypatch):
    """Epochs of a few steps put their drawings off; a run stopped by SIGTERM in its third epoch still draws
    the two it ended, as one that runs to its end draws all of its epochs."""
    from netdsl.train import runs

    drawn = []
    monkeypatch.setattr(runs, "plot_curves", lambda path, epochs: drawn.append([line["epoch"] for line in epochs]))
    net, data = small_run_args(tmp_path)
    assert small_train(net, data, tmp_path / "whole", "--epochs", 3) == 0
    assert drawn[-1] == [1, 2, 3]
    stop_during_step(monkeypatch, 15)  # 6 steps an epoch
    assert small_train(net, data, tmp_path / "stopped", "--epochs", 3) == 128 + signal.SIGTERM
    assert drawn[-1] == [1, 2]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(tmp_path, dtype):
    """bf16 autocast, and fp16 with loss scaling: the weights stay float32 and finite, and move."""
    net, data = small_run_args(tmp_path)
    run = tmp_path / "run"
    assert small_train(net, data, run, "--steps", 3, "--dtype", dtype) == 0
    weights = checkpoint_weights(run)
    assert all(value.dtype == torch.float32 and bool(torch.isfinite(value).all()) for value in weights.values())
    start = init_weights(netdsl.load_graph(net), seed=11)
    assert max(float((weights[name] - torch.from_numpy(value)).abs().max()) for name, value in start.items()) > 1e-4


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--data", "no/such/folder"), "no such data folder or file"),
        (("--data", "DATA", "--lr", "0"), "--lr"),
        (("--data", "DATA", "--batch", "0"), "--batch"),
        (("--data", "DATA", "--batch", "100000"), "fewer than one batch"),
        (("--data", "DATA", "--batch", "8", "--lr-mult", "nothing.*=2"), "matches no weight of the net"),
        ((), "no training data given"),
    ],
)
def test_mistakes_are_one_clear_error(tmp_path, capsys, extra, message):
    data = arrays(tmp_path / "d.npz", (1, 32, 32), 16, 10, seed=0)
    args = [str(data) if arg == "DATA" else arg for arg in extra]
    code = train(LENET, *args, "--out", tmp_path / "run", "--epochs", 1, *PLAIN)
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_labels_beyond_the_nets_outputs_and_maps_as_outputs_are_refused(tmp_path, capsys):
    data = arrays(tmp_path / "d.npz", (1, 32, 32), 16, 12, seed=0)
    assert train(LENET, "--data", data, "--out", tmp_path / "a", *PLAIN) == 1
    assert "12" in capsys.readouterr().err
    net = tmp_path / "map.net"
    net.write_text("net m\ninput image: 1 x 8 x 8\nc = conv(image, 3, size=3)\noutput c\n")
    assert train(net, "--data", arrays(tmp_path / "e.npz", (1, 8, 8), 8, 3, seed=0), "--out", tmp_path / "b") == 1
    assert "not one score per class" in capsys.readouterr().err


def test_unwritable_run_folder_and_full_disk(tmp_path, capsys, monkeypatch):
    net, data = small_run_args(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert small_train(net, data, blocker / "run", "--steps", 1) == 1
    assert "cannot create the run folder" in capsys.readouterr().err

    run = tmp_path / "run"
    assert small_train(net, data, run, "--epochs", 1) == 0
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    import netdsl.files

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(netdsl.files.os, "write", full, raising=True)
    monkeypatch.setattr(netdsl.files.os, "fdopen", lambda handle, mode: _FullDisk(handle))
    assert train("--resume", run, "--epochs", 2, "--workers", 0) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    monkeypatch.undo()
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not [path for path in (run / "checkpoints").iterdir() if path.name.startswith(".")]


class _FullDisk:
    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.handle)

    def write(self, data):
        raise OSError(28, "No space left on device")


def test_resuming_another_net_or_a_damaged_checkpoint_is_refused(tmp_path, capsys):
    net, data = small_run_args(tmp_path)
    run = tmp_path / "run"
    assert small_train(net, data, run, "--steps", 2) == 0
    assert train(LENET, "--resume", run) == 1
    assert "trained on another net" in capsys.readouterr().err
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    assert train("--resume", run) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "record",
    ["{not json", "[" * 100_000 + "]" * 100_000, "[1, 2]", None],
    ids=["not-json", "nested-too-deep", "a-list", "no-step"],
)
def test_a_checkpoint_whose_record_of_the_run_is_damaged_is_refused(tmp_path, capsys, record):
    """The run's state is JSON in the checkpoint's header: damaged there, resuming says so and names the file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from netdsl.train.checkpoint import STATE_KEY

    net, data = tiny_run_args(tmp_path)
    run = tmp_path / "run"
    assert train(net, "--data", data, "--batch", 8, "--steps", 1, "--out", run, *PLAIN) == 0
    last = run / "checkpoints" / "last.ckpt"
    with safe_open(str(last), framework="pt") as file:
        metadata, tensors = file.metadata(), {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    if record is None:
        state = json.loads(metadata[STATE_KEY])
        del state["step"]
        record = json.dumps(state)
    save_file(tensors, str(last), metadata={**metadata, STATE_KEY: record})
    capsys.readouterr()
    assert train("--resume", run) == 1
    err = capsys.readouterr().err
    assert f"{last}: error: the checkpoint's record of the run is damaged" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", "recipe.json is not a run's record"),
        ("[]", "recipe.json is not a run's record"),
        (None, "recipe.json does not name the run's net"),  # the run's record without its `net`
    ],
)
def test_resuming_with_a_damaged_recipe_json_is_an_error_naming_it(tmp_path, capsys, content, message):
    net, data = tiny_run_args(tmp_path)
    run = tmp_path / "run"
    assert train(net, "--data", data, "--batch", 8, "--steps", 1, "--out", run, *PLAIN) == 0
    record = json.loads((run / "recipe.json").read_text())
    del record["net"]
    (run / "recipe.json").write_text(content if content is not None else json.dumps(record))
    capsys.readouterr()
    assert train("--resume", run) == 1
    err = capsys.readouterr().err
    assert f"{run / 'recipe.json'}: error: {message}" in err and "hint:" in err and "Traceback" not in err


def test_check_grads_agrees_with_finite_differences(capsys):
    assert main(["train", LENET, "--check-grads", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "finite difference" in out and "worst error" in out
    assert out.count("c1.weight") >= 3 and out.count("f7.bias") >= 3


def test_check_grads_leaves_out_a_layer_no_output_reads(tmp_path, capsys):
    """A dangling layer has no gradient (it is not trained): --check-grads crashed on it (internal error)."""
    net = tmp_path / "dead.net"
    net.write_text(Path(LENET).read_text().replace("output f7", "side = fc(c3, 7)\noutput f7"))
    assert main(["train", str(net), "--check-grads", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "worst error" in out and "side." not in out and out.count("f7.weight") >= 3


def test_the_python_example_of_docs_training_md_runs(monkeypatch):
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    monkeypatch.chdir(ROOT)
    exec(compile(example, "docs/training.md", "exec"), {"__name__": "docs_example"})


def test_a_state_dict_saved_as_safetensors_is_what_netdsl_run_reads(tmp_path):
    """A user's own loop: the module's state_dict, saved with safetensors, runs with `netdsl run --weights`."""
    from safetensors.torch import save_file

    from netdsl.runtime.module import GraphModule

    module = GraphModule(netdsl.load_graph(LENET), init="he", seed=5)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param in module.parameters():  # a "trained" net: not the initial weights
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    save_file(module.state_dict(), tmp_path / "mine.safetensors")
    x = np.random.default_rng(1).standard_normal((3, 1, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    assert main(["run", LENET, "--weights", str(tmp_path / "mine.safetensors"), "--input", str(tmp_path / "x.npy"),
                 "--backend", "torch", "--save", str(out)]) == 0  # fmt: skip
    with torch.no_grad():
        want = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(out), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on a CPU needs a C compiler")
def test_the_step_under_torch_compile_gives_the_eager_steps(tmp_path, capsys):
    """LeNet-5 (no dropout: compiled code draws its masks from a generator of its own) under torch.compile
    steps as eager PyTorch does at batch 4; at batch 16 torch 2.13's CPU compiler computes zero gradients
    for LeNet-5's convs (its hand-written model too), which the first step's check catches."""
    data = arrays(tmp_path / "d.npz", (1, 32, 32), 32, 10, seed=8)
    runs = {mode: tmp_path / mode for mode in ("eager", "compiled")}
    for mode, run in runs.items():
        extra = ("--compile",) if mode == "compiled" else ()
        assert train(LENET, "--data", data, "--batch", 4, "--steps", 3, "--out", run, *PLAIN, *extra) == 0
    want, got = (checkpoint_weights(run) for run in runs.values())
    for name, value in want.items():
        np.testing.assert_allclose(got[name].numpy(), value.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    # in 2 parts of 2 (LeNet-5 has no batch norm: the steps of the whole batch), the first step's check replaying
    # the parts in eager PyTorch
    parts = tmp_path / "compiled_parts"
    extra = ("--compile", "--accumulate", 2)
    assert train(LENET, "--data", data, "--batch", 4, "--steps", 3, "--out", parts, *PLAIN, *extra) == 0
    for name, value in want.items():
        got = checkpoint_weights(parts)[name].numpy()
        np.testing.assert_allclose(got, value.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    # Whatever the compiler does at batch 16, netdsl never trains through wrong gradients: the run either
    # steps as eager PyTorch does, or stops at the first step saying why.
    capsys.readouterr()
    big = {mode: tmp_path / f"big_{mode}" for mode in ("eager", "compiled")}
    assert train(LENET, "--data", data, "--batch", 16, "--steps", 1, "--out", big["eager"], *PLAIN) == 0
    code = train(LENET, "--data", data, "--batch", 16, "--steps", 1, "--out", big["compiled"], "--compile", *PLAIN)
    err = capsys.readouterr().err
    if code == 0:
        want, got = (checkpoint_weights(run) for run in big.values())
        for name, value in want.items():
            np.testing.assert_allclose(got[name].numpy(), value.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    else:
        assert code == 1 and "--compile: error: torch.compile computed gradients" in err, err


# --- netdsl eval --------------------------------------------------------------------------------------------


def evaluate(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_takes_the_runs_split_from_a_checkpoint_too(tmp_path, capsys):
    """A run with seed 5 and half the images held out (the data has no validation part of its own): measured
    through the run folder, its checkpoint, or that checkpoint moved elsewhere, it is the run's split, the
    one --seed 5 --val-fraction 0.5 names; a plain weights file without them measures another."""
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    rng = np.random.default_rng(6)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((40, 1, 8, 8)).astype(np.float32), y=np.arange(40) % 4)
    run = tmp_path / "run"
    assert train(net, "--data", data, "--batch", 8, "--steps", 2, "--seed", 5, "--val-fraction", 0.5, "--out", run,
                 *PLAIN) == 0  # fmt: skip
    moved = tmp_path / "elsewhere.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", moved)
    plain = tmp_path / "plain.safetensors"
    shutil.copy(run / "weights.safetensors", plain)
    reports = {}
    for name, weights, extra in [
        ("folder", run, ()),
        ("checkpoint", run / "checkpoints" / "last.ckpt", ()),
        ("moved", moved, ()),
        ("flags", plain, ("--seed", 5, "--val-fraction", 0.5)),
        ("defaults", plain, ()),
    ]:
        code, out, err = evaluate(capsys, net, "--weights", weights, "--data", data, *extra)
        assert code == 0, err
        reports[name] = out
    assert reports["folder"].startswith("images 20 ")
    assert reports["checkpoint"] == reports["moved"] == reports["flags"] == reports["folder"]
    assert not reports["defaults"].startswith("images 20 ")


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_eval_refuses_a_seed_train_refuses(tmp_path, capsys, seed):
    net, data = tiny_run_args(tmp_path)
    run = tmp_path / "run"
    assert train(net, "--data", data, "--batch", 8, "--steps", 1, "--out", run, *PLAIN) == 0
    code, _, err = evaluate(capsys, net, "--weights", run, "--data", data, "--seed", seed)
    assert code == 1 and f"argument --seed: not a seed (a whole number from 0 to 4294967295): '{seed}'" in err
    assert "Traceback" not in err


def test_eval_skips_corrupt_images_as_the_run_did_or_as_told(tmp_path, capsys, monkeypatch):
    """The torn file lies in the run's training part: `eval` of all the images skips it as the run did, or
    as told; `eval` of the validation part does not look at it at all, nor (with no scan record to compare
    with) at any file's size and time."""
    from netdsl.train import scan

    folder = gray_folder(tmp_path / "images", (8, 8), 1, "a/9.png")
    net = tmp_path / "tiny.net"
    net.write_text(TINY)
    run = tmp_path / "run"
    assert train(net, "--data", folder, "--batch", 4, "--steps", 1, "--skip-corrupt", "--out", run, *PLAIN) == 0
    code, out, err = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all")  # the run's skip
    assert code == 0 and "skipped 1 unreadable images" in err and out.startswith("images 12 ")
    code, _, err = evaluate(capsys, net, "--weights", run, "--data", folder, "--split", "all", "--no-skip-corrupt")
    assert code == 1 and "9.png" in err and "--skip-corrupt" in err and "Traceback" not in err
    plain = tmp_path / "plain.safetensors"
    shutil.copy(run / "weights.safetensors", plain)
    assert evaluate(capsys, net, "--weights", plain, "--data", folder, "--split", "all")[0] == 1
    code, out, err = evaluate(capsys, net, "--weights", plain, "--data", folder, "--skip-corrupt", "--split", "all")
    assert code == 0 and "skipped 1 unreadable images" in err and out.startswith("images 12 ")
    monkeypatch.setattr(scan, "fingerprint", lambda *args: pytest.fail("a fingerprint no record needs"))
    code, out, err = evaluate(capsys, net, "--weights", plain, "--data", folder, "--no-skip-corrupt")
    assert code == 0 and "unreadable" not in err and out.startswith("images 2 ")


@pytest.mark.parametrize("schedule, said", [("plateau", True), ("cosine", False)])
def test_a_plateau_schedule_without_validation_says_its_rate_stays(tmp_path, capsys, schedule, said):
    net, _ = tiny_run_args(tmp_path)
    rng, data = np.random.default_rng(2), tmp_path / "no_val.npz"  # no validation arrays either
    np.savez(data, x=rng.standard_normal((40, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 40))
    args = ("--data", data, "--batch", 8, "--steps", 1, "--val-fraction", 0, "--schedule", schedule, *PLAIN)
    assert train(net, *args, "--out", tmp_path / "run") == 0
    assert ("the plateau schedule watches the validation error" in capsys.readouterr().err) == said


def test_a_folder_of_fewer_classes_than_the_net_scores_is_noted(tmp_path, capsys):
    """Two class folders for a 10-way net train, saying that 8 outputs are never a target; arrays, whose
    labels are the outputs' numbers, say nothing."""
    net, data = tiny_run_args(tmp_path)
    folder = gray_folder(tmp_path / "folder", (8, 8), seed=5, torn="a/notes.txt")
    args = ("--batch", 4, "--steps", 1, *PLAIN)
    assert train(net, "--data", folder, *args, "--out", tmp_path / "two") == 0
    assert "the net scores 10 classes and the data has 2: 8 of its outputs" in capsys.readouterr().err
    assert train(net, "--data", data, *args, "--out", tmp_path / "ten") == 0
    assert "never a target" not in capsys.readouterr().err


def test_resume_finds_the_net_from_another_working_folder(tmp_path, monkeypatch):
    """recipe.json records the net relative to the run folder: a run started with a relative path resumes from
    anywhere; a record from before (relative to where the run was started) is still read there."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _, data = tiny_run_args(work)
    assert train("tiny.net", "--data", data, "--batch", 8, "--steps", 1, "--out", "runs/a", *PLAIN) == 0
    assert json.loads((work / "runs/a/recipe.json").read_text())["net"] == "../../tiny.net"
    monkeypatch.chdir(tmp_path)
    assert train("--resume", work / "runs/a", "--steps", 2) == 0
    record = json.loads((work / "runs/a/recipe.json").read_text())
    (work / "runs/a/recipe.json").write_text(json.dumps({**record, "net": "tiny.net"}))  # an older run's record
    monkeypatch.chdir(work)
    assert train("--resume", "runs/a", "--steps", 3) == 0


def test_lines_of_metrics_jsonl_netdsl_did_not_write_are_dropped_at_resume(tmp_path):
    net, data = tiny_run_args(tmp_path)
    run = tmp_path / "run"
    assert train(net, "--data", data, "--batch", 8, "--steps", 2, "--out", run, *PLAIN) == 0
    metrics = run / "metrics.jsonl"
    kept = metrics.read_text()
    metrics.write_text(kept + '5\n["a"]\n{"step": "x"}\n{"kind": "step", "step": 1, "epoch": true}\n{"half": \n')
    assert train("--resume", run, "--steps", 3) == 0
    lines = metric_lines(run)
    assert [json.dumps(line, sort_keys=True) for line in lines[: len(kept.splitlines())]] == kept.splitlines()
    assert lines[-1]["step"] == 3 and all(isinstance(line, dict) for line in lines)


def test_eval_reads_past_a_damaged_checkpoint_record_to_the_run_folders(tmp_path):
    """A checkpoint's record of the run that is not JSON, or nested past Python's recursion limit, is skipped
    for the run folder's recipe.json (it raised RecursionError through eval before parse_json)."""
    from netdsl.cli.train import _run_settings
    from netdsl.train.checkpoint import STATE_KEY

    net, data = tiny_run_args(tmp_path)
    run = tmp_path / "run"
    assert train(net, "--data", data, "--batch", 8, "--steps", 1, "--seed", 7, "--out", run, *PLAIN) == 0
    last = run / "checkpoints" / "last.ckpt"
    for record in ("{not json", "[" * 100_000 + "]" * 100_000):
        assert _run_settings(last, {STATE_KEY: record})["seed"] == 7
