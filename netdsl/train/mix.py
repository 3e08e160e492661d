"""Mixing the images of a training batch (`mixup = ALPHA`, `cutmix = ALPHA`): each image is blended with
another of its batch, and its label with the other's.

    mixup (Zhang et al., 2018)   x_i <- lam * x_i + (1 - lam) * x_j, lam ~ Beta(alpha, alpha)
    cutmix (Yun et al., 2019)    a box of x_j pasted into x_i: its sides sqrt(1 - lam) of the image's, its
                                 centre uniform over the image, clipped to it; lam then 1 - its exact share
    targets                      lam * onehot(y_i) + (1 - lam) * onehot(y_j) (label smoothing on top, in the loss)

j = perm[i], one random permutation of the batch; one lam (and one box) per batch. With both set, each batch
draws one of the two, evenly. Under torchrun each process mixes its own share of the batch, before it is
split into parts (`accumulate`), so a batch mixes alike whatever its parts.

The draws come from the run's seed, the epoch, the batch's place in it and the process's rank alone, so a
resumed run mixes exactly as the straight run did, with nothing in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_STREAM = 0x6D6978  # "mix": this stream apart from the data order's and the augmentation's


@dataclass(frozen=True)
class Draw:
    """One batch's mixing: how, the share lam of each image's own label, the partners, the box (cutmix)."""

    kind: str  # "mixup" or "cutmix"
    share: float
    partners: np.ndarray  # perm: image i is mixed with image partners[i]
    box: tuple[int, int, int, int] | None = None  # top, bottom, left, right (rows top..bottom-1)


@dataclass(frozen=True)
class Mixing:
    mixup: float = 0.0  # Beta's alpha; 0: off
    cutmix: float = 0.0
    seed: int = 0

    def __bool__(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def describe(self) -> str:
        """For the run's banner: ", mixup 0.2", ", cutmix 1", ", mixup 0.2 or cutmix 1 (one each batch)", or ""."""
        kinds = [f"{name} {alpha:g}" for name, alpha in (("mixup", self.mixup), ("cutmix", self.cutmix)) if alpha > 0]
        return "".join([", ", " or ".join(kinds), " (one each batch)" if len(kinds) > 1 else ""]) if kinds else ""

    def draw(self, size: int, height: int, width: int, epoch: int, batch: int, rank: int) -> Draw:
        """The mixing of batch `batch` of epoch `epoch` on process `rank`, of `size` images of height x width."""
        rng = np.random.default_rng([self.seed, epoch, batch, rank, _STREAM])
        cut = self.cutmix > 0 and (self.mixup == 0 or rng.random() < 0.5)
        share = float(rng.beta(*(2 * [self.cutmix if cut else self.mixup])))
        partners = rng.permutation(size)
        if not cut:
            return Draw("mixup", share, partners)
        side = math.sqrt(1.0 - share)
        cut_h, cut_w = int(height * side), int(width * side)
        centre_y, centre_x = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
        left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
        share = 1.0 - (bottom - top) * (right - left) / (height * width)
        return Draw("cutmix", share, partners, (top, bottom, left, right))

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, classes: int, epoch: int, batch: int, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed batch and its targets (fp32 rows of `classes` weights) for images x [N, C, H, W] with
        labels y [N]."""
        draw = self.draw(len(y), x.shape[-2], x.shape[-1], epoch, batch, rank)
        return mixed(x, y, classes, draw)


def mixed(x: torch.Tensor, y: torch.Tensor, classes: int, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw` applied to the batch x [N, C, H, W] with labels y [N]: the images and their target weights."""
    partners = torch.from_numpy(draw.partners).to(x.device)
    other = x.index_select(0, partners)
    if draw.box is None:
        x = torch.lerp(other, x, draw.share)  # share * x + (1 - share) * other
    else:
        top, bottom, left, right = draw.box
        x = x.clone()
        x[..., top:bottom, left:right] = other[..., top:bottom, left:right]
    own = F.one_hot(y, classes).float()
    targets = torch.lerp(own.index_select(0, partners), own, draw.share)
    return x, targets
