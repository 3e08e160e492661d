"""Logical devices to torch devices: `gpu0=cuda:0,gpu1=cuda:1`, one device for all, or a default."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from netdsl.errors import NetError

SUPPORTED = ("cpu", "cuda")  # what the kernels and the reference ops run on


def map_devices(
    logical: list[str],
    devices: Mapping[str, str | torch.device] | str | torch.device | None,
    *,
    declared: Iterable[str] = (),
    spread: bool = True,
) -> dict[str, torch.device]:
    """Each of the net's `logical` devices (those with layers) -> a torch device.

    `devices` maps them (every one of them; a name in `declared`, a device the net declares but puts
    nothing on, may be mapped too), or is one device for all; None: with `spread`, one GPU each (round
    robin) when there are GPUs, else the CPU; without, the CPU."""
    if isinstance(devices, str) and "=" in devices:
        devices = parse_devices(devices, where="devices")
    elif isinstance(devices, (str, torch.device)):
        devices = dict.fromkeys(logical, devices)
    elif devices is not None and not isinstance(devices, Mapping):
        raise NetError(
            f"devices must name torch devices, got {type(devices).__name__}",
            where="devices",
            hint="one device for all ('cuda:0'), or one per logical device: {'gpu0': 'cuda:0', 'gpu1': 'cuda:1'} "
            "or 'gpu0=cuda:0,gpu1=cuda:1'",
        )
    if devices is None:
        count = torch.cuda.device_count() if spread and torch.cuda.is_available() else 0
        return {name: torch.device(f"cuda:{i % count}" if count else "cpu") for i, name in enumerate(logical)}
    known = set(logical) | set(declared)
    unknown = [name for name in devices if name not in known]
    if unknown:
        hint = f"its devices: {', '.join(logical)}"
        raise NetError(f"the net has no device `{unknown[0]}`", where="devices", hint=hint)
    missing = [name for name in logical if name not in devices]
    if missing:
        raise NetError(
            f"no torch device given for the net's device `{missing[0]}`",
            where="devices",
            hint=f"map every one of {', '.join(logical)}, e.g. {{'{missing[0]}': 'cuda:0'}}",
        )
    return {name: _torch_device(name, devices[name]) for name in logical}


def parse_devices(text: str | None, where: str = "--devices") -> dict[str, str] | None:
    """`gpu0=cuda:0,gpu1=cuda:1` -> {"gpu0": "cuda:0", "gpu1": "cuda:1"} (None for no text)."""
    if not text:
        return None
    mapping = {}
    for item in text.split(","):
        logical, sep, physical = item.partition("=")
        if not sep or not logical.strip() or not physical.strip():
            raise NetError(f"cannot read `{item}`", where=where, hint="write gpu0=cuda:0,gpu1=cuda:1")
        mapping[logical.strip()] = physical.strip()
    return mapping


def _torch_device(name: str, given: str | torch.device) -> torch.device:
    try:
        device = torch.device(given)
    except (RuntimeError, TypeError, ValueError) as error:
        raise NetError(
            f"`{given}` is not a torch device: {error}", where="devices", hint="map it to cpu or cuda:N"
        ) from None
    if device.type not in SUPPORTED:
        raise NetError(
            f"device `{name}` is mapped to {device}: netdsl runs on {' and '.join(SUPPORTED)} devices",
            where="devices",
            hint="map it to cpu or cuda:N",
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NetError(
            f"device `{name}` is mapped to {device}, but CUDA is not available",
            where="devices",
            hint="map the devices to cpu (gpu0=cpu,gpu1=cpu), or run on a machine with a CUDA GPU",
        )
    return device


def device_name(device: torch.device) -> str:
    """What a tuning file calls a device: the GPU's name, or the CPU as the interpreter runs kernels there."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton's interpreter)"
