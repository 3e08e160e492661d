"""The training loop: a net, a resolved recipe and a run folder in; trained weights, checkpoints and
metrics out.

One `Trainer` per process. Each step reads a batch (this rank's share of it under torchrun; mixed within
itself with `mixup` or `cutmix`, netdsl.train.mix), runs the
net's logits forward and the softmax cross-entropy backward with PyTorch autograd over the layer graph
(`netdsl.runtime.module.GraphModule`, every layer on its own device), in `accumulate` parts one after
another where asked (netdsl.train.step), sets every weight group's rate from the schedule and steps the
optimizer. Before a step changes any weight, the loss and every gradient are checked: a NaN or an
infinity stops the run with the first layer where it appeared. After each epoch: validation, the
schedule's plateau watch and early stopping's, the epoch's record, the checkpoints (the last, the best
few) and the curves; `early_stop` ends the run there. With `ema`, an average of the weights follows each
step, and validation and the saved weights are the average's (netdsl.train.average).
Ctrl-C or SIGTERM: a checkpoint at the end of the current step, then a clean exit; a run stopped after
an epoch's last step does that epoch's end when it resumes.

Everything random is seeded and saved (netdsl.train.checkpoint): on the CPU, N steps in one go and N/2
steps, a resume and N/2 more give the same weights bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F

from netdsl._version import __version__
from netdsl.compiler.backward import backward_choices
from netdsl.errors import NetError
from netdsl.ir import layer
from netdsl.lang.frontend import load_graph
from netdsl.runtime.arrays import all_finite
from netdsl.runtime.module import GraphModule
from netdsl.runtime.weights import save_weights
from netdsl.train.average import WeightAverage
from netdsl.train.banner import banner
from netdsl.train.checkpoint import (
    EARLIER_CHECKPOINT,
    Checkpoint,
    check_tensors,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state_by_name,
    rank_sums,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from netdsl.train.data import DataSplit, batches_per_epoch, loader, loading_workers, open_data, view_loader
from netdsl.train.diagnose import compiled_gradients_differ, first_non_finite_in_parts
from netdsl.train.evaluate import Tally, autocast, probabilities
from netdsl.train.mix import Mixing
from netdsl.train.optim import make_optimizer, param_groups, set_learning_rate
from netdsl.train.progress import Meter, Progress, epoch_line, waited
from netdsl.train.recipe import Recipe
from netdsl.train.runs import CURVES, METRICS, WEIGHTS, Curves, Metrics, RunFolder, TensorBoard, fingerprint
from netdsl.train.schedule import EarlyStop, Schedule
from netdsl.train.start import Start, chosen_preprocess, saved_preprocess, scaling
from netdsl.train.step import backward_in_parts, split
from netdsl.train.world import World, collective_failure, lost_rank_error


class StoppedError(Exception):
    """Ctrl-C or SIGTERM during training: a checkpoint was written, the run can be resumed."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by signal {signum} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


@dataclass
class Summary:
    epochs: int
    steps: int  # the run's steps, from its start
    best_top1: float | None
    best_epoch: int | None
    weights: Path
    seconds: float
    steps_run: int = 0  # the steps this call took (fewer than `steps` after a resume)
    final_top1: float | None = None  # the last weights' validation, for a run that ends inside an epoch


def class_count(graph) -> int:
    """The number of classes a net scores: its one output must be K scores (K, or K x 1 x 1)."""
    outputs = graph.graph["outputs"]
    if len(outputs) != 1:
        raise NetError(
            f"the net has {len(outputs)} outputs; training needs one, the class scores",
            where="net",
            hint="declare a single `output` (the fc or softmax that scores the classes)",
        )
    item = layer(graph, outputs[0])
    shape = tuple(item.shape)
    if len(shape) == 1 or (len(shape) == 3 and shape[1:] == (1, 1)):
        return shape[0]
    raise NetError(
        f"the net's output `{item.name}` is {' x '.join(map(str, shape))}, not one score per class",
        span=item.span,
        hint="end the net with an fc layer (or a global_avgpool) giving one score per class",
    )


class Trainer:
    def __init__(
        self,
        net: Path,
        recipe: Recipe,
        run: RunFolder,
        *,
        devices: dict[str, str] | str | None = None,
        resume: bool = False,
        stream: TextIO | None = None,
        world: World | None = None,
    ) -> None:
        self.net_path, self.recipe, self.run = Path(net), recipe, run
        self.world = world or World.from_environment()
        self.world.join(recipe.timeout)
        self.stream = stream or sys.stderr  # looked up now: a caller may have replaced sys.stderr
        self.graph = load_graph(net)
        self.classes = class_count(self.graph)
        if recipe.data is None:
            raise NetError("no training data given", where="--data", hint="--data DIR, --data x.npz or --data digits")
        if recipe.batch % self.world.size:
            raise NetError(
                f"a batch of {recipe.batch} does not split evenly over {self.world.size} processes",
                where="--batch",
                hint=f"use a multiple of {self.world.size}",
            )
        self.rank_batch = recipe.batch // self.world.size
        if self.rank_batch % recipe.accumulate:
            size, parts = self.world.size, recipe.accumulate
            each = (
                f"each process's {self.rank_batch} images of the batch of {recipe.batch} do"
                if size > 1
                else f"a batch of {recipe.batch} images does"
            )
            raise NetError(
                f"{each} not split into {parts} equal parts",
                where="--accumulate",
                hint=f"make the batch a multiple of {size * parts}"
                + (f" ({size} processes x {parts} parts)" if size > 1 else "")
                + ", or take a number of parts it divides into",
            )
        self.part_batch = self.rank_batch // recipe.accumulate  # what runs through the net at once
        # fine-tuning: the weights to start from (read before the data: they say which mean and std they expect)
        self.start = Start.read(recipe.weights, self.graph) if recipe.weights is not None and not resume else None
        if self.start is not None:
            self._expects = self.start.preprocess
        else:  # a resumed run that started from weights: their mean and std are in its own checkpoint
            self._expects = saved_preprocess(self.run.last) if recipe.weights is not None else None
        self.workers, note = loading_workers(recipe.workers, sharing=self.world.local_size)
        if note and self.world.leader:
            self._say(note)
        self.data = self._open_data()
        self.steps_per_epoch = batches_per_epoch(len(self.data.train), self.rank_batch, self.world.size, drop_last=True)
        if self.steps_per_epoch < 1:
            raise NetError(
                f"the training set has {len(self.data.train)} images, fewer than one batch of {recipe.batch}",
                where="--batch",
                hint="use a smaller batch",
            )
        if recipe.steps is not None:
            self.total_steps = recipe.steps
            self.total_epochs = math.ceil(recipe.steps / self.steps_per_epoch)
        else:
            self.total_epochs = recipe.epochs
            self.total_steps = recipe.epochs * self.steps_per_epoch
        self.module = GraphModule(
            self.graph,
            devices=self.world.device_map(self.graph, devices),
            seed=recipe.seed,
            init=recipe.init,
            backend=recipe.backend,
            backward=self._backward_choices(),
            recompute=recipe.recompute,
        )
        if self.start is not None:
            self.start.load_into(self.module)
        self.names = {id(param): name for name, param in self.module.named_parameters()}
        self.optimizer = make_optimizer(
            recipe.optimizer,
            param_groups(
                self.module.named_parameters(), list(recipe.lr_mults), list(recipe.decay_mults), where=recipe.source
            ),
            recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            nesterov=recipe.nesterov,
            betas=tuple(recipe.betas),
            eps=recipe.eps,
            fused=recipe.backend == "triton",  # the update as one kernel over flat buffers per device
        )
        self.schedule = Schedule(
            recipe.schedule,
            every=recipe.step_epochs,
            milestones=recipe.milestones,
            gamma=recipe.gamma,
            epochs=self.total_steps / self.steps_per_epoch,  # the run's length: --steps may end inside an epoch
            min_factor=recipe.cosine_floor,
            power=recipe.power,
            patience=recipe.patience,
            max_drops=recipe.max_drops,
            threshold=recipe.threshold,
            warmup_epochs=recipe.warmup_epochs,
        )
        self.early = EarlyStop(recipe.early_stop, recipe.threshold)
        self.average = WeightAverage(recipe.ema)  # what validation measures and the run saves, with `ema`
        self.mixing = Mixing(recipe.mixup, recipe.cutmix, recipe.seed)
        self.device = next(iter(self.module.devices.values()))
        self.scaler = torch.amp.GradScaler(self.device.type) if recipe.dtype == "fp16" else None
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.epoch_sums = [0.0, 0.0, 0.0]  # this epoch so far: loss sum, correct, images
        self.window_sums = [0.0, 0.0, 0.0]  # the same since the last logged step
        self.best: list[list] = []  # [top-1, epoch, checkpoint file name], best first
        self.ended = False  # whether the checkpoint resumed from was the run's last (its last weights measured)
        if resume:
            self._resume()
        else:  # dropout's masks: a stream of this seed's and rank's own, saved in every checkpoint
            torch.manual_seed(int(np.random.SeedSequence([recipe.seed, self.world.rank]).generate_state(1)[0]))
        self.model = self._wrap()
        # torch.compile's gradients are compared with eager PyTorch's once, on the first step, where the
        # two can be compared: one process (DDP averages the compiled ones) and no dropout (compiled code
        # draws its masks from a generator of its own)
        self._unchecked_compile = (
            recipe.compile
            and not self.world.distributed
            and not any(self.graph.nodes[name]["layer"].op == "dropout" for name in self.graph.nodes)
        )
        self._signal: int | None = None

    # --- set-up -----------------------------------------------------------------------------------

    def _open_data(self) -> DataSplit:
        recipe = self.recipe
        channels, height, width = layer(self.graph, self.graph.graph["inputs"][0]).shape
        if recipe.crop != "auto" and tuple(recipe.crop) != (height, width):
            raise NetError(
                f"the crop {recipe.crop[0]} x {recipe.crop[1]} is not the net's input {height} x {width}",
                where="--crop",
                hint="the crop is what the net reads: leave it `auto`, or change the net's input",
            )
        self._saved_scan = self.run.read_scan()  # a resumed run's record: its files are not decoded again
        size, jitter = scaling(recipe, height, width)  # the size validation scales to; the training sizes
        split = open_data(
            recipe.data,
            (channels, height, width),
            num_outputs=self.classes,
            size=size,
            largest=None if jitter is None else jitter[1],
            val_fraction=recipe.val_fraction,
            seed=recipe.seed,
            std=recipe.std == "auto",
            skip_corrupt=recipe.skip_corrupt,
            workers=self.workers,
            scan_record=self._saved_scan,
            world=self.world,
            meter=lambda title, images: Meter(self.stream, images, title, self.world),
            val_spec=recipe.val_data,
        )
        preprocess, self._adopted = chosen_preprocess(split.preprocess, recipe, self._expects)
        for samples in (split.train, split.val):
            if samples is not None:
                samples.preprocess = preprocess
        chosen = {"sizes": jitter, "area": recipe.crop_area, "aspect": recipe.crop_aspect}
        darknet = {name: getattr(recipe, name) for name in ("saturation", "exposure", "hue", "angle")}
        augment = replace(split.augment, flip=recipe.flip, pca_noise=recipe.pca_noise, **chosen, **darknet)
        augment.check_channels(channels, where=recipe.source)
        if split.skipped and self.world.leader:
            self._say(f"skipped {len(split.skipped)} unreadable images (first: {split.skipped[0]})")
        if len(split.classes) < self.classes and self.world.leader:  # a folder of named classes, fewer than scored
            self._say(
                f"note: the net scores {self.classes} classes and the data has {len(split.classes)}: "
                f"{self.classes - len(split.classes)} of its outputs are never a target (give the last layer "
                f"{len(split.classes)} outputs)"
            )
        if recipe.early_stop is not None and not (split.val is not None and len(split.val)):
            raise NetError(
                "early_stop watches the validation error, and there is no validation set",
                where=recipe.source("early_stop"),
                hint="give val_fraction above 0 (or data with validation images, or val_data), or leave out early_stop",
            )
        if recipe.schedule == "plateau" and not (split.val is not None and len(split.val)) and self.world.leader:
            self._say(
                "note: the plateau schedule watches the validation error, and there is no validation set: the rate "
                "stays at lr (give val_fraction above 0, or choose another schedule)"
            )
        return replace(split, preprocess=preprocess, augment=augment)

    def _wrap(self) -> torch.nn.Module:
        """What the step calls: the logits, under DDP when there are several processes, compiled if asked."""
        model: torch.nn.Module = _Logits(self.module)
        self._no_sync = None  # DDP's: a backward pass that does not average the gradients yet (all parts but the last)
        if self.recipe.channels_last and self.device.type == "cuda":
            self.module.to(memory_format=torch.channels_last)
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            places = set(self.module.devices.values())
            one_gpu = len(places) == 1 and self.device.type == "cuda"
            model = DistributedDataParallel(model, device_ids=[self.device] if one_gpu else None)
            self._no_sync = model.no_sync
        if self.recipe.compile:
            model = torch.compile(model)
        return model

    def _resume(self) -> None:
        saved = load_checkpoint(self.run.last)
        state = saved.state
        if state.get("fingerprint") != fingerprint(self.graph):
            raise NetError(
                f"the run was trained on another net ({state.get('net', '?')})",
                where=str(self.run.path),
                hint="resume with the net the run was started with",
            )
        check_tensors(saved, self.module.state_dict(), self.run.last)
        self.module.load_state_dict(saved.live or saved.weights, strict=True)  # with `ema`, `weights` average them
        self.average.load(saved.weights, saved.live, self.module)
        load_optimizer_state(self.optimizer, self.names, saved.optimizer, self.run.last)
        try:
            self.schedule.load_state_dict(state["schedule"])
            if "early_stop" in state:  # a checkpoint from before early stopping: the watch starts now
                self.early.load_state_dict(state["early_stop"])
            self.epoch, self.batch_in_epoch, self.step = (int(state[k]) for k in ("epoch", "batch_in_epoch", "step"))
            self.epoch_sums, self.window_sums = rank_sums(state, self.world.rank, self.world.size)
            self.best = [list(entry) for entry in state["best"]]
            self.ended = bool(state.get("ended", True))  # a checkpoint from before `ended`: as it was then
        except (KeyError, TypeError, ValueError) as error:
            raise NetError(
                f"the checkpoint's record of the run is damaged ({type(error).__name__}: {error})",
                where=str(self.run.last),
                hint=EARLIER_CHECKPOINT,
            ) from None
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        mine = f"rank{self.world.rank}/"
        if not any(name.startswith(mine) for name in saved.rng):
            mine = "rank0/"  # a run resumed with more processes than it had: they start from rank 0's state
        set_rng_states({name[len(mine) :]: value for name, value in saved.rng.items() if name.startswith(mine)})
        if state.get("world", 1) != self.world.size and self.world.leader:
            self._say(
                f"note: the run was started with {state.get('world', 1)} processes and continues with "
                f"{self.world.size}: the data each process reads from here on differs"
            )

    # --- the loop ---------------------------------------------------------------------------------

    def fit(self) -> Summary:
        started, first_step = time.perf_counter(), self.step
        final = None
        metrics = (
            Metrics(self.run.path / METRICS, keep_until_step=self.step, keep_until_epoch=self.epoch)
            if self.world.leader
            else None
        )
        board = TensorBoard(self.run.path / "tensorboard") if self.world.leader else None
        self._curves = Curves(self.run.path / CURVES, metrics) if self.world.leader else None
        if self.world.leader:
            self._say(banner(self))
            if self.start is not None:
                adopted = f"; {' and '.join(self._adopted)}, as they were trained" if self._adopted else ""
                self._say(self.start.summary() + adopted)
            if self.data.scan is not None and self.data.scan != self._saved_scan:
                self.run.write_scan(self.data.scan)
        try:
            with self._signals():
                if self.batch_in_epoch == self.steps_per_epoch:
                    # stopped after an epoch's last step, before its end (validation, records, checkpoints)
                    self._end_of_epoch(metrics, board)
                while self.step < self.total_steps and not self.early.stops:
                    self._epoch(metrics, board)
                if self.early.stops and self.world.leader:
                    self._say(f"stopped early after epoch {self.epoch}: {self.early.reason()}")
                if self.batch_in_epoch and (self.step > first_step or not self.ended):
                    # a run stopped during its last step measures its last weights when it resumes
                    final = self._validate_last(metrics)
                self._checkpoint(metrics, ended=True)
        except StoppedError:
            if self._curves is not None:
                self._curves.finish()
            raise
        else:
            if self._curves is not None:
                self._curves.finish()
        finally:
            if board is not None:
                board.close()
        best = self.best[0] if self.best else None
        return Summary(
            self.epoch,
            self.step,
            best[0] if best else None,
            best[1] if best else None,
            self.run.path / WEIGHTS,
            time.perf_counter() - started,
            steps_run=self.step - first_step,
            final_top1=final,
        )

    def _validate_last(self, metrics: Metrics | None) -> float | None:
        """A run that ends inside an epoch (`steps`) never reaches that epoch's validation: its last weights (in
        the last checkpoint) are measured here, recorded as `final` and said; weights.safetensors stays the best
        epoch's. None without validation images."""
        if self.data.val is None or not len(self.data.val):
            return None
        tally = self.validate()
        record = {
            "kind": "final",
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": self._base_rate(),
            "val_loss": tally.mean_loss,
            "val_top1": tally.accuracy,
            "val_top5": tally.top5_accuracy,
        }
        if metrics is not None:
            # a resume killed after writing this record, before the checkpoint that ends the run, wrote it already
            metrics.lines = [
                line for line in metrics.lines if (line.get("kind"), line.get("step")) != ("final", self.step)
            ]
            metrics.add(record)
            self._say(
                f"step {self.step} (inside epoch {self.epoch + 1}), the last weights: validation top-1 "
                f"{100 * tally.accuracy:.2f}%  loss {tally.mean_loss:.4f} ({self.run.last})"
            )
        return tally.accuracy

    def _epoch(self, metrics: Metrics | None, board: TensorBoard | None) -> None:
        recipe = self.recipe
        batches = self._training_batches(self.epoch, start_batch=self.batch_in_epoch)
        self.module.train()
        clock = [time.perf_counter(), 0, 0.0]  # since when; this process's images and seconds waiting for them
        progress = Progress(self.stream, len(batches), f"epoch {self.epoch + 1}/{self.total_epochs}", self.world)
        for x, y in waited(batches, clock):
            loss, correct = self._train_step(x, y)
            count = len(y)
            for sums in (self.epoch_sums, self.window_sums):
                sums[0] += loss * count
                sums[1] += correct
                sums[2] += count
            clock[1] += count
            self.batch_in_epoch += 1
            self.step += 1
            if self.step % recipe.log_every == 0 or self.step == self.total_steps:
                self._log_window(clock, metrics, board, progress)
            progress.advance()
            if (signum := self._stopping()) is not None:
                progress.close()
                raise StoppedError(signum, self.step, self._checkpoint(metrics))
            if self.step >= self.total_steps:
                break
            every = recipe.checkpoint_every
            if every and self.step % every == 0 and self.batch_in_epoch < self.steps_per_epoch:
                self._checkpoint(metrics)  # (after an epoch's last step, its end writes one)
        progress.close()
        if self.batch_in_epoch < self.steps_per_epoch:
            return  # the run ends inside this epoch
        self._end_of_epoch(metrics, board)

    def _training_batches(self, epoch: int, start_batch: int = 0):
        """This rank's shuffled, augmented batches of epoch `epoch` (from `start_batch` on)."""
        return loader(
            self.data.train,
            batch=self.rank_batch,
            seed=self.recipe.seed,
            epoch=epoch,
            start_batch=start_batch,
            augment=self.data.augment,
            workers=self.workers,
            rank=self.world.rank,
            world=self.world.size,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
        )

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        recipe = self.recipe
        factor = self.schedule.factor(self.epoch, self.batch_in_epoch, self.steps_per_epoch)
        set_learning_rate(self.optimizer, recipe.lr * factor)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if recipe.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixing:  # y: then a row of weights per image, its top-1 against the label of the larger share
            x, y = self.mixing(x, y, self.classes, self.epoch, self.batch_in_epoch, self.world.rank)
        parts = split(x, y, recipe.accumulate)
        before = rng_states()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss, logits = backward_in_parts(
                self.model, parts, self._loss, self._autocast, scaler=self.scaler, no_sync=self._no_sync
            )
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
        except RuntimeError as error:
            if self.world.distributed and collective_failure(error):
                raise lost_rank_error(error) from None
            raise
        finite = bool(torch.isfinite(loss))
        if finite and self.scaler is None:
            finite = all_finite(p.grad for p in self.module.parameters() if p.grad is not None)
        if not finite:
            self._diverged(parts, before, loss.item())
        if self._unchecked_compile:
            self._check_compiled_gradients(parts, before)
        if recipe.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), recipe.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.average.update(self.module)
        labels = y.argmax(dim=1) if y.dim() > 1 else y
        correct = int((logits.argmax(dim=1) == labels.to(logits.device)).sum())
        return loss.item(), correct

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Softmax cross-entropy on the logits: PyTorch's, or netdsl's kernel with the triton backend."""
        if self.recipe.backend == "triton":
            from netdsl.runtime.kernel_ops import cross_entropy

            return cross_entropy(logits, y, self.recipe.label_smoothing)[0]
        return F.cross_entropy(logits, y, label_smoothing=self.recipe.label_smoothing)

    def _check_compiled_gradients(self, parts: list, rng: dict) -> None:
        """The compiled step's gradients against the same step in eager PyTorch (same weights, batch and random
        state): a compiler that computes other gradients would train the net wrongly and silently."""
        self._unchecked_compile = False
        name = compiled_gradients_differ(self.module, self.optimizer, parts, rng, self._loss, self._autocast)
        if name is not None:
            raise NetError(
                f"torch.compile computed gradients for `{name}` that differ from eager PyTorch's on the first "
                "step: training under it would be wrong",
                where="--compile",
                hint=f"train without --compile (and report it to PyTorch: torch {torch.__version__})",
            )

    def _end_of_epoch(self, metrics: Metrics | None, board: TensorBoard | None) -> None:
        recipe = self.recipe
        loss_sum, correct, count = self.world.sum(self.epoch_sums)
        record = {
            "kind": "epoch",
            "epoch": self.epoch + 1,
            "step": self.step,
            "train_loss": loss_sum / count,
            "train_top1": correct / count,
            "lr": self._base_rate(),
            "val_loss": None,
            "val_top1": None,
            "val_top5": None,
        }
        validated = self.data.val is not None and len(self.data.val) and (self.epoch + 1) % recipe.val_every == 0
        if validated:
            tally = self.validate()
            record.update(val_loss=tally.mean_loss, val_top1=tally.accuracy, val_top5=tally.top5_accuracy)
        ended = self.epoch
        for watch in (self.schedule, self.early):
            watch.end_of_epoch(ended, 1.0 - record["val_top1"] if validated else None)
        improved = validated and self._rank_best(record["val_top1"], ended)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_sums = [0.0, 0.0, 0.0]
        self.window_sums = [0.0, 0.0, 0.0]  # a logged step's window stays inside its epoch
        if metrics is not None:
            # before the checkpoint that marks the epoch ended: a run killed between the two resumes from it
            # with the record, or from an earlier one that drops the record (keep_until_epoch) and redoes it
            metrics.add(record)
        self._checkpoint(metrics, best_epoch=ended if improved else None)
        if metrics is not None:
            self._curves.epoch_ended()
            board.scalars(self.step, {f"epoch/{key}": value for key, value in record.items() if key != "kind"})
            self._say(epoch_line(record, self.total_epochs))

    def validate(self) -> Tally:
        """Top-1, top-5 and loss on the validation set (each rank a share; summed over ranks)."""
        self.module.eval()
        tally = Tally(self.classes)
        views = self.recipe.views
        batches = view_loader(
            self.data.val,
            views=views,
            batch=max(1, self.part_batch // views),  # what fits: a part of a training batch
            workers=self.workers,
            rank=self.world.rank,
            world=self.world.size,
        )
        shown = Meter(self.stream, len(self.data.val), "validating", self.world, plain=False)  # a bar on a terminal
        with torch.no_grad(), self._autocast(), self.average.applied(self.module):
            for x, y in batches:
                shown.advance(len(y) * self.world.size)
                if len(y) == 0:
                    continue  # this rank's share of the last, short batch
                x = x.to(self.device)
                output = self.module(x.flatten(0, 1) if views > 1 else x)
                tally.add(probabilities(output, self.module.output_is_softmax, views), y)
        shown.close()
        self.module.train()
        return Tally.from_vector(self.classes, self.world.sum(tally.vector()))

    # --- checkpoints ------------------------------------------------------------------------------

    def _rank_best(self, top1: float, epoch: int) -> bool:
        """Whether epoch `epoch`'s validation top-1 is among the best `keep_best`; updates the list."""
        keep = self.recipe.keep_best
        if keep == 0 or (len(self.best) >= keep and top1 <= self.best[-1][0]):
            return False
        self.best.append([top1, epoch, self.run.best(epoch).name])
        self.best.sort(key=lambda entry: (-entry[0], entry[1]))
        for _, _, name in self.best[keep:]:
            (self.run.checkpoints / name).unlink(missing_ok=True)
        self.best = self.best[:keep]
        return True

    def _checkpoint(self, metrics: Metrics | None, best_epoch: int | None = None, ended: bool = False) -> Path:
        """Writes the last checkpoint (and, when epoch `best_epoch` ranks among the best, a best one), from
        rank 0; every rank's random state goes in. `ended`: the run's last, after everything it does."""
        every_rank = self.world.gather(rng_states())
        rng = {f"rank{rank}/{name}": value for rank, states in enumerate(every_rank) for name, value in states.items()}
        rank_sums = self.world.gather([*self.epoch_sums, *self.window_sums])
        if not self.world.leader:
            return self.run.last
        state = {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "epoch_sums": self.epoch_sums,
            "window_sums": self.window_sums,
            "rank_sums": rank_sums,  # what a resume reads; the two above are rank 0's, for older netdsl
            "schedule": self.schedule.state_dict(),
            "early_stop": self.early.state_dict(),
            "best": self.best,
            "recipe": self.recipe.to_dict(),
            "fingerprint": fingerprint(self.graph),
            "net": str(self.net_path),
            "world": self.world.size,
            "netdsl": __version__,
            "ended": ended,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        weights, live = self.average.saved(self.module.state_dict())
        optimizer = optimizer_state_by_name(self.optimizer, self.names)
        checkpoint = Checkpoint(weights, optimizer, rng, state, self.data.preprocess.to_json(), live)
        if not self.best or (best_epoch is not None and self.best[0][1] == best_epoch):
            # weights.safetensors: the best weights so far, or the last ones while nothing was validated; before
            # the checkpoint, so that a run killed between the two and resumed from the checkpoint has them
            save_weights(
                self.run.path / WEIGHTS,
                {name: value.detach().cpu().float().numpy() for name, value in checkpoint.weights.items()},
                metadata={"netdsl.preprocess": checkpoint.preprocess},
            )
        best = [self.run.best(best_epoch)] if best_epoch is not None else []
        save_checkpoint([self.run.last, *best], checkpoint)
        if metrics is not None:
            metrics.flush()
        return self.run.last

    def _diverged(self, parts: list, rng: dict, loss: float) -> None:
        """Stops the run at the first layer (in forward order) whose output or gradient is not finite."""
        smoothing = self.recipe.label_smoothing
        found = first_non_finite_in_parts(self.module, self.graph, parts, rng, self._autocast, smoothing)
        last = (
            f"the last good checkpoint is {self.run.last} (step {self._last_checkpoint_step()})"
            if self.run.last.is_file()
            else "no checkpoint was written yet"
        )
        raise NetError(
            f"step {self.step + 1} (epoch {self.epoch + 1}): the loss is {loss}; the first non-finite value is "
            f"{found.place}; the step was not applied and training stopped; {last}",
            where="training",
            hint=found.hint,
        )

    def _last_checkpoint_step(self) -> int | str:
        try:
            return load_checkpoint(self.run.last).state["step"]
        except NetError:
            return "?"

    # --- helpers ----------------------------------------------------------------------------------

    def _backward_choices(self) -> dict[str, str] | None:
        """With the triton backend, whose backward each conv and fc runs: netdsl's kernels, or PyTorch's
        where the shipped measurements (netdsl.compiler.backward_choice) found it faster."""
        if self.recipe.backend != "triton":
            return None
        choices = backward_choices(self.graph, self.part_batch, self.recipe.dtype)
        by_torch = [f"{name} ({choice.reason})" for name, choice in choices.items() if choice.implementation == "torch"]
        if by_torch:
            self._say(f"backward by PyTorch where measured faster: {', '.join(by_torch)}")
        return {name: choice.implementation for name, choice in choices.items()}

    def _autocast(self):
        return autocast(self.recipe.dtype, [self.device])

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT and SIGTERM end the current step, write a checkpoint and stop (`StoppedError`)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handler(signum, frame):
            if self._signal is not None:  # a second Ctrl-C: the default behaviour
                signal.signal(signum, previous[signum])
                signal.raise_signal(signum)
            self._signal = signum

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def _stopping(self) -> int | None:
        """The signal that stops the run after this step, or None. Processes stop together, when any of them got
        one: one that stopped alone would leave the others waiting in the next step's averaging (torchrun or a
        scheduler signals each process at its own moment). `_signal` stays what this process received: one
        that comes during the agreement counts at the next step's."""
        if not self.world.distributed:
            return self._signal
        return self.world.largest(self._signal or 0) or None

    def _log_window(self, clock: list, metrics: Metrics | None, board: TensorBoard | None, progress) -> None:
        """A step record: the loss and top-1 since the last one (`window_sums`, saved in checkpoints so that a
        resumed run logs what an uninterrupted one does), images/s since `clock` was started. The run's last step,
        logged off the interval, leaves the window open: a longer run resumed from there logs its next line over
        the steps the uninterrupted run's covers."""
        loss_sum, correct, count, seen = self.world.sum([*self.window_sums, clock[1]])
        seconds = max(time.perf_counter() - clock[0], 1e-9)
        lr = self._base_rate()
        record = {
            "kind": "step",
            "epoch": self.epoch + 1,
            "step": self.step,
            "loss": loss_sum / count,
            "top1": correct / count,
            "lr": lr,
            "images_per_s": seen / seconds,
            "data_wait": min(1.0, clock[2] / seconds),  # this process's share of the time waiting for batches
        }
        if self.step % self.recipe.log_every == 0:
            self.window_sums = [0.0, 0.0, 0.0]
        clock[:] = [time.perf_counter(), 0, 0.0]
        if metrics is not None:
            metrics.add(record)
            board.scalars(self.step, {"train/loss": record["loss"], "train/top1": record["top1"], "train/lr": lr})
            progress.show(record, self.total_steps, self.recipe.batch)

    def _base_rate(self) -> float:
        """The base rate of the step just taken, the recipe's times the schedule's factor: what the logs show
        (each weight's rate is this times its lr_mult, which may be 0)."""
        factor = self.schedule.factor(self.epoch, self.batch_in_epoch - 1, self.steps_per_epoch)
        return self.recipe.lr * factor

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class _Logits(torch.nn.Module):
    """The net's class scores (the input of a final softmax): what DDP and torch.compile wrap."""

    def __init__(self, module: GraphModule) -> None:
        super().__init__()
        self.net = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.logits(x)
