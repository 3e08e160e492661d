"""Hand-written PyTorch models of every net in nets/, independent of netdsl.

These are the golden tests' second opinion: each model is written with plain torch.nn /
torch.nn.functional from the papers and the .net files' comments, never from netdsl's runtime,
compiler, kernels or reference code (nothing here imports netdsl). Local response normalization is
written out by hand with the AlexNet paper's formula (section 3.3):

    b[c] = a[c] / (k + alpha * sum_{j = c - (n-1)//2 .. c + n//2, clipped to the channels} a[j]^2) ^ beta

with alpha NOT divided by n (n=5, alpha=1e-4, beta=0.75, k=2). In eval mode (what `build` returns, and
what the goldens record) dropout is the identity and batch norm uses its running statistics, so no model
has any randomness. In training mode (`model.train()`) dropout is `F.dropout(x, rate, training=True)`,
its masks drawn from torch's generator where the .net file drops (each tower's in tower order), and
batch norm (`nn.BatchNorm2d`, momentum 0.1) normalizes with the batch's statistics and updates the
running ones. Every model runs in whatever dtype its parameters have (the goldens use float64).

`Model.load(weights)` takes netdsl's tensors (`<layer name>.<tensor>` -> array, the names of
`netdsl.runtime.weights.weight_specs`) and copies each onto the parameter it means; a missing, extra or
mis-shaped tensor raises KeyError / ValueError. The mapping, net by net:

alexnet (two towers; tower i = 0 for gpu0, 1 for gpu1):
    conv1@gpu{i}.weight/.bias  (48, 3, 11, 11)    -> conv1[i]: tower i's conv on the image
    conv2@gpu{i}.*             (128, 48, 5, 5)    -> conv2[i]: reads tower i's conv1 only
    conv3@gpu{i}.*             (192, 256, 3, 3)   -> conv3[i]: reads cat(conv2 of both towers), tower 0 first
    conv4@gpu{i}.*             (192, 192, 3, 3)   -> conv4[i]: tower i's conv3 only
    conv5@gpu{i}.*             (128, 192, 3, 3)   -> conv5[i]: tower i's conv4 only
    fc6@gpu{i}.*               (2048, 9216)       -> fc6[i]: reads cat(conv5 of both towers) flattened C, H, W
    fc7@gpu{i}.*               (2048, 4096)       -> fc7[i]: reads cat(fc6 of both towers)
    fc8.weight/.bias           (1000, 4096)       -> fc8: reads cat(fc7 of both towers); output softmax(fc8)
    LRN after conv1 and conv2 runs per tower, on that tower's 48 / 128 channels.

alexnet_1gpu (one device, grouped convs, groups=2 splits channels into halves: tower 0 = first half):
    conv1.*  (96, 3, 11, 11)   -> conv1, groups=1            (= cat of the towers' conv1 filters)
    conv2.*  (256, 48, 5, 5)   -> conv2, groups=2            (filters 0..127 read channels 0..47)
    conv3.*  (384, 256, 3, 3)  -> conv3, groups=1
    conv4.*  (384, 192, 3, 3)  -> conv4, groups=2
    conv5.*  (256, 192, 3, 3)  -> conv5, groups=2
    fc6.* (4096, 9216), fc7.* (4096, 4096), fc8.* (1000, 4096) -> fc6, fc7, fc8; output softmax(fc8)
    LRN normalizes each half of the channels apart (48 + 48 after conv1, 128 + 128 after conv2), like the
    two-tower net: the window never crosses the tower boundary (`lrn(..., groups=2)` in the .net file).

vgg16 (configuration D; the block `stage` names its convs `s<stage>/x[<repeat>]`):
    s1/x[1].*, s1/x[2].*                    -> convs[0], convs[1]     (3 -> 64 -> 64), then maxpool 2
    s2/x[1].*, s2/x[2].*                    -> convs[2], convs[3]     (-> 128)
    s3/x[1..3].*, s4/x[1..3].*, s5/x[1..3].* -> convs[4..12]          (-> 256, 512, 512)
    fc6.* (4096, 25088), fc7.*, fc8.* (1000, 4096) -> fc6, fc7, fc8; output softmax(fc8)

lenet5:
    c1.* (6, 1, 5, 5), c3.* (16, 6, 5, 5) -> c1, c3 (each: relu, maxpool 2)
    f5.* (120, 400), f6.* (84, 120), f7.* (10, 84) -> f5, f6, f7; output f7 (no softmax)

simplenet (the block `stage` names its conv after the stage and the batch norm `<stage>.batchnorm`):
    s{i}.weight                 -> stages[i-1].conv (no bias)
    s{i}.batchnorm.weight/.bias/.running_mean/.running_var -> stages[i-1].bn (eps 1e-5, eval mode)
    logits.fc.weight/.bias (15, 4096) -> fc; output softmax(fc)
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The AlexNet paper's LRN constants (section 3.3).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def paper_lrn(
    x: torch.Tensor, size: int = LRN_SIZE, alpha: float = LRN_ALPHA, beta: float = LRN_BETA, k: float = LRN_K
) -> torch.Tensor:
    """The paper's local response normalization over the channels (dim 1) of an N x C x H x W map.

    Channel c's window is c - (size-1)//2 .. c + size//2; channels outside 0..C-1 count as zero
    (the window is clipped). alpha multiplies the plain sum of squares (it is not divided by size)."""
    channels = x.shape[1]
    below, above = (size - 1) // 2, size // 2
    squares = F.pad(x * x, (0, 0, 0, 0, below, above))  # zero channels before and after
    window = sum(squares[:, offset : offset + channels] for offset in range(size))
    return x / (k + alpha * window) ** beta


def halves_lrn(x: torch.Tensor) -> torch.Tensor:
    """The paper's LRN on each half of the channels apart: two towers' maps side by side."""
    first, second = x.chunk(2, dim=1)
    return torch.cat([paper_lrn(first), paper_lrn(second)], dim=1)


def pool3s2(x: torch.Tensor) -> torch.Tensor:
    """AlexNet's overlapping max-pooling: 3 x 3 windows, stride 2, no padding, floor."""
    return F.max_pool2d(x, kernel_size=3, stride=2)


class GoldenModel(nn.Module, abc.ABC):
    """A hand-written model whose tensors can be set from netdsl's names."""

    @abc.abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """netdsl tensor name -> this model's parameter or buffer that it sets."""

    def load(self, weights: Mapping[str, np.ndarray]) -> GoldenModel:
        """Copies netdsl's weights (name -> array) onto the parameters; every name must match exactly."""
        targets = self.tensors()
        missing = sorted(set(targets) - set(weights))
        extra = sorted(set(weights) - set(targets))
        if missing or extra:
            raise KeyError(f"{type(self).__name__}.load: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for name, target in targets.items():
                value = torch.as_tensor(np.asarray(weights[name]))
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(f"{name}: shape {tuple(value.shape)}, the model needs {tuple(target.shape)}")
                target.copy_(value.to(target.dtype))
        return self


def _linear_conv(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    found = {f"{prefix}.weight": module.weight}
    if module.bias is not None:
        found[f"{prefix}.bias"] = module.bias
    return found


class AlexNet(GoldenModel):
    """The two-GPU AlexNet of the paper's Figure 2, each tower written out."""

    towers = ("gpu0", "gpu1")

    def __init__(self, image_size: int = 227) -> None:
        """`image_size`: the side of the square input (227 as published; a smaller one shrinks only
        fc6's input, 256 maps of the pooled conv5's side squared)."""
        super().__init__()
        side = (image_size - 11) // 4 + 1  # conv1, then the three 3 x 3 stride 2 max-pools
        for _ in range(3):
            side = (side - 3) // 2 + 1
        pair = range(len(self.towers))
        self.conv1 = nn.ModuleList(nn.Conv2d(3, 48, 11, stride=4) for _ in pair)
        self.conv2 = nn.ModuleList(nn.Conv2d(48, 128, 5, padding=2) for _ in pair)
        self.conv3 = nn.ModuleList(nn.Conv2d(256, 192, 3, padding=1) for _ in pair)
        self.conv4 = nn.ModuleList(nn.Conv2d(192, 192, 3, padding=1) for _ in pair)
        self.conv5 = nn.ModuleList(nn.Conv2d(192, 128, 3, padding=1) for _ in pair)
        self.fc6 = nn.ModuleList(nn.Linear(256 * side * side, 2048) for _ in pair)
        self.fc7 = nn.ModuleList(nn.Linear(4096, 2048) for _ in pair)
        self.fc8 = nn.Linear(4096, 1000)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        a = [pool3s2(paper_lrn(F.relu(conv(image)))) for conv in self.conv1]  # 48 x 27 x 27 per tower
        a = [pool3s2(paper_lrn(F.relu(conv(x)))) for conv, x in zip(self.conv2, a)]  # 128 x 13 x 13
        both = torch.cat(a, dim=1)  # the GPUs exchange maps: conv3 reads both towers
        a = [F.relu(conv(both)) for conv in self.conv3]
        a = [F.relu(conv(x)) for conv, x in zip(self.conv4, a)]  # own tower only
        a = [pool3s2(F.relu(conv(x))) for conv, x in zip(self.conv5, a)]  # 128 x 6 x 6
        both = torch.cat(a, dim=1).flatten(1)
        a = [F.dropout(F.relu(fc(both)), 0.5, self.training) for fc in self.fc6]
        both = torch.cat(a, dim=1)
        a = [F.dropout(F.relu(fc(both)), 0.5, self.training) for fc in self.fc7]
        return torch.softmax(self.fc8(torch.cat(a, dim=1)), dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        found = _linear_conv("fc8", self.fc8)
        for i, tower in enumerate(self.towers):
            for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
                found.update(_linear_conv(f"{layer}@{tower}", getattr(self, layer)[i]))
        return found


class AlexNet1GPU(GoldenModel):
    """AlexNet on one device: grouped convs for the towers' own-half reads, LRN per half."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, 1000)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = pool3s2(halves_lrn(F.relu(self.conv1(image))))
        x = pool3s2(halves_lrn(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = pool3s2(F.relu(self.conv5(x)))
        x = F.dropout(F.relu(self.fc6(x.flatten(1))), 0.5, self.training)
        x = F.dropout(F.relu(self.fc7(x)), 0.5, self.training)
        return torch.softmax(self.fc8(x), dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
            found.update(_linear_conv(layer, getattr(self, layer)))
        return found


class VGG16(GoldenModel):
    """VGG-16, configuration D: 13 3x3 convs (pad 1) in five stages, each ending in a 2x2 max-pool."""

    stages = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

    def __init__(self) -> None:
        super().__init__()
        convs, self.names, self.pool_after = [], [], set()
        channels = 3
        for stage, (width, count) in enumerate(self.stages, start=1):
            for repeat in range(1, count + 1):
                convs.append(nn.Conv2d(channels, width, 3, padding=1))
                self.names.append(f"s{stage}/x[{repeat}]")
                channels = width
            self.pool_after.add(len(convs) - 1)
        self.convs = nn.ModuleList(convs)
        self.fc6 = nn.Linear(512 * 7 * 7, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, 1000)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in self.pool_after:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
        x = F.dropout(F.relu(self.fc6(x.flatten(1))), 0.5, self.training)
        x = F.dropout(F.relu(self.fc7(x)), 0.5, self.training)
        return torch.softmax(self.fc8(x), dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for name, conv in zip(self.names, self.convs):
            found.update(_linear_conv(name, conv))
        for layer in ("fc6", "fc7", "fc8"):
            found.update(_linear_conv(layer, getattr(self, layer)))
        return found


class LeNet5(GoldenModel):
    """LeNet-5 with ReLU and max-pooling, a full C3; the output is f7's 10 scores (no softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5)
        self.c3 = nn.Conv2d(6, 16, 5)
        self.f5 = nn.Linear(16 * 5 * 5, 120)
        self.f6 = nn.Linear(120, 84)
        self.f7 = nn.Linear(84, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(image)), 2, stride=2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2, stride=2)
        x = F.relu(self.f5(x.flatten(1)))
        x = F.relu(self.f6(x))
        return self.f7(x)

    def tensors(self) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for layer in ("c1", "c3", "f5", "f6", "f7"):
            found.update(_linear_conv(layer, getattr(self, layer)))
        return found


class SimpleNet(GoldenModel):
    """Four conv (no bias) + batch norm + ReLU + 2x2 max-pool stages, then dropout, fc to 15 and softmax."""

    widths = (32, 64, 128, 256)

    def __init__(self) -> None:
        super().__init__()
        stages, channels = [], 1
        for width in self.widths:
            stage = nn.Module()
            stage.conv = nn.Conv2d(channels, width, 3, padding=1, bias=False)
            stage.bn = nn.BatchNorm2d(width, eps=1e-5)
            stages.append(stage)
            channels = width
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(256 * 4 * 4, 15)
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image
        for stage in self.stages:
            x = F.max_pool2d(F.relu(stage.bn(stage.conv(x))), 2, stride=2)
        x = F.dropout(x, 0.5, self.training)  # on the 256 x 4 x 4 map, as the .net file drops
        return torch.softmax(self.fc(x.flatten(1)), dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for i, stage in enumerate(self.stages, start=1):
            found[f"s{i}.weight"] = stage.conv.weight
            for key in ("weight", "bias", "running_mean", "running_var"):
                found[f"s{i}.batchnorm.{key}"] = getattr(stage.bn, key)
        found.update(_linear_conv("logits.fc", self.fc))
        return found


# net name (the .net file's stem) -> (model class, input shape C x H x W)
MODELS: dict[str, tuple[type[GoldenModel], tuple[int, int, int]]] = {
    "alexnet": (AlexNet, (3, 227, 227)),
    "alexnet_1gpu": (AlexNet1GPU, (3, 227, 227)),
    "vgg16": (VGG16, (3, 224, 224)),
    "lenet5": (LeNet5, (1, 32, 32)),
    "simplenet": (SimpleNet, (1, 64, 64)),
}


def build(net: str, weights: Mapping[str, np.ndarray], dtype: torch.dtype = torch.float64) -> GoldenModel:
    """The hand-written model of `net` in `dtype`, in eval mode, with netdsl's `weights` loaded."""
    cls, _ = MODELS[net]
    return cls().to(dtype).eval().load(weights)


def run(model: GoldenModel, x: np.ndarray) -> np.ndarray:
    """The model's output for the batch `x` (any float dtype; computed in the model's dtype)."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(x)).to(dtype)).numpy()
