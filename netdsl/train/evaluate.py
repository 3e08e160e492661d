"""Measuring a classifier: top-1 and top-5 accuracy, mean loss, per-class accuracy, the confusion matrix.

`Tally` adds up batches of class probabilities against their labels (from one process, or summed over
the ranks of a run); `probabilities` turns a net's output into them, averaging test-time views; `DenseScores`
gives them for whole images of any size (VGG's dense evaluation, netdsl.runtime.dense); `Measured` keeps each
image's figures (what `netdsl eval --save` writes and `--mistakes` lists).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from netdsl.errors import NetError
from netdsl.tables import format_table
from netdsl.train.augment import Preprocess
from netdsl.train.data import Samples, check_workers
from netdsl.train.figures import pyplot, save_png
from netdsl.train.samples import signals_to_the_main_process

MATRIX_CLASSES = 20  # up to this many classes the confusion matrix is printed whole (about 120 columns)
CONFUSED_PAIRS = 20  # beyond, the pairs of classes most often confused, largest count first
LABELLED_CLASSES = 40  # the drawn matrix names each class up to this many, else numbers a few
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the 16-bit dtypes, as autocast computes in them
DTYPES = ("fp32", *AUTOCAST)  # what training computes in, and so measuring


def autocast(dtype: str, devices) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` ("bf16", "fp16"; "fp32": nothing) on each kind of device among `devices`."""
    stack = contextlib.ExitStack()
    if dtype in AUTOCAST:
        for kind in sorted({torch.device(device).type for device in devices}):
            stack.enter_context(torch.autocast(kind, dtype=AUTOCAST[dtype]))
    return stack


def probabilities(output: torch.Tensor, is_softmax: bool, views: int = 1) -> torch.Tensor:
    """N*views x K (or N*views x K x 1 x 1) net outputs -> N x K class probabilities: the softmax of
    logits (a net that ends in softmax gives them already), averaged over each image's views as the
    paper averages its ten patches."""
    scores = output.float().flatten(1)
    probs = scores if is_softmax else torch.softmax(scores, dim=1)
    return probs.view(-1, views, probs.shape[1]).mean(dim=1)


class DenseScores:
    """An image's class probabilities by VGG's dense evaluation: the net's fc layers as convolutions over the
    whole image (netdsl.runtime.dense), its class scores averaged over the positions, their softmax, and with
    `flip` the mean of that and the mirror image's (VGG averaged both). `scores(x)`: x a C x H x W image, as
    the net's preprocessing leaves it (scaled, less the mean, over the std), at least the net's input in size.
    The dense net is built for each size of image met (the last few kept, all holding the same weights), on
    PyTorch's ops or (`backend="triton"`) netdsl's kernels, as GraphModule runs them; `dtype` "bf16" or "fp16":
    under autocast, as training computes in them."""

    KEPT = 16  # dense nets kept, by image size (each a plan around the weights all share)

    def __init__(
        self, graph, weights, devices=None, flip: bool = False, backend: str = "torch", dtype: str = "fp32"
    ) -> None:
        from netdsl.ir import layers
        from netdsl.runtime.dense import dense_weights
        from netdsl.runtime.devices import map_devices

        if devices is None:  # as `Net` places a net: a GPU for each of its devices where there are GPUs, else the CPU
            devices = map_devices(list(dict.fromkeys(item.device for item in layers(graph))), None)
        self.graph, self._weights, self.devices, self.flip = graph, dense_weights(graph, weights), devices, flip
        if dtype not in DTYPES:
            raise NetError(f"dense evaluation computes in {', '.join(DTYPES)}, not {dtype}", where="dtype",
                           hint="bf16 and fp16 run under autocast; tf32 is fp32 with TF32 products")  # fmt: skip
        self.backend, self.dtype = backend, dtype
        self.classes = math.prod(graph.nodes[graph.graph["outputs"][0]]["layer"].shape)
        self._nets: dict[tuple[int, int], torch.nn.Module] = {}

    def _net(self, height: int, width: int) -> torch.nn.Module:
        from netdsl.runtime.dense import dense_graph
        from netdsl.runtime.module import GraphModule

        key = (height, width)
        if key not in self._nets:
            # every size's net holds the first one's tensors: one copy of the weights, not one a size, made once
            # (the arrays are not needed after); built before the oldest is let go, so that one always remains
            shared = next(iter(self._nets.values()), None)
            graph = dense_graph(self.graph, height, width)
            net = GraphModule(graph, devices=self.devices, weights=self._weights, share=shared, backend=self.backend)
            self._weights = None
            if len(self._nets) >= self.KEPT:
                self._nets.pop(next(iter(self._nets)))
            self._nets[key] = net.eval()
        return self._nets[key]

    def scores(self, x: np.ndarray) -> torch.Tensor:
        return self.batch_scores(np.asarray(x)[None])[0]

    def batch_scores(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """N x C x H x W images of one size -> N x K class probabilities, each image's as `scores` gives it."""
        images = torch.as_tensor(x, dtype=torch.float32)
        count = len(images)
        if self.flip:
            images = torch.cat([images, images.flip(-1)])
        net = self._net(*images.shape[2:])
        with torch.no_grad(), autocast(self.dtype, net.devices.values()):
            logits = net.logits(images).float().cpu()
        probs = torch.softmax(logits.flatten(2).mean(dim=2), dim=1)
        return probs.view(2, count, -1).mean(dim=0) if self.flip else probs


PENDING_BATCHES = 4  # dense evaluation holds images waiting for others of their size up to this many passes' pixels


def scaled_images(samples: Samples, scales, views: int | None, batch: int, workers: int = 0):
    """Each image of `samples` decoded once and prepared by its preprocessing at each of `scales` (shorter
    sides), `batch` images at a time, in order, by `workers` loading processes. With `views`, yields tensors of
    N x scales x views x C x H x W (`Preprocess.views` at each scale); without, for dense evaluation, lists of
    (index, [the whole image scaled to each size, C x H' x W']). A file that cannot be read or scaled is a
    NetError naming it."""
    for made in prepared_images(samples, [(samples.preprocess, tuple(scales))], views, batch, workers):
        yield made[0]


def prepared_images(samples: Samples, ways, views: int | None, batch: int, workers: int = 0):
    """`scaled_images` for several ways of preparing the images, each a Preprocess and its scales (the models of
    an ensemble that prepare images otherwise, by their own mean, size or crop): yields for each chunk a list of
    what `scaled_images` yields, one for each way. Each image is decoded once for all the ways (once for each
    number of channels among them)."""
    check_workers(workers)
    chunks = [list(range(start, min(start + batch, len(samples)))) for start in range(0, len(samples), batch)]
    loader = DataLoader(  # _Scaled.__getitems__ makes each chunk whole: `tuple` hands it on as it is
        _Scaled(samples, [(preprocess, tuple(scales)) for preprocess, scales in ways], views),
        batch_sampler=chunks, num_workers=workers, collate_fn=tuple, worker_init_fn=signals_to_the_main_process,
        generator=torch.Generator(),  # DataLoader draws a base seed: from its own generator, not torch's global one
    )  # fmt: skip
    for made, failures in loader:
        if failures:
            index, message, hint = failures[0]
            raise NetError(message, where=samples.source(index), hint=hint)
        yield made


def dense_probabilities(
    samples: Samples, scales, scorer: DenseScores, batch: int, workers: int = 0, advance=None
) -> torch.Tensor:
    """N x K: each image of `samples` scaled by its own preprocessing to each of `scales`, scored by `scorer`,
    the probabilities averaged over the scales. Views that come out one size go through the net together, as
    many to a pass as hold the pixels of `batch` of the net's inputs (a whole photo is several crops' worth);
    views waiting for company are held to PENDING_BATCHES passes' pixels, the group with the most going first
    past that. `workers` processes decode and scale the images (batch / scales at a time, as the views do);
    `advance(n)` is told of each n views scored."""
    return dense_probabilities_by(samples, [(samples.preprocess, scales, [scorer])], batch, workers, advance)[0][0]


def dense_probabilities_by(samples: Samples, ways, batch: int, workers: int = 0, advance=None) -> list[list]:
    """`dense_probabilities` for the models of an ensemble, in ways of preparing the images, each a Preprocess,
    its scales and the scorers of the models that prepare images so: each scorer's N x K probabilities, a list
    for each way. Each image is decoded once for all the ways (`prepared_images`), and scaled once for all the
    scorers of a way."""
    dense = [DenseGroup(len(samples), scales, scorers, preprocess.crop, batch, advance)
             for preprocess, scales, scorers in ways]  # fmt: skip
    chunk = max(1, batch // max(len(scales) for _, scales, _ in ways))
    prepared = [(preprocess, scales) for preprocess, scales, _ in ways]
    for made in prepared_images(samples, prepared, None, chunk, workers):
        for into, each in zip(dense, made, strict=True):
            into.add(each)
    return [into.probabilities() for into in dense]


class DenseGroup:
    """Dense evaluation of `count` images by `scorers` (models that prepare images alike, their inputs `crop`
    in size), fed the images as `scaled_images` yields them without views (`add`), in any number of chunks:
    the views of one size are scored together, `dense_probabilities` says how. `probabilities()` scores the
    views still waiting and gives each scorer's N x K probabilities, averaged over the scales."""

    def __init__(self, count: int, scales, scorers: list[DenseScores], crop, batch: int, advance=None) -> None:
        self.scorers, self.advance = scorers, advance
        self.room = batch * crop[0] * crop[1]  # pixels a pass holds
        self.probs = [torch.zeros((count, len(scales), scorer.classes)) for scorer in scorers]
        self.waiting: dict[tuple[int, ...], list] = {}  # view shape -> [(index, scale number, view)]

    def add(self, made) -> None:
        """Take a chunk of (index, [the whole image at each scale])."""
        waiting = self.waiting
        for index, views in made:
            for scale, view in enumerate(views):
                waiting.setdefault(view.shape, []).append((index, scale, view))
                if len(waiting[view.shape]) * view.shape[1] * view.shape[2] >= self.room:
                    self._run(view.shape)
        while sum(len(group) * shape[1] * shape[2] for shape, group in waiting.items()) > PENDING_BATCHES * self.room:
            self._run(max(waiting, key=lambda shape: len(waiting[shape]) * shape[1] * shape[2]))

    def probabilities(self) -> list[torch.Tensor]:
        for shape in list(self.waiting):
            self._run(shape)
        return [each.mean(dim=1) for each in self.probs]

    def _run(self, shape) -> None:
        group, step = self.waiting.pop(shape), max(1, self.room // (shape[1] * shape[2]))
        for start in range(0, len(group), step):
            part = group[start : start + step]
            views = np.stack([view for _, _, view in part])
            for scorer, into in zip(self.scorers, self.probs, strict=True):
                for (index, scale, _), row in zip(part, scorer.batch_scores(views), strict=True):
                    into[index, scale] = row
            if self.advance is not None:
                self.advance(len(part))


class _Scaled:
    """The loader's side of `prepared_images`: a chunk of images, each decoded once and prepared in each way at
    each of its sizes (views written straight into the chunk's tensors, in shared memory when a worker makes
    them), with the failures reported rather than raised (as netdsl.train.data's batches do)."""

    def __init__(self, samples: Samples, ways: list[tuple[Preprocess, tuple[int, ...]]], views: int | None) -> None:
        self.samples, self.views = samples, views
        self.ways = [[replace(preprocess, size=size) for size in scales] for preprocess, scales in ways]
        self.readers = {}  # channels -> the samples, decoding to that many
        for preprocess, _ in ways:
            if preprocess.channels not in self.readers:
                self.readers[preprocess.channels] = copy.copy(samples)
                self.readers[preprocess.channels].preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, indices: list[int]):
        made, failures = [[] for _ in self.ways], []
        if self.views is not None:
            shapes = [(len(indices), len(way), self.views, way[0].channels, *way[0].crop) for way in self.ways]
            made = [torch.empty(shape) for shape in shapes]
            if get_worker_info() is not None:
                for each in made:
                    each.share_memory_()
        for row, index in enumerate(indices):
            images = {channels: reader.read(index, failures) for channels, reader in self.readers.items()}
            if any(image is None for image in images.values()):  # it could not be decoded
                continue
            try:
                for way, into in zip(self.ways, made, strict=True):
                    image = images[way[0].channels]
                    if self.views is None:
                        into.append((index, [each.normalize(each.pixels(image)) for each in way]))
                    else:
                        for scale, each in enumerate(way):
                            into[row, scale] = torch.from_numpy(each.views(image, self.views))
            except NetError as error:  # scaling it: past Pillow's bound on pixels, ...
                failures.append((index, error.message, error.hint))
        return made, failures


@dataclass
class Tally:
    classes: int
    count: int = 0
    top1: int = 0
    top5: int = 0
    loss: float = 0.0
    confusion: np.ndarray = field(default=None)  # true class x predicted class

    def __post_init__(self) -> None:
        if self.confusion is None:
            self.confusion = np.zeros((self.classes, self.classes), dtype=np.int64)

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        probs, labels = probs.detach().float().cpu(), labels.detach().cpu()
        best = probs.topk(min(5, probs.shape[1]), dim=1).indices
        self.count += len(labels)
        self.top1 += int((best[:, 0] == labels).sum())
        self.top5 += int((best == labels[:, None]).any(dim=1).sum())
        picked = probs.gather(1, labels[:, None]).clamp_min(1e-12)
        self.loss += float(-picked.log().sum())
        np.add.at(self.confusion, (labels.numpy(), best[:, 0].numpy()), 1)

    def vector(self) -> list[float]:
        """The tally as numbers, for summing over ranks (`from_vector` reads it back)."""
        return [self.count, self.top1, self.top5, self.loss, *self.confusion.ravel().tolist()]

    @classmethod
    def from_vector(cls, classes: int, values: list[float]) -> Tally:
        count, top1, top5, loss = values[:4]
        confusion = np.asarray(values[4:], dtype=np.float64).round().astype(np.int64).reshape(classes, classes)
        return cls(classes, round(count), round(top1), round(top5), loss, confusion)

    @property
    def accuracy(self) -> float:
        return self.top1 / self.count if self.count else math.nan

    @property
    def top5_accuracy(self) -> float | None:
        """None for a net of five classes or fewer, where every image is in its top five."""
        if self.classes <= 5:
            return None
        return self.top5 / self.count if self.count else math.nan

    @property
    def mean_loss(self) -> float:
        return self.loss / self.count if self.count else math.nan

    def per_class(self) -> np.ndarray:
        """Each class's accuracy (NaN for a class with no images)."""
        totals = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / totals

    def report(self, names: list[str]) -> str:
        """The summary, the per-class table and the confusion matrix as text."""
        top5 = "" if self.top5_accuracy is None else f"top-5 {100 * self.top5_accuracy:.2f}%   "
        lines = [f"images {self.count:,}   top-1 {100 * self.accuracy:.2f}%   {top5}loss {self.mean_loss:.4f}", ""]
        per_class, shown = self.per_class(), self._shown(names)
        rows = [
            (str(i), names[i] if i < len(names) else "-", str(int(self.confusion[i].sum())),
             "-" if math.isnan(per_class[i]) else f"{100 * per_class[i]:.1f}%")
            for i in shown
        ]  # fmt: skip
        lines += format_table(("class", "name", "images", "top-1"), rows, left={1})
        if len(shown) <= MATRIX_CLASSES:
            lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
            lines += format_table(*self._matrix_rows(shown), left=set())
        else:  # a matrix of 1,000 classes would be a million numbers: the pairs worth reading, and where the rest is
            lines += ["", f"most confused classes (of the {self.classes} x {self.classes} confusion matrix, which "
                      "--confusion OUT.png draws)"]  # fmt: skip
            lines += format_table(("true", "name", "predicted", "name", "images", "of the class"),
                                  self.confused_pairs(names), left={1, 3})  # fmt: skip
        return "\n".join(lines) + "\n"

    def _shown(self, names: list[str]) -> list[int]:
        """The classes a printed report lists: the data's named ones and any other with images (numbered data
        evaluated on weights that name fewer classes); a net may score more classes than the data has."""
        named = min(len(names), self.classes) or self.classes
        return [i for i in range(self.classes) if i < named or self.confusion[i].any()]

    def _matrix_rows(self, shown: list[int]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        """The printed matrix's header and rows: the `shown` classes, and where the net scores others, one
        column `other` counting the predictions of those."""
        other = len(shown) < self.classes
        rest = np.ones(self.classes, dtype=bool)
        rest[shown] = False
        header = ("", *map(str, shown), *(("other",) if other else ()))
        table = [
            (str(i), *map(str, self.confusion[i, shown]), *((str(self.confusion[i, rest].sum()),) if other else ()))
            for i in shown
        ]
        return header, table

    def confused_pairs(self, names: list[str], count: int = CONFUSED_PAIRS) -> list[tuple[str, ...]]:
        """Rows of the `count` largest off-diagonal entries (true class, predicted class), largest first and,
        between equal counts, in class order; none that are 0."""
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        flat = np.argsort(-off.ravel(), kind="stable")[:count]
        totals = self.confusion.sum(axis=1)
        rows = []
        for true, predicted in zip(*np.unravel_index(flat, off.shape)):
            if off[true, predicted] == 0:
                break
            share = f"{100 * off[true, predicted] / totals[true]:.1f}%"
            named = (class_name(names, true), class_name(names, predicted))
            rows.append((str(true), named[0], str(predicted), named[1], str(off[true, predicted]), share))
        return rows

    def plot_confusion(self, path: Path, names: list[str]) -> bool:
        """The confusion matrix as a PNG, rows normalized; False when matplotlib is not installed."""
        plt = pyplot()
        if plt is None:
            return False
        totals = self.confusion.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(totals > 0, self.confusion / np.maximum(totals, 1), 0.0)
        size = min(16.0, 3.0 + 0.45 * self.classes)
        figure, axes = plt.subplots(figsize=(size, size))
        image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        if self.classes <= LABELLED_CLASSES:
            ticks, labels = range(self.classes), [class_name(names, i)[:14] for i in range(self.classes)]
        else:  # a thousand names would be ink: about ten class numbers along each side
            ticks = range(0, self.classes, max(1, math.ceil(self.classes / 10)))
            labels = [str(tick) for tick in ticks]
        axes.set_xticks(ticks, labels, rotation=90)
        axes.set_yticks(ticks, labels)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(f"top-1 {100 * self.accuracy:.2f}% on {self.count:,} images")
        figure.colorbar(image, ax=axes, fraction=0.046)
        save_png(figure, path)
        return True


@dataclass
class Measured:
    """What `netdsl eval --save` writes and `--mistakes` reads: for each set of images measured, where each image
    came from (a file, or an array's row), its class probabilities and its label (in the weights' numbering)."""

    parts: list[tuple[list[str], torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def add(self, samples: Samples, probs: torch.Tensor, labels: torch.Tensor) -> None:
        sources = [samples.source(index) for index in range(len(samples))]
        self.parts.append((sources, probs.detach().float().cpu(), labels.detach().cpu()))

    def gathered(self, world) -> Measured:
        """Every rank's images, in the order one process measures them: rank r held rows r, r + size, ... of each
        set (`Samples.subset(arange(rank, n, size))`)."""
        if not world.distributed:
            return self
        every = world.gather([(sources, probs.numpy(), labels.numpy()) for sources, probs, labels in self.parts])
        whole = Measured()
        for part in range(len(self.parts)):
            shares = [sets[part] for sets in every]
            total = sum(len(sources) for sources, _, _ in shares)
            sources, probs = [""] * total, np.zeros((total, shares[0][1].shape[1]), dtype=np.float32)
            labels = np.zeros(total, dtype=np.int64)
            for rank, (names, rows, marks) in enumerate(shares):
                sources[rank :: world.size], probs[rank :: world.size], labels[rank :: world.size] = names, rows, marks
            whole.parts.append((sources, torch.from_numpy(probs), torch.from_numpy(labels)))
        return whole

    def arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        """The arrays `--save` writes: probabilities (N x K), labels and predictions (N), files (N), classes."""
        probs = torch.cat([probs for _, probs, _ in self.parts]).numpy()
        return {
            "probabilities": probs,
            "labels": torch.cat([labels for _, _, labels in self.parts]).numpy().astype(np.int64),
            "predicted": probs.argmax(axis=1).astype(np.int64) if len(probs) else np.zeros(0, dtype=np.int64),
            "files": np.asarray([source for sources, _, _ in self.parts for source in sources], dtype=str),
            "classes": np.asarray(names, dtype=str),
        }

    def mistakes(self, names: list[str], count: int) -> list[str]:
        """The `count` images the net got wrong most confidently (the highest probability given to a wrong
        class first), as a table: the file, its class, the class predicted and that probability."""
        arrays = self.arrays(names)
        label, predicted, probs = arrays["labels"], arrays["predicted"], arrays["probabilities"]
        wrong = np.flatnonzero(predicted != label)
        if not len(wrong):
            return ["no mistakes"]
        order = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:count]
        rows = [
            (arrays["files"][i], class_name(names, int(label[i])), class_name(names, int(predicted[i])),
             f"{probs[i, predicted[i]]:.3f}")
            for i in order
        ]  # fmt: skip
        title = f"the most confident mistakes ({len(order)} of {len(wrong):,})"
        return [title, *format_table(("image", "class", "predicted", "probability"), rows, left={0, 1, 2})]


def class_name(names: list[str], index: int) -> str:
    """Class `index`'s name; a net may score more classes than the data names (its number then)."""
    return names[index] if index < len(names) else str(index)
