"""Where a training run starts: from the recipe's initialization, or from weights trained before
(`weights = FILE|RUN`: fine-tuning, as Caffe's `train --weights`).

Weights are matched by name. Each of the net's weights the file holds starts from the file's values (batch
norm's running averages too); a weight the file lacks starts from `init`: a layer renamed in the net starts
afresh, as the last layer does when the classes change (`fc8` -> `fc8_scenes`). A weight the file holds in
another shape is an error saying so, and a file holding none of the net's weights is one too. The file's
other tensors are named in the log and left alone.

The weights' preprocessing record (`netdsl.preprocess`, which every run's weights carry) says which mean
and std the weights were trained with; `mean = auto` and `std = auto` take those (the statistics the
weights expect), where the training set's own would otherwise be measured, and so does `std` left at its
default. A resumed run reads them from its own checkpoint, not from the starting file, which it no longer
needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from netdsl.errors import NetError
from netdsl.runtime.weights import checked_weights, load_matching_weights, weight_specs, weights_metadata
from netdsl.train.augment import Preprocess
from netdsl.train.checkpoint import PREPROCESS_KEY
from netdsl.train.listing import names_image_files
from netdsl.train.recipe import Recipe
from netdsl.train.runs import weights_file


@dataclass
class Start:
    """Weights a run starts from."""

    path: Path  # the weights file (a run folder's weights.safetensors)
    values: dict[str, np.ndarray]  # the net's weights the file holds
    fresh: list[str]  # the net's weights it lacks: they start from `init`
    unused: list[str] = field(default_factory=list)  # the file's tensors the net has no weight for
    preprocess: Preprocess | None = None  # what the weights were trained with, where they say

    @classmethod
    def read(cls, given: str, graph: nx.DiGraph) -> Start:
        path = weights_file(Path(given))
        values, unused = load_matching_weights(path, graph)
        specs = weight_specs(graph)
        checked_weights(values, {name: specs[name] for name in values}, where=str(path))  # NaN, infinities
        fresh = [name for name in specs if name not in values]
        return cls(path, values, fresh, unused, saved_preprocess(path))

    def load_into(self, module: torch.nn.Module) -> None:
        """Copies the values into the module's weights and buffers, in place (the optimizer is made after)."""
        state = module.state_dict()
        with torch.no_grad():
            for name, value in self.values.items():
                state[name].copy_(torch.from_numpy(value))

    def summary(self) -> str:
        """The log's line: how many weights came from where."""
        total = len(self.values) + len(self.fresh)
        line = f"starting from {self.path}: {len(self.values)} of {total} weights"
        if self.fresh:
            line += f"; from `init`: {_listed(self.fresh)}"
        if self.unused:
            line += f"; not in the net, left out: {_listed(self.unused)}"
        return line


def saved_preprocess(path: Path) -> Preprocess | None:
    """The preprocessing record a weights file or checkpoint carries (None without one)."""
    text = weights_metadata(path).get(PREPROCESS_KEY)
    return Preprocess.from_json(text, str(path)) if text else None


def scaling(recipe: Recipe, height: int, width: int) -> tuple[int | None, tuple[int, int] | None]:
    """What the run scales images to, for a net taking height x width: the shorter side validation (and the
    saved preprocessing) takes, None for arrays used as they are; and with `resize = (low, high)` (VGG's
    scale jittering) the range training draws from, whose middle validation takes (VGG's Q)."""
    size = recipe.resize
    if size == "auto":
        files = names_image_files(recipe.data)
        return (round(min(height, width) * 256 / 224) if files else None), None
    if not isinstance(size, tuple):
        return size, None
    if recipe.crop_area is not None:
        raise NetError(
            "random-resized crops (crop_area) take their boxes from the image as stored: a range of sizes to "
            "scale it to (resize) would go unused",
            where=recipe.source("crop_area"),
            hint="give resize one size (what validation scales to), or leave out crop_area",
        )
    side = max(height, width)
    if size[0] < side:
        raise NetError(
            f"resize's low {size[0]} is below the net's input {height} x {width}: an image scaled to it would be "
            "stretched to the crop, not cropped",
            where=recipe.source("resize"),
            hint=f"give a low of at least {side}, e.g. resize = ({side}, {max(size[1], 2 * side)})",
        )
    return (size[0] + size[1]) // 2, size


def chosen_preprocess(measured: Preprocess, recipe: Recipe, expects: Preprocess | None) -> tuple[Preprocess, list[str]]:
    """The run's preprocessing: the data's (`measured`: its mean and std, the crop, the classes) with the
    recipe's `flip`, `mean` and `std`; `auto`, and std left at its default, take the mean and std the
    starting weights were trained with (`expects`, when it has the net's channels), else `auto` the
    measured ones. Also, for the log, what was taken from the weights."""
    channels = measured.channels
    expects = expects if expects is not None and expects.channels == channels else None
    preprocess, adopted = replace(measured, flip=recipe.flip), []
    if recipe.mean is None:
        preprocess = replace(preprocess, mean=(0.0,) * channels)
    elif recipe.mean != "auto":
        preprocess = replace(preprocess, mean=_per_channel(recipe.mean, channels, "--mean"))
    elif expects is not None:
        preprocess = replace(preprocess, mean=expects.mean)
        adopted.append(f"mean {_numbers(expects.mean)}")
    # std's default is `false`; starting from weights it is theirs too: a mean without its std would feed
    # the pretrained layers inputs of another scale
    std = "auto" if recipe.std is None and expects is not None and recipe.source("std") == "default" else recipe.std
    if std is None:
        preprocess = replace(preprocess, std=None)
    elif std != "auto":
        preprocess = replace(preprocess, std=_per_channel(std, channels, "--std"))
    elif expects is not None:
        preprocess = replace(preprocess, std=expects.std)
        adopted.append(f"std {_numbers(expects.std) if expects.std else 'none'}")
    return preprocess, adopted


def _per_channel(values, channels: int, flag: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise NetError(
            f"{len(values)} values for a net with {channels} input channels",
            where=flag,
            hint="give one value for all channels, or one per input channel",
        )
    return values


def _numbers(values) -> str:
    return "(" + ", ".join(f"{value:.4g}" for value in values) + ")"


def _listed(names: list[str], shown: int = 6) -> str:
    text = ", ".join(f"`{name}`" for name in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")
