"""A training step's forward and backward passes over a batch taken in parts (`accumulate`).

A batch too large for the memory of the devices runs through the net in equal parts, one after another.
Each part's mean loss is weighted by its share of the batch before its backward pass, so the gradients
autograd sums over the parts are those of the whole batch's mean loss: the optimizer then takes the step
it would have taken on the whole batch. The one difference is batch norm, which normalizes (and updates
its running averages) per part, as Caffe's `iter_size` does.

Under DDP the gradients are averaged over the processes once, in the last part's backward pass; the
others run under DDP's `no_sync`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def split(x: torch.Tensor, y: torch.Tensor, parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch as `parts` equal parts along its first dimension (views: no copy)."""
    if len(y) % parts:
        raise ValueError(f"a batch of {len(y)} does not split into {parts} equal parts")
    return list(zip(x.chunk(parts), y.chunk(parts), strict=True))


def backward_in_parts(
    model: Callable[[torch.Tensor], torch.Tensor],
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager],
    *,
    scaler: torch.amp.GradScaler | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs each (x, y) part forward and backward, adding its gradients to the weights' `.grad`; returns the
    batch's mean loss (a detached scalar) and every part's logits, detached, in the batch's order.

    `scaler`: fp16's loss scaling, applied to each part's loss (unscaling is the caller's, once, after the
    last part). `no_sync`: a context under which a backward pass does not yet average the gradients over
    the processes (DDP's), entered for every part but the last."""
    images = sum(len(y) for _, y in parts)
    loss_sum: torch.Tensor | None = None
    every_logits = []
    for index, (x, y) in enumerate(parts):
        waits = no_sync is not None and index < len(parts) - 1
        with no_sync() if waits else contextlib.nullcontext():
            with autocast():
                logits = model(x).float().flatten(1)
            loss = loss_of(logits, y.to(logits.device))
            if len(parts) > 1:
                loss = loss * (len(y) / images)  # the part's share of the batch's mean
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        every_logits.append(logits.detach())
    return loss_sum, torch.cat(every_logits) if len(every_logits) > 1 else every_logits[0]
