"""numpy arrays handed to netdsl (inputs, weights) as torch tensors."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor of a numpy array of any strides and byte order (torch takes only native byte order and
    non-negative strides: a reversed view, a '>f4' file), sharing its memory where it can. A read-only array (as
    `import_onnx` returns, or a memory-mapped file) is only read, so torch's warning about it is not shown."""
    if array.dtype.kind in "biuf":
        array = array.astype(array.dtype.newbyteorder("="), order="C", copy=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(array) if array.dtype.kind in "biuf" else torch.as_tensor(array)


def all_finite(tensors) -> bool:
    """Whether every value of the floating-point `tensors` is finite. A NaN anywhere in a tensor is its
    largest and smallest value both (PyTorch's max and min reductions carry NaN through), an infinity one of
    them: two reductions that write nothing, where `isfinite(t).all()` writes a mask as large as the tensor
    (7 times the time for VGG-16's fc6 on this project's CPU). One wait per device, not one per tensor."""
    extremes: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.numel():
            extremes.setdefault(tensor.device, []).extend((tensor.amax().double(), tensor.amin().double()))
    return all(bool(torch.isfinite(torch.stack(values)).all()) for values in extremes.values())
