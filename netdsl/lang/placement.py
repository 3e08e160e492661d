"""Which device each layer runs on.

The rules, in order: a layer inside `towers` runs on its tower; `on DEV` places a statement (and the
blocks it expands); any other layer runs where its first input runs; inputs run on the first device
the net names (declared with `device`, else named by `towers` or `on`, included files too), else on
DEFAULT_DEVICE. Once a net declares devices, every layer must run on a declared one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import networkx as nx

from netdsl.errors import NetError, did_you_mean
from netdsl.ir import Device, layer
from netdsl.lang import syntax as s
from netdsl.lang.expressions import checked, number
from netdsl.lang.includes import Includes
from netdsl.lang.scope import Context, check_name

DEFAULT_DEVICE = "gpu0"
MEMORY_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


class Placement:
    """The devices a net declares and the device of each layer as the builder makes it."""

    def __init__(self, default: str) -> None:
        self.default = default  # where inputs run
        self.devices: dict[str, Device] = {}
        self.declared = False  # the net has `device` statements
        self.inheriting: set[str] = set()  # layers placed by the default rule: where their first input runs
        self.unplaced_input = False  # a layer was made before its first input (a forward reference)

    def declare(self, stmt: s.DeviceStmt, ctx: Context) -> None:
        """`device NAME, ... [memory N UNIT]`."""
        memory = _memory_size(stmt, ctx)
        for name in stmt.names:
            check_name(name.name, name.span)
            if name.name in self.devices and self.devices[name.name].span is not None:
                raise NetError(
                    f"device `{name.name}` is declared twice",
                    name.span,
                    hint=f"declare each device once, with its memory: `device {name.name} memory 3 GiB`",
                    notes=[(self.devices[name.name].span, "first declared here")],
                )
            self.devices[name.name] = Device(name.name, memory, name.span)
        self.declared = True

    def on(self, name: s.Name | None, ctx: Context) -> str | None:
        """The device a statement's `on DEV` names, or None without one."""
        if name is None:
            return None
        if ctx.tower:
            raise NetError(
                f"inside a towers block every layer runs on its own tower ({ctx.tower})",
                name.span,
                hint="move the statement out of the towers block to place it on one device",
            )
        self.check(name)
        return name.name

    def check(self, name: s.Name) -> None:
        """A device named by `on` or `towers` must be declared, where the net declares devices."""
        if self.declared and name.name not in self.devices:
            raise NetError(
                f"device `{name.name}` is not declared",
                name.span,
                hint=did_you_mean(name.name, self.devices)
                or f"the declared devices are {', '.join(self.devices)}; add `device {name.name}` to use it",
            )

    def of_first_input(self, node: str, inputs: tuple[str, ...], graph: nx.DiGraph) -> str:
        """The default rule for layer `node`: it runs where its first input runs."""
        self.inheriting.add(node)
        first = inputs[0] if inputs else None
        if first is None or first not in graph:  # a forward reference: placed by `settle`
            self.unplaced_input = True
            return self.default
        return layer(graph, first).device

    def settle(self, graph: nx.DiGraph) -> None:
        """A layer read through a forward reference was not placed yet when its reader was made, so
        the default rule is applied again, in dependency order, once every layer is connected."""
        if not self.unplaced_input:
            return
        for node in nx.topological_sort(graph):
            item = layer(graph, node)
            if node in self.inheriting and item.inputs:
                item.device = layer(graph, item.inputs[0]).device

    def check_layers(self, graph: nx.DiGraph) -> None:
        """With `device` statements, every layer must run on a declared device (checked at the end,
        since `on` may come before the declaration)."""
        if not self.declared:
            return
        for _, item in graph.nodes(data="layer"):
            if item.device not in self.devices:
                raise NetError(
                    f"`{item.name}` runs on device `{item.device}`, which is not declared",
                    item.span,
                    trace=item.trace,
                    hint=did_you_mean(item.device, self.devices) or f"declared: {', '.join(self.devices)}",
                )

    def used(self, graph: nx.DiGraph) -> dict[str, Device]:
        """The devices the layers run on, in the order of their first layer."""
        devices: dict[str, Device] = {}
        for _, item in graph.nodes(data="layer"):
            devices.setdefault(item.device, self.devices.get(item.device, Device(item.device)))
        return devices


def _memory_size(stmt: s.DeviceStmt, ctx: Context) -> int | None:
    """The bytes of a `device` statement's `memory N UNIT`, or None without one."""
    if stmt.memory is None:
        return None
    unit = stmt.unit.name
    if unit not in MEMORY_UNITS:
        hint = did_you_mean(unit, MEMORY_UNITS) or f"use one of {', '.join(MEMORY_UNITS)}"
        raise NetError(f"unknown memory unit `{unit}`", stmt.unit.span, hint=hint)
    amount = number(stmt.memory, ctx, "a memory size")
    if amount <= 0:
        raise NetError(
            "a memory size must be positive",
            stmt.memory.span,
            hint="e.g. `device gpu0 memory 3 GiB`; without `memory` the device's memory is not checked",
        )
    return int(checked(amount * MEMORY_UNITS[unit], stmt.memory, ctx))  # 1e300 GiB is not finite


def first_device(module: s.Module, includes: Includes) -> str | None:
    """The default device for inputs: the first declared one (`device`), else the first one named by
    `towers` or `on`; included files count too."""
    mentions = list(_device_mentions(module.statements, module.file, includes, {includes.main}))
    declared = [name for is_declaration, name in mentions if is_declaration]
    return (declared or [name for _, name in mentions] or [None])[0]


def _device_mentions(statements, file: str, includes: Includes, seen: set[Path]) -> Iterator[tuple[bool, str]]:
    """(is_declaration, device name) for each device the statements name, in source order."""
    for stmt in statements:
        if isinstance(stmt, s.DeviceStmt):
            yield from ((True, name.name) for name in stmt.names)
        elif isinstance(stmt, s.TowersStmt):
            yield from ((False, name.name) for name in stmt.towers)
        elif isinstance(stmt, (s.AssignStmt, s.InputStmt)) and stmt.device is not None:
            yield False, stmt.device.name
        elif isinstance(stmt, s.IncludeStmt):
            path = includes.find(stmt, file)
            if path is None or path in seen:
                continue  # reported when the include runs
            seen.add(path)
            try:
                included = includes.parse(path)
            except NetError:
                continue  # likewise
            yield from _device_mentions(included.statements, str(path), includes, seen)
