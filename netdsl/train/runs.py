"""A run folder: what one training run leaves behind, every file written atomically.

    RUN/
        recipe.json          the recipe as resolved (each value and where it came from), the net and its fingerprint
        metrics.jsonl        one JSON line per logged step and per epoch
        checkpoints/
            last.ckpt        the newest checkpoint (netdsl.train.checkpoint)
            best-e0007.ckpt  the best `keep_best` by validation top-1
        weights.safetensors  the best weights so far (the last ones before any validation), with the preprocessing
        curves.png           loss, top-1 and learning rate per epoch (with matplotlib installed)
        tensorboard/         the same as TensorBoard events (with tensorboard installed)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path

import networkx as nx

from netdsl.errors import NetError, os_hint
from netdsl.files import parse_json, write_atomic
from netdsl.runtime.weights import weight_specs
from netdsl.train import scan
from netdsl.train.figures import pyplot, save_png
from netdsl.train.recipe import Recipe

RECIPE = "recipe.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
WEIGHTS = "weights.safetensors"
CURVES = "curves.png"
ROOT = Path("runs")  # where a run without --out goes: runs/<net name>
MEASURED = ("images_per_s", "data_wait")  # a step record's timings: the one part a resumed run does not repeat
TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{16}$")  # netdsl.files.new_temporary's names


def weights_file(given: Path | None) -> Path | None:
    """What `--weights` names: a run folder of `netdsl train` stands for its weights.safetensors (its best
    weights); a file, or None, as it is."""
    return given / WEIGHTS if given is not None and given.is_dir() else given


def fingerprint(graph: nx.DiGraph) -> str:
    """What a checkpoint must match to be loaded into a net: the name of every weight and its shape."""
    specs = sorted((name, list(shape)) for name, shape in weight_specs(graph).items())
    return hashlib.sha256(json.dumps(specs).encode("utf-8")).hexdigest()


class RunFolder:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINTS
        self.last = self.checkpoints / LAST

    def check_new(self) -> None:
        """A new run must not overwrite an old one."""
        if self.last.exists():
            raise NetError(
                f"{self.path} already holds a training run",
                where=str(self.path),
                hint=f"continue it with --resume {self.path}, or give another --out",
            )

    def create(self, resume: bool) -> None:
        """Makes the folder (a new run must not overwrite an old one), or checks that a resumed one is there."""
        if resume:
            if not self.last.is_file():
                raise NetError(
                    f"{self.path} holds no checkpoint to resume from",
                    where=str(self.path),
                    hint=f"a run folder has {CHECKPOINTS}/{LAST} once its first checkpoint is written",
                )
            return
        self.check_new()
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise NetError(
                f"cannot create the run folder: {error.strerror or error}", where=str(self.path), hint=os_hint(error)
            ) from None
        if not os.access(self.checkpoints, os.W_OK):
            raise NetError("the run folder cannot be written", where=str(self.path), hint="give another --out")

    def read_scan(self) -> dict | None:
        """The record of the data's scan this run saved (netdsl.train.scan); None where there is none or it
        cannot be read (the data is scanned again: the record only saves time)."""
        try:
            return parse_json((self.path / scan.FILE).read_bytes())
        except (OSError, ValueError):
            return None

    def write_scan(self, record: dict) -> None:
        """Saves the data's scan record; a folder that cannot take it (a full disk) only loses the time saved."""
        with contextlib.suppress(OSError):
            write_atomic(self.path / scan.FILE, json.dumps(record, sort_keys=True) + "\n")

    def write_recipe(self, record: dict) -> None:
        write_atomic(self.path / RECIPE, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def read_recipe(self) -> dict:
        try:
            return parse_json((self.path / RECIPE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NetError(
                f"{RECIPE} is missing from the run folder",
                where=str(self.path),
                hint=f"a run folder of `netdsl train` holds {RECIPE}: put it back, or start a new run (--out)",
            ) from None
        except OSError as error:
            raise NetError(
                f"cannot read {RECIPE}: {error.strerror or error}", where=str(self.path), hint=os_hint(error)
            ) from None
        except ValueError as error:  # not UTF-8, or not JSON
            raise NetError(
                f"cannot read {RECIPE}: {error}",
                where=str(self.path),
                hint=f"the run's {RECIPE} was edited or damaged: put the file back, or start a new run (--out)",
            ) from None

    def saved_recipe(self) -> tuple[dict, Recipe]:
        """recipe.json's record (the net it names, ...) and the recipe in it, checked as a resume checks it."""
        record = self.read_recipe()
        where = str(self.path / RECIPE)
        if not isinstance(record, dict) or "recipe" not in record:
            raise NetError(
                f"{RECIPE} is not a run's record (no `recipe` in it): it was damaged",
                where=where,
                hint="restore it from a copy (netdsl writes it when a run starts), or start a new run",
            )
        return record, Recipe.from_dict(record["recipe"], where=where)

    def best(self, epoch: int) -> Path:
        """The checkpoint of epoch `epoch` (counted from 0) among the best: named by its number as the run's
        messages count epochs, from 1 (`best-e0005.ckpt` for "epoch 5")."""
        return self.checkpoints / f"best-e{epoch + 1:04d}.ckpt"

    def remove_stale_temporaries(self) -> None:
        """Temporary files a killed run left behind (never the checkpoints themselves)."""
        for folder in (self.path, self.checkpoints):
            for stale in folder.glob(".*"):
                if stale.is_file() and TEMPORARY.match(stale.name):
                    stale.unlink(missing_ok=True)


def _a_record(record) -> bool:
    """Whether a line of metrics.jsonl is a record as netdsl writes them (an object, its counts numbers)."""
    return isinstance(record, dict) and all(
        isinstance(record.get(key, 0), int) and not isinstance(record.get(key, 0), bool) for key in ("step", "epoch")
    )


_METRICS_HINT = f"{METRICS} is a file netdsl writes in the run folder: remove what stands in its place"


def metric_records(path: Path) -> list[dict]:
    """The records of the metrics file at `path`, in order (none where there is no file): lines a killed run
    left half-written, and lines netdsl did not write, are passed over."""
    if not path.is_file():
        return []
    try:  # bytes that are not UTF-8 spoil their line only, which is skipped as any line not netdsl's
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise NetError(
            f"cannot read {METRICS}: {error.strerror or error}", where=str(path), hint=os_hint(error)
        ) from None
    records = []
    for line in text.splitlines():
        try:
            record = parse_json(line)
        except ValueError:
            continue  # a line a killed run left half-written
        if _a_record(record):  # else not a line netdsl wrote: edited, or another file's
            records.append(record)
    return records


class Metrics:
    """metrics.jsonl: appended line by line; the whole file is rewritten atomically at each checkpoint,
    and on resume only the lines up to the checkpoint's step are kept, and of the epoch records those of
    the epochs it had ended (`keep_until_epoch`: a run stopped after an epoch's last step, resumed, and
    killed once that epoch's record was written but before its checkpoint, ends the epoch again)."""

    def __init__(self, path: Path, keep_until_step: int | None = None, keep_until_epoch: int | None = None) -> None:
        self.path = path
        self.lines: list[dict] = []
        if path.is_dir():
            raise NetError(f"{path} is a folder, not the run's {METRICS}", where=str(path), hint=_METRICS_HINT)
        if keep_until_step is not None and path.is_file():
            for record in metric_records(path):
                if record.get("step", 0) > keep_until_step:
                    continue
                unended = keep_until_epoch is not None and record.get("epoch", 0) > keep_until_epoch
                if record.get("kind") == "epoch" and unended:
                    continue  # the record of an epoch the checkpoint had not ended
                self.lines.append(record)
            self.flush()

    def add(self, record: dict) -> None:
        self.lines.append(record)
        try:
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as error:
            raise NetError(
                f"cannot write {METRICS}: {error.strerror or error}", where=str(self.path), hint=_METRICS_HINT
            ) from None

    def flush(self) -> None:
        write_atomic(self.path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in self.lines))

    def epochs(self) -> list[dict]:
        return [line for line in self.lines if line.get("kind") == "epoch"]


def plot_curves(path: Path, epochs: list[dict]) -> bool:
    """Loss, top-1 and learning rate per epoch as a PNG; False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    x = [line["epoch"] for line in epochs]
    figure, (loss, top1, rate) = plt.subplots(1, 3, figsize=(13, 3.6))
    loss.plot(x, [line["train_loss"] for line in epochs], label="train")
    top1.plot(x, [line["train_top1"] for line in epochs], label="train")
    validated = [line for line in epochs if line.get("val_top1") is not None]
    if validated:
        loss.plot([line["epoch"] for line in validated], [line["val_loss"] for line in validated], label="validation")
        top1.plot([line["epoch"] for line in validated], [line["val_top1"] for line in validated], label="validation")
    rate.plot(x, [line["lr"] for line in epochs])
    rate.set_yscale("log")
    for axes, title in ((loss, "loss"), (top1, "top-1 accuracy"), (rate, "learning rate")):
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    loss.legend()
    save_png(figure, path)
    return True


class Curves:
    """curves.png of a run's `Metrics`, redrawn at an epoch's end once the time since the last drawing is `SHARE`
    times what a drawing costs, and always when the run ends (`finish`). A drawing takes matplotlib about half a
    second: at every epoch it was 40% of LeNet-5's training on the digits (epochs of under a second); an AlexNet
    epoch of hours still gets its drawing each time."""

    SHARE = 20
    FIRST_COST = 0.5  # seconds, until the first drawing is timed: the first after about 10 s of training

    def __init__(self, path: Path, metrics: Metrics, clock=time.monotonic) -> None:
        self.path, self.metrics, self.clock = path, metrics, clock
        self.cost, self.last = self.FIRST_COST, clock()
        self.behind = False  # an epoch ended since the last drawing

    def epoch_ended(self) -> None:
        self.behind = True
        if self.clock() - self.last >= self.SHARE * self.cost:
            self._draw()

    def finish(self) -> None:
        """Draw the epochs that ended since the last drawing, if any: the run's last ones are always drawn."""
        if self.behind:
            self._draw()

    def _draw(self) -> None:
        started = self.clock()
        plot_curves(self.path, self.metrics.epochs())
        self.last = self.clock()
        self.cost, self.behind = self.last - started, False


class TensorBoard:
    """Scalars for TensorBoard when it is installed; nothing otherwise."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
            return
        self.writer = SummaryWriter(str(folder))

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
