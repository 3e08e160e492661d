"""What a training run says while it runs: a progress bar per epoch (or a plain line per log interval), one
line per epoch, and the progress of the first reading of an image folder."""

from __future__ import annotations

import contextlib
import time
from typing import TextIO

from netdsl.train.world import World

# the share of a log interval the step spent waiting for its batch, from which the line shows it
SHOWN_WAIT = 0.1


def waited(batches, clock: list, now=time.perf_counter):
    """The batches, adding the seconds spent waiting for each after the first (the loader's lateness: a worker
    still decoding, or the training process preparing it itself) to clock[2]. The first batch's wait is the
    loader's start-up (its workers started, once an epoch), which more workers would only lengthen."""
    iterator = iter(batches)
    first = True
    while True:
        began = now()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        if not first:
            clock[2] += now() - began
        first = False
        yield batch


class Progress:
    """A tqdm bar on a terminal (when tqdm is installed), else a plain line per log interval."""

    def __init__(self, stream: TextIO, total: int, title: str, world: World) -> None:
        self.stream, self.bar = stream, None
        if not world.leader:
            return
        interactive = hasattr(stream, "isatty") and stream.isatty()
        if interactive:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=title, file=stream, leave=False, dynamic_ncols=True)
        self.title = title

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def show(self, record: dict, total_steps: int | None = None, batch: int | None = None) -> None:
        """One step record; with the run's `total_steps` and `batch`, its step out of the total and the time
        the rest would take at this record's rate (validation and checkpoints not counted: about)."""
        text = (
            f"loss {record['loss']:.4f}  top-1 {100 * record['top1']:.1f}%  lr {record['lr']:.3g}  "
            f"{record['images_per_s']:,.0f} img/s"
        )
        step = f"{record['step']:,}"
        if total_steps is not None and batch is not None:
            step += f"/{total_steps:,}"
            if record["step"] < total_steps and record["images_per_s"] > 0:
                text += f"  ~{duration((total_steps - record['step']) * batch / record['images_per_s'])} left"
        if record.get("data_wait", 0.0) >= SHOWN_WAIT:
            text += f"  waiting for data {record['data_wait']:.0%}"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            print(f"{self.title}  step {step}  {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


PLAIN_FROM = 5000  # images: a shorter pass (seconds) says nothing on a stream that is not a terminal


class Meter:
    """Progress through a pass over the images that is not an epoch (the first reading of an image folder, an
    hour at ImageNet's size): a tqdm bar on a terminal (when tqdm is installed), else, for a pass of
    PLAIN_FROM images or more, a line at each tenth with the time left (not with `plain` False: a pass that
    each epoch repeats). Rank 0 speaks for the processes."""

    def __init__(self, stream: TextIO, total: int, title: str, world: World, plain: bool = True) -> None:
        self.stream, self.total, self.title, self.done = stream, total, title, 0
        self.bar, self.lines, self.tenth = None, False, 1
        self.started = time.perf_counter()
        if not world.leader or total < 1:
            return
        if hasattr(stream, "isatty") and stream.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=title, file=stream, leave=False, dynamic_ncols=True, unit="img")
        self.lines = self.bar is None and plain and total >= PLAIN_FROM  # a log file, or a terminal without tqdm

    def advance(self, count: int) -> None:
        count = min(count, self.total - self.done)  # a share's estimate may overshoot the last batch
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.lines and self.done * 10 >= self.tenth * self.total:
            self.tenth = self.done * 10 // self.total + 1
            elapsed = time.perf_counter() - self.started
            if self.done < self.total:
                when = f"~{duration(elapsed * (self.total - self.done) / self.done)} left"
            else:
                when = f"in {duration(elapsed)}"
            print(f"{self.title}: {self.done:,}/{self.total:,} images, {when}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def duration(seconds: float) -> str:
    """A time left as a person reads it: 45s, 12m05s, 3h05m, 2d04h."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def epoch_line(record: dict, total: int) -> str:
    line = f"epoch {record['epoch']}/{total}  loss {record['train_loss']:.4f}  top-1 {100 * record['train_top1']:.2f}%"
    if record["val_top1"] is not None:
        line += f"  |  val loss {record['val_loss']:.4f}  top-1 {100 * record['val_top1']:.2f}%"
        if record.get("val_top5") is not None:  # none for five classes or fewer
            line += f"  top-5 {100 * record['val_top5']:.2f}%"
    return line + f"  |  lr {record['lr']:.3g}"
