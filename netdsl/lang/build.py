"""Syntax tree -> IR graph: names, constants, presets, blocks, `repeat`, includes and towers.

The builder walks the statements in order, keeping a scope of what each name means: a number, a
layer preset, a block, a tensor (one or more layer outputs) or, for names defined inside a `towers`
block, one value per tower. Layers are created as their statements run; a name that is not yet
defined where a layer reads it is a forward reference, resolved when the file is done (so any DAG can
be written in any order, and a cycle is reported as one).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import networkx as nx

from netdsl.errors import Frame, NetError, Span, did_you_mean
from netdsl.ir import Device, Layer
from netdsl.ir import ops as op_registry
from netdsl.ir.ops import OPS, REQUIRED, OpSpec, ParamError
from netdsl.lang import syntax as s
from netdsl.lang.parse import parse_file

DEFAULT_DEVICE = "gpu0"
MAX_REPEAT = 100_000
MAX_LAYERS = 100_000  # so that nested `repeat`s fail in seconds instead of running for hours
MAX_STEPS = 300_000  # statements run, repeat rounds and block calls: likewise when they make no layers
MAX_NUMBER = 10**18
MAX_DIM = 2**31 - 1
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


# --- values a name can have ---------------------------------------------------------------------


@dataclass(frozen=True)
class Symbol:
    """A bare word with a meaning of its own, such as `same` in pad=same."""

    word: str


@dataclass(frozen=True)
class Tensors:
    """One or more layer outputs (several are joined on channels by the layer that reads them)."""

    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Preset:
    """`const name = op(k=v, ...)`: a layer type with some parameters filled in."""

    op: str
    values: dict[str, s.Expr]  # parameter name -> the expression written for it
    span: Span


@dataclass(frozen=True)
class Block:
    stmt: s.BlockStmt


@dataclass
class Towered:
    """A name defined inside `towers`: one value per tower."""

    towers: tuple[str, ...]
    copies: dict[str, object]
    span: Span
    outer: object = None  # what the name meant before a tower rebound it (inside `repeat`)

    def view(self, tower: str | None):
        """The value a plain name has in `tower`: its own copy, else the value it had before."""
        return self.copies.get(tower, self.outer) if tower else None


BUILTINS = {"true": True, "false": False, "same": Symbol("same"), "valid": Symbol("valid")}


@dataclass
class Scope:
    names: dict[str, object] = field(default_factory=dict)
    spans: dict[str, Span] = field(default_factory=dict)
    parent: Scope | None = None

    def lookup(self, name: str):
        scope = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return BUILTINS.get(name)

    def visible(self) -> set[str]:
        names = set(BUILTINS)
        scope = self
        while scope is not None:
            names |= set(scope.names)
            scope = scope.parent
        return names


@dataclass(frozen=True)
class Context:
    """Where a statement runs: its scope, block prefix, tower, repeat indices and expansion trace."""

    scope: Scope
    file: str
    prefix: str = ""
    tower: str | None = None
    towers: tuple[str, ...] = ()
    repeat: tuple[int, ...] = ()
    trace: tuple[Frame, ...] = ()
    block: str | None = None
    top_file: bool = True  # the main file, not an include
    device: str | None = None  # `on DEV` of the statement that expanded the current block

    def qualify(self, name: str, part: str | None = None) -> str:
        index = "".join(f"[{i}]" for i in self.repeat)
        full = f"{self.prefix}{name}{index}"
        if part:
            full += f".{part}"
        if self.tower:
            full += f"@{self.tower}"
        return full


@dataclass
class _Forward:
    """A read of a name not yet defined; resolved when the whole file has run."""

    ref: s.Name | s.AllRef | s.TowerRef
    ctx: Context


class Builder:
    def __init__(self) -> None:
        self.graph = nx.DiGraph()
        self.globals = Scope()
        self.layers: dict[str, Layer] = {}
        self.forwards: dict[str, _Forward] = {}
        self.outputs: list[tuple[s.Name | s.AllRef | s.TowerRef, Context]] = []
        self.inputs: list[str] = []
        self.devices: dict[str, Device] = {}
        self.declared_devices = False
        self.default_device = DEFAULT_DEVICE
        self.net_name: str | None = None
        self.includes: list[Path] = []
        self.inherits: set[str] = set()  # layers placed by the default rule: where their first input runs
        self.steps = 0  # counted against MAX_STEPS
        self.part_numbers: dict[str, int] = {}  # `_part_name`: the number a chain part's search starts at

    # --- entry point ------------------------------------------------------------------------

    def build(self, module: s.Module) -> nx.DiGraph:
        self.default_device = _first_device(module.statements, Path(module.file), set()) or DEFAULT_DEVICE
        self.includes.append(Path(module.file).resolve())
        ctx = Context(self.globals, module.file)
        self.run_all(module.statements, ctx)
        self._resolve_forwards()
        self._connect()
        self._inherit_devices()
        self._resolve_outputs()
        self._check_declared_devices()
        graph = self.graph
        graph.graph["name"] = self.net_name or _identifier(Path(module.file).stem)
        graph.graph["inputs"] = self.inputs
        graph.graph["devices"] = self._used_devices()
        graph.graph["file"] = module.file
        if not self.inputs:
            raise NetError(
                "the net has no inputs", Span(module.file, 1, 1), hint="declare one: input image: 3 x 227 x 227"
            )
        return graph

    def run_all(self, statements, ctx: Context) -> None:
        for stmt in statements:
            self.run(stmt, ctx)

    def run(self, stmt: s.Stmt, ctx: Context) -> None:
        self._step(stmt.span, ctx)
        handler = getattr(self, "_" + type(stmt).__name__)
        handler(stmt, ctx)

    def _step(self, span: Span, ctx: Context) -> None:
        """Counts one statement run, `repeat` round or block call, so that nested `repeat`s and blocks
        that make no layers (MAX_LAYERS catches those that do) still fail in seconds, not hours."""
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise NetError(
                f"building the net takes more than {MAX_STEPS} steps (statements run, repeat rounds, block calls)",
                span,
                trace=ctx.trace,
                hint="check the repeat counts and block calls: nested `repeat`s (and blocks) multiply",
            )

    # --- statements -------------------------------------------------------------------------

    def _NetStmt(self, stmt: s.NetStmt, ctx: Context) -> None:
        if not ctx.top_file or ctx.block or ctx.tower:
            raise NetError(
                "`net` names the whole net and belongs at the top of the main file",
                stmt.span,
                hint="remove it from included files, blocks and towers",
            )
        if self.net_name is not None:
            raise NetError("the net is named twice", stmt.span, hint="keep one `net` statement")
        self.net_name = stmt.name

    def _InputStmt(self, stmt: s.InputStmt, ctx: Context) -> None:
        if ctx.block or ctx.tower:
            raise NetError(
                "inputs are declared at the top level",
                stmt.span,
                hint="declare the input outside the block or towers and pass it in",
            )
        dims = tuple(self._int(e, ctx, "an input dimension", 1, MAX_DIM) for e in stmt.shape)
        if len(dims) not in (1, 3):
            raise NetError(
                f"an input is C x H x W or a flat N, not {len(dims)} dimensions",
                stmt.span,
                hint="e.g. input image: 3 x 227 x 227 (the batch is chosen at run time)",
            )
        device = self._placement(stmt.device, ctx) or self.default_device
        node = self._add_layer(stmt.name, "input", {"shape": dims}, [], device, stmt.span, ctx)
        self.inputs.append(node)
        self._bind(stmt.name, Tensors((node,)), stmt.span, ctx)

    def _OutputStmt(self, stmt: s.OutputStmt, ctx: Context) -> None:
        if ctx.block or ctx.tower:
            raise NetError(
                "outputs are declared at the top level",
                stmt.span,
                hint="return the value from the block, or list outputs after the towers",
            )
        self.outputs.extend((ref, ctx) for ref in stmt.refs)

    def _ConstStmt(self, stmt: s.ConstStmt, ctx: Context) -> None:
        if isinstance(stmt.value, s.Call):
            call = stmt.value
            base = ctx.scope.lookup(call.name)
            if isinstance(base, Preset):
                op, values = base.op, dict(base.values)
            elif call.name in OPS:
                op, values = call.name, {}
            else:
                raise self._unknown_layer(call, ctx)
            first = (call.args or (None,))[0]
            if isinstance(first, (s.AllRef, s.TowerRef)) or (
                isinstance(first, s.Name) and isinstance(ctx.scope.lookup(first.name), (Tensors, Towered))
            ):
                raise NetError(
                    "a preset (`const`) only fills in parameters; it cannot read a layer's output",
                    first.span,
                    trace=ctx.trace,
                    hint=f"to make a layer, leave out `const`: {stmt.name} = {call.name}(...)",
                )
            given = self._collect(OPS[op], call.args or (), call.kwargs, ctx)
            # Evaluated here, so a preset's names mean what they meant where it was written.
            values.update({key: s.Number(self._eval(expr, ctx), expr.span) for key, expr in given.items()})
            value = Preset(op, values, call.span)
            spec = OPS[op]
            # Report mistakes where the preset is written; required parameters may come at each use.
            if all(p.name in values for p in spec.params if p.default is REQUIRED):
                self._params(spec, values, ctx, call.span)
            else:
                for key, expr in values.items():
                    self._param_value(spec, spec.param(key), expr, ctx)
        else:
            value = self._eval(stmt.value, ctx)  # a layer's output here is reported by _eval
        self._bind(stmt.name, value, stmt.span, ctx)

    def _AssignStmt(self, stmt: s.AssignStmt, ctx: Context) -> None:
        device = self._placement(stmt.device, ctx) or ctx.device
        value = self._chain(stmt.name, stmt.chain, ctx, device)
        self._bind(stmt.name, value, stmt.span, ctx)

    def _IncludeStmt(self, stmt: s.IncludeStmt, ctx: Context) -> None:
        try:
            path = (Path(ctx.file).parent / stmt.path).resolve()
            path.is_file()
        except (OSError, ValueError) as error:  # a NUL byte, a name too long for the file system, ...
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise NetError(f'cannot include "{stmt.path}": {reason}', stmt.span) from None
        if path in self.includes:
            chain = " -> ".join(str(p.name) for p in [*self.includes[self.includes.index(path) :], path])
            raise NetError(f"include cycle: {chain}", stmt.span, hint="an included file cannot include its includer")
        if not path.is_file():
            raise NetError(
                f'cannot include "{stmt.path}": no such file ({path})',
                stmt.span,
                hint="include paths are relative to the file that includes them",
            )
        try:
            module = parse_file(path)
        except NetError as error:
            error.notes.append((stmt.span, "included from here"))
            raise
        self.includes.append(path)
        try:
            self.run_all(module.statements, replace(ctx, file=str(path), top_file=False))
        except NetError as error:
            if error.span is not None and error.span.file == str(path):
                error.notes.append((stmt.span, "included from here"))
            raise
        self.includes.pop()

    def _DeviceStmt(self, stmt: s.DeviceStmt, ctx: Context) -> None:
        if ctx.block or ctx.tower:
            raise NetError("devices are declared at the top level", stmt.span)
        memory = None
        if stmt.memory is not None:
            unit = stmt.unit.name
            if unit not in MEMORY_UNITS:
                hint = did_you_mean(unit, MEMORY_UNITS) or f"use one of {', '.join(MEMORY_UNITS)}"
                raise NetError(f"unknown memory unit `{unit}`", stmt.unit.span, hint=hint)
            amount = self._number(stmt.memory, ctx, "a memory size")
            if amount <= 0:
                raise NetError("a memory size must be positive", stmt.memory.span)
            memory = int(self._checked(amount * MEMORY_UNITS[unit], stmt.memory, ctx))  # 1e300 GiB is not finite
        for name in stmt.names:
            if name.name in self.devices and self.devices[name.name].span is not None:
                raise NetError(
                    f"device `{name.name}` is declared twice",
                    name.span,
                    notes=[(self.devices[name.name].span, "first declared here")],
                )
            self.devices[name.name] = Device(name.name, memory, name.span)
        self.declared_devices = True

    def _ReturnStmt(self, stmt: s.ReturnStmt, ctx: Context) -> None:
        raise NetError("`return` is only allowed at the end of a block", stmt.span)

    def _TowersStmt(self, stmt: s.TowersStmt, ctx: Context) -> None:
        if ctx.tower or ctx.towers:
            raise NetError("towers blocks cannot be nested", stmt.span)
        if ctx.block:
            raise NetError(
                "towers blocks belong at the top level, not inside a block",
                stmt.span,
                hint="call the block inside the towers block instead",
            )
        names = []
        for tower in stmt.towers:
            if tower.name in names:
                raise NetError(f"tower `{tower.name}` is listed twice", tower.span)
            self._check_device(tower)
            names.append(tower.name)
        towers = tuple(names)
        # Statement by statement, each tower in turn: a statement can read every tower's copy of
        # what the statements above it defined (`all conv2`).
        for inner in stmt.body:
            for tower in towers:
                self.run(inner, replace(ctx, tower=tower, towers=towers))

    def _BlockStmt(self, stmt: s.BlockStmt, ctx: Context) -> None:
        if ctx.block or ctx.tower or ctx.repeat:
            raise NetError("blocks are defined at the top level", stmt.span)
        if stmt.name in OPS:
            raise NetError(f"`{stmt.name}` is a built-in layer type and cannot name a block", stmt.span)
        seen: set[str] = set()
        for param in stmt.params:
            if param.name in seen:
                raise NetError(f"block parameter `{param.name}` is listed twice", param.span)
            seen.add(param.name)
        returns = [i for i, inner in enumerate(stmt.body) if isinstance(inner, s.ReturnStmt)]
        if returns and returns[0] != len(stmt.body) - 1:
            extra = stmt.body[returns[0] + 1]
            raise NetError(
                "statements after `return` would never run",
                extra.span,
                hint="`return` ends the block; move it to the end",
            )
        self._bind(stmt.name, Block(stmt), stmt.span, ctx)

    def _RepeatStmt(self, stmt: s.RepeatStmt, ctx: Context) -> None:
        count = self._int(stmt.count, ctx, "a repeat count", 0, MAX_REPEAT)
        index = stmt.index
        if index is not None and (index.name in BUILTINS or ctx.scope.lookup(index.name) is not None):
            raise NetError(
                f"`{index.name}` is already defined", index.span, hint="the repeat counter needs a name of its own"
            )
        for i in range(1, count + 1):
            self._step(stmt.span, ctx)
            if index is not None:
                ctx.scope.names[index.name] = i  # visible in the body only: removed below
            self.run_all(stmt.body, replace(ctx, repeat=(*ctx.repeat, i)))
        if index is not None:
            ctx.scope.names.pop(index.name, None)

    # --- chains -----------------------------------------------------------------------------

    def _chain(self, name: str, chain: s.Chain, ctx: Context, device: str | None) -> Tensors:
        elements = list(chain.elements)
        current: Tensors | None = None
        head = elements[0]
        if isinstance(head, (s.AllRef, s.TowerRef)):
            current = self._tensor_ref(head, ctx)
            elements.pop(0)
        elif head.args is None and self._is_tensor_name(head.name, ctx):
            current = self._tensor_ref(s.Name(head.name, head.span), ctx)
            elements.pop(0)
        for index, element in enumerate(elements):
            if isinstance(element, (s.AllRef, s.TowerRef)):
                raise NetError(
                    "only the first element of a chain can name its input",
                    element.span,
                    hint="`a | b` feeds a into b; to read another tensor, start a new chain",
                )
            part = self._part_name(name, element.name, ctx) if index else None
            current = self._apply(element, current, name, part, ctx, device)
        return current

    def _part_name(self, name: str, written: str, ctx: Context) -> str:
        """The first layer of a chain is named `name`; each later one `name.<what it is>`, numbered
        (`name.relu_2`) where that is taken, so adding `| relu` never renames the layers before it."""
        key = ctx.qualify(name, written)
        number = self.part_numbers.get(key, 1)  # the numbers below it are taken (layers are never removed)
        part = written if number == 1 else f"{written}_{number}"
        while ctx.qualify(name, part) in self.layers:
            number += 1
            part = f"{written}_{number}"
        self.part_numbers[key] = number  # so a chain of n relus costs O(n), not O(n^2)
        return part

    def _is_tensor_name(self, name: str, ctx: Context) -> bool:
        value = ctx.scope.lookup(name)
        if isinstance(value, Towered):
            value = value.view(ctx.tower) if ctx.tower else value
            return value is None or isinstance(value, (Tensors, Towered))
        return isinstance(value, Tensors) or (value is None and name not in OPS)

    def _apply(
        self, call: s.Call, current: Tensors | None, name: str, part: str | None, ctx: Context, device: str | None
    ) -> Tensors:
        target = ctx.scope.lookup(call.name)
        if isinstance(target, Towered) and ctx.tower:
            target = target.view(ctx.tower)
        if isinstance(target, Block):
            return self._expand_block(target.stmt, call, current, ctx.qualify(name, part), ctx, device)
        if isinstance(target, Preset):
            spec, base = OPS[target.op], target.values
        elif call.name in OPS:
            spec, base = OPS[call.name], {}
        elif isinstance(target, Tensors):
            raise NetError(
                f"`{call.name}` is a layer's output, not a layer type",
                call.span,
                hint=f"start a chain with it instead: y = {call.name} | relu",
            )
        else:
            raise self._unknown_layer(call, ctx)
        inputs, rest = self._split_inputs(spec, call, call.args or (), current, ctx)
        params = self._params(spec, {**base, **self._collect(spec, rest, call.kwargs, ctx)}, ctx, call.span)
        node_device = ctx.tower or device or self._device_of(inputs) or self.default_device
        node = self._add_layer(name, spec.name, params, list(inputs.nodes), node_device, call.span, ctx, part)
        if not (ctx.tower or device):
            self.inherits.add(node)
        return Tensors((node,))

    def _split_inputs(self, spec: OpSpec, call: s.Call, args, current: Tensors | None, ctx: Context):
        """Separates a call's inputs (tensors) from its positional parameters."""
        args = list(args)
        if spec.inputs == "many":
            tensors = [self._tensor_arg(a, ctx) for a in args]
            if current is not None:
                tensors.insert(0, current)
            if len(tensors) < 2 and not (len(tensors) == 1 and len(tensors[0].nodes) > 1):
                raise NetError(
                    f"{spec.name} needs at least two inputs", call.span, hint=f"{spec.name}(a, b) or a | {spec.name}(b)"
                )
            return Tensors(tuple(n for t in tensors for n in t.nodes)), []
        if current is None:
            if not args:
                raise NetError(
                    f"{spec.name} needs an input",
                    call.span,
                    hint=f"write {spec.name}(x, ...) or start the chain with x: x | {spec.name}",
                )
            current = self._tensor_arg(args.pop(0), ctx)
        return current, args

    def _tensor_arg(self, expr: s.Expr, ctx: Context) -> Tensors:
        if isinstance(expr, (s.Name, s.AllRef, s.TowerRef)):
            return self._tensor_ref(expr, ctx)
        raise NetError(
            "expected a layer's output here, not a number",
            expr.span,
            hint="the first argument of a layer is its input: conv(x, 64, size=3)",
        )

    # --- blocks -----------------------------------------------------------------------------

    def _expand_block(
        self, block: s.BlockStmt, call: s.Call, current: Tensors | None, instance: str, ctx: Context, device: str | None
    ) -> Tensors:
        self._step(call.span, ctx)  # blocks calling blocks twice each also multiply
        if any(frame.block == block.name for frame in ctx.trace):
            raise NetError(
                f"block `{block.name}` uses itself",
                call.span,
                trace=ctx.trace,
                hint="blocks cannot be recursive; use `repeat` for repetition",
            )
        args = list(call.args or ())
        given: dict[str, object] = {}
        params = [p.name for p in block.params]
        if current is not None:
            if not params:
                raise NetError(f"block `{block.name}` takes no input", call.span)
            given[params[0]] = current
        free = [p for p in params if p not in given]
        if len(args) > len(free):
            raise NetError(
                f"block `{block.name}` takes {len(params)} argument(s) ({', '.join(params)}), "
                f"got {len(args) + len(given)}",
                call.span,
                notes=[(block.span, "defined here")],
                trace=ctx.trace,
            )
        for param, arg in zip(free, args, strict=False):
            given[param] = self._eval(arg, ctx, tensor_ok=True)
        for kwarg in call.kwargs:
            if kwarg.name not in params:
                raise NetError(
                    f"block `{block.name}` has no parameter `{kwarg.name}`",
                    kwarg.span,
                    hint=did_you_mean(kwarg.name, params) or f"its parameters: {', '.join(params)}",
                    notes=[(block.span, "defined here")],
                    trace=ctx.trace,
                )
            if kwarg.name in given:
                raise NetError(f"`{kwarg.name}` is given twice", kwarg.span, trace=ctx.trace)
            given[kwarg.name] = self._eval(kwarg.value, ctx, tensor_ok=True)
        missing = [p for p in params if p not in given]
        if missing:
            raise NetError(
                f"block `{block.name}` is missing argument(s): {', '.join(missing)}",
                call.span,
                notes=[(block.span, "defined here")],
                trace=ctx.trace,
            )
        scope = Scope(parent=self.globals)
        for param in block.params:
            scope.names[param.name] = given[param.name]
            scope.spans[param.name] = param.span
        inner = replace(
            ctx,
            scope=scope,
            prefix=f"{instance.split('@')[0]}/",
            repeat=(),
            block=block.name,
            trace=(*ctx.trace, Frame(block.name, call.span)),
            device=device,
        )
        body = list(block.body)
        result = body.pop() if body and isinstance(body[-1], s.ReturnStmt) else None
        if result is None:
            raise NetError(
                f"block `{block.name}` has no `return`, so it has no output",
                call.span,
                notes=[(block.span, "defined here")],
                trace=ctx.trace,
                hint="end the block with `return <chain>`",
            )
        for stmt in body:
            self.run(stmt, inner)
        # The returned chain is named after the instance itself: `s1 = stage(...)` makes layer `s1`.
        return self._chain(instance.split("@")[0], result.chain, replace(inner, prefix="", repeat=()), device)

    # --- names and references -----------------------------------------------------------------

    def _bind(self, name: str, value, span: Span, ctx: Context) -> None:
        if name in BUILTINS:
            raise NetError(f"`{name}` is a built-in word and cannot be redefined", span)
        if name == "all":  # `all x` reads every tower's copy of x, so `all` alone could never be read
            raise NetError("`all` is a reserved word and cannot be used as a name", span, hint="choose another name")
        if name in OPS and isinstance(value, (Preset, Block)):
            raise NetError(f"`{name}` is a built-in layer type and cannot be redefined", span)
        scope = ctx.scope
        if ctx.tower:
            existing = scope.names.get(name)
            if existing is None or not isinstance(existing, Towered):
                if existing is not None and not ctx.repeat:
                    raise self._duplicate(name, span, scope)
                existing = Towered(ctx.towers, {}, span, outer=existing)
                scope.names[name] = existing
                scope.spans[name] = span
            if ctx.tower in existing.copies and not ctx.repeat:
                raise self._duplicate(name, span, scope)
            existing.copies[ctx.tower] = value
            return
        if name in scope.names and not ctx.repeat:
            raise self._duplicate(name, span, scope)
        scope.names[name] = value
        scope.spans[name] = span

    def _duplicate(self, name: str, span: Span, scope: Scope) -> NetError:
        first = scope.spans.get(name)
        notes = [(first, "first defined here")] if first else []
        return NetError(
            f"`{name}` is already defined",
            span,
            notes=notes,
            hint="give each layer and constant its own name (rebinding is allowed inside `repeat`)",
        )

    def _tensor_ref(self, ref: s.Name | s.AllRef | s.TowerRef, ctx: Context, final: bool = False) -> Tensors:
        value = ctx.scope.lookup(ref.name)
        if value is None or (
            isinstance(value, Towered) and isinstance(ref, s.Name) and ctx.tower and value.view(ctx.tower) is None
        ):
            if final:
                raise self._undefined(ref.name, ref.span, ctx)
            return self._forward(ref, ctx)
        if isinstance(ref, s.AllRef):
            if not isinstance(value, Towered):
                raise NetError(
                    f"`all {ref.name}` needs a name defined inside a towers block",
                    ref.span,
                    hint=f"`{ref.name}` exists once; read it as `{ref.name}`",
                )
            missing = [t for t in value.towers if t not in value.copies]
            if missing:
                if not final and not ctx.repeat and not ctx.block:
                    return self._forward(ref, ctx)
                raise NetError(
                    f"`all {ref.name}` reads {ref.name}@{missing[0]}, which is not defined yet here",
                    ref.span,
                    trace=ctx.trace,
                    hint="inside towers, `all x` can read x once every tower has run its statement",
                )
            nodes = [self._as_tensors(value.copies[t], ref, ctx) for t in value.towers]
            return Tensors(tuple(n for t in nodes for n in t.nodes))
        if isinstance(ref, s.TowerRef):
            if not isinstance(value, Towered):
                raise NetError(
                    f"`{ref.name}` is not defined inside a towers block, so it has no `@{ref.tower}` copy",
                    ref.span,
                    hint=f"read it as plain `{ref.name}`",
                )
            if ref.tower not in value.towers:
                raise NetError(
                    f"`{ref.name}` has no copy on tower `{ref.tower}`",
                    ref.span,
                    hint=did_you_mean(ref.tower, value.towers) or f"its towers: {', '.join(value.towers)}",
                )
            if ref.tower not in value.copies:
                if not final and not ctx.repeat and not ctx.block:
                    return self._forward(ref, ctx)
                raise self._undefined(f"{ref.name}@{ref.tower}", ref.span, ctx)
            return self._as_tensors(value.copies[ref.tower], ref, ctx)
        if isinstance(value, Towered):
            if ctx.tower:
                return self._as_tensors(value.view(ctx.tower), ref, ctx)
            towers = ", ".join(value.towers)
            raise NetError(
                f"`{ref.name}` has one copy per tower ({towers}); say which to read",
                ref.span,
                hint=f"`all {ref.name}` reads every tower's copy; `{ref.name}@{value.towers[0]}` reads one",
            )
        return self._as_tensors(value, ref, ctx)

    def _as_tensors(self, value, ref, ctx: Context) -> Tensors:
        if isinstance(value, Tensors):
            return value
        what = {Preset: "a layer preset", Block: "a block", Symbol: "a word"}.get(type(value), "a number")
        raise NetError(
            f"`{ref.name}` is {what}, not a layer's output",
            ref.span,
            trace=ctx.trace,
            hint="a layer reads the output of an input or another layer",
        )

    def _forward(self, ref, ctx: Context) -> Tensors:
        if ctx.block:
            raise self._undefined(ref.name, ref.span, ctx)
        key = f"?{len(self.forwards)}"
        self.forwards[key] = _Forward(ref, ctx)
        return Tensors((key,))

    def _undefined(self, name: str, span: Span, ctx: Context) -> NetError:
        known = [n for n in ctx.scope.visible() if n not in BUILTINS]
        return NetError(
            f"`{name}` is not defined",
            span,
            trace=ctx.trace,
            hint=did_you_mean(name, known) or "define it with `name = ...` or `input name: C x H x W`",
        )

    def _unknown_layer(self, call: s.Call, ctx: Context) -> NetError:
        value = ctx.scope.lookup(call.name)
        if value is not None and not isinstance(value, (Tensors, Towered)):
            return NetError(
                f"`{call.name}` is a constant, not a layer type",
                call.span,
                trace=ctx.trace,
                hint="layer types, presets (`const p = conv(size=3)`) and blocks can be applied",
            )
        scope_names = [n for n in ctx.scope.visible() if isinstance(ctx.scope.lookup(n), (Preset, Block))]
        hint = did_you_mean(call.name, list(OPS) + scope_names) or f"layer types: {', '.join(sorted(OPS))}"
        return NetError(f"unknown layer type `{call.name}`", call.span, hint=hint, trace=ctx.trace)

    def _resolve_forwards(self) -> None:
        resolved: dict[str, tuple[str, ...]] = {}

        def resolve(key: str, seen: tuple[str, ...]) -> tuple[str, ...]:
            if key in resolved:
                return resolved[key]
            if key in seen:
                forward = self.forwards[key]
                raise NetError(f"`{forward.ref.name}` is defined in terms of itself", forward.ref.span)
            forward = self.forwards[key]
            tensors = self._tensor_ref(forward.ref, forward.ctx, final=True)
            nodes: list[str] = []
            for node in tensors.nodes:
                nodes.extend(resolve(node, (*seen, key)) if node in self.forwards else (node,))
            resolved[key] = tuple(nodes)
            return resolved[key]

        for key in self.forwards:
            resolve(key, ())
        for layer in self.layers.values():
            if any(node in self.forwards for node in layer.inputs):
                layer.inputs = [n for node in layer.inputs for n in (resolved.get(node, (node,)))]
        self._resolved_forwards = resolved

    def _resolve_outputs(self) -> None:
        outputs: list[str] = []
        for ref, ctx in self.outputs:
            for node in self._tensor_ref(ref, ctx, final=True).nodes:
                node = self._resolved_forwards.get(node, (node,))[0] if node in self.forwards else node
                if node not in outputs:
                    outputs.append(node)
        if not outputs:  # every layer nothing reads
            outputs = [n for n, layer in self.layers.items() if self.graph.out_degree(n) == 0 and layer.op != "input"]
        self.graph.graph["outputs"] = outputs

    def _connect(self) -> None:
        for layer in self.layers.values():
            for node in layer.inputs:
                self.graph.add_edge(node, layer.name)
        try:
            cycle = nx.find_cycle(self.graph)
        except nx.NetworkXNoCycle:
            return
        names = [edge[0] for edge in cycle]
        first = self.layers[names[0]]
        notes = [(self.layers[n].span, f"`{n}` is defined here") for n in names[1:]]
        raise NetError(
            f"layers form a cycle: {' -> '.join([*names, names[0]])}",
            first.span,
            notes=notes,
            hint="a layer cannot read, directly or indirectly, its own output",
        )

    # --- layers, devices, parameters ------------------------------------------------------------

    def _add_layer(
        self,
        name: str,
        op: str,
        params: dict,
        inputs: list[str],
        device: str,
        span: Span,
        ctx: Context,
        part: str | None = None,
    ) -> str:
        node = ctx.qualify(name, part)
        if node in self.layers:
            first = self.layers[node]
            raise NetError(
                f"`{node}` is already defined",
                span,
                trace=ctx.trace,
                notes=[(first.span, "first defined here")],
                hint="give each layer its own name (rebinding is allowed inside `repeat`)",
            )
        if len(self.layers) >= MAX_LAYERS:
            raise NetError(
                f"the net has more than {MAX_LAYERS} layers",
                span,
                trace=ctx.trace,
                hint="check the repeat counts: nested `repeat`s multiply",
            )
        self.layers[node] = Layer(node, op, params, inputs, device, span, len(self.layers), ctx.trace, ctx.tower)
        self.graph.add_node(node, layer=self.layers[node])
        return node

    def _inherit_devices(self) -> None:
        """A layer read through a forward reference was not placed yet when its reader was made, so
        the default rule (run where the first input runs) is applied again, in dependency order."""
        if not self.forwards:
            return
        for node in nx.topological_sort(self.graph):
            layer = self.layers[node]
            if node in self.inherits and layer.inputs:
                layer.device = self.layers[layer.inputs[0]].device

    def _device_of(self, inputs: Tensors) -> str | None:
        first = inputs.nodes[0] if inputs.nodes else None
        if first is None or first in self.forwards:
            return None
        return self.layers[first].device

    def _placement(self, name: s.Name | None, ctx: Context) -> str | None:
        if name is None:
            return None
        if ctx.tower:
            raise NetError(
                f"inside a towers block every layer runs on its own tower ({ctx.tower})",
                name.span,
                hint="move the statement out of the towers block to place it on one device",
            )
        self._check_device(name)
        return name.name

    def _check_device(self, name: s.Name) -> None:
        if self.declared_devices and name.name not in self.devices:
            raise NetError(
                f"device `{name.name}` is not declared",
                name.span,
                hint=did_you_mean(name.name, self.devices)
                or f"the declared devices are {', '.join(self.devices)}; add `device {name.name}` to use it",
            )

    def _check_declared_devices(self) -> None:
        """With `device` statements, every layer must run on a declared device (checked at the end,
        since `on` may come before the declaration)."""
        if not self.declared_devices:
            return
        for item in sorted(self.layers.values(), key=lambda layer: layer.order):
            if item.device not in self.devices:
                raise NetError(
                    f"`{item.name}` runs on device `{item.device}`, which is not declared",
                    item.span,
                    trace=item.trace,
                    hint=did_you_mean(item.device, self.devices) or f"declared: {', '.join(self.devices)}",
                )

    def _used_devices(self) -> dict[str, Device]:
        devices: dict[str, Device] = {}
        for layer in sorted(self.layers.values(), key=lambda l: l.order):
            devices.setdefault(layer.device, self.devices.get(layer.device, Device(layer.device)))
        return devices

    def _collect(self, spec: OpSpec, args, kwargs, ctx: Context) -> dict[str, s.Expr]:
        """Matches positional and named arguments to `spec`'s parameters (values are checked later)."""
        if len(args) > len(spec.positional):
            extra = args[len(spec.positional)]
            others = [p.name for p in spec.params if p.name not in spec.positional]
            hint = f"after its input, {spec.name} takes these by position: {', '.join(spec.positional) or 'none'}"
            if not spec.params:
                hint = f"{spec.name} takes only its input"
            elif others:
                hint += f"; name the others: {others[0]}=..."
            raise NetError(f"too many arguments to {spec.name}", extra.span, trace=ctx.trace, hint=hint)
        values = dict(zip(spec.positional, args, strict=False))
        for kwarg in kwargs:
            if spec.param(kwarg.name) is None:
                known = [p.name for p in spec.params]
                hint = did_you_mean(kwarg.name, known) or (
                    f"{spec.name} takes: {', '.join(known)}" if known else f"{spec.name} takes no parameters"
                )
                raise NetError(f"{spec.name} has no parameter `{kwarg.name}`", kwarg.span, hint=hint, trace=ctx.trace)
            if kwarg.name in values:
                raise NetError(
                    f"`{kwarg.name}` is given twice",
                    kwarg.span,
                    trace=ctx.trace,
                    notes=[(values[kwarg.name].span, "first given here")],
                )
            values[kwarg.name] = kwarg.value
        return values

    def _params(self, spec: OpSpec, values: dict[str, s.Expr], ctx: Context, span: Span) -> dict:
        """Evaluates and checks a layer's parameters, filling in defaults."""
        params: dict[str, object] = {}
        for param in spec.params:
            if param.name in values:
                params[param.name] = self._param_value(spec, param, values[param.name], ctx)
            elif param.default is REQUIRED:
                raise NetError(
                    f"{spec.name} needs `{param.name}` ({param.doc})", span, trace=ctx.trace, hint=_example(spec)
                )
            else:
                params[param.name] = param.default
        try:
            return spec.normalize(params)
        except ParamError as error:
            where = values[error.param].span if error.param in values else span
            raise NetError(f"{spec.name}: {error}", where, hint=error.hint, trace=ctx.trace) from None

    def _param_value(self, spec: OpSpec, param: op_registry.Param, expr: s.Expr, ctx: Context):
        where = f"{spec.name} `{param.name}`"
        value = self._eval(expr, ctx)
        kind = param.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise NetError(f"{where} must be true or false", expr.span, trace=ctx.trace)
            return value
        if kind == "pad" and isinstance(value, Symbol):
            if value.word not in ("same", "valid"):
                raise NetError(f"{where} must be a number, (h, w), same or valid", expr.span, trace=ctx.trace)
            return value.word
        if kind in ("pair", "pad") and isinstance(value, tuple):
            if len(value) != 2:
                raise NetError(f"{where} takes one number or two (h, w), not {len(value)}", expr.span, trace=ctx.trace)
            return tuple(self._check_number(param, item, "int", expr, ctx, where) for item in value)
        number_kind = "float" if kind == "float" else "int"
        return self._check_number(param, value, number_kind, expr, ctx, where)

    def _check_number(self, param, value, kind: str, expr: s.Expr, ctx: Context, where: str):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            what = "true/false" if isinstance(value, bool) else _describe_value(value)
            raise NetError(f"{where} must be a number, got {what}", expr.span, trace=ctx.trace)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise NetError(f"{where} must be a whole number, got {value:g}", expr.span, trace=ctx.trace)
            value = int(value)
        else:
            value = float(value)
        low, high = param.minimum, param.maximum
        if (low is not None and value < low) or (
            high is not None and (value >= high if param.below_maximum else value > high)
        ):
            bound = f"at least {low:g}" if low is not None else ""
            if high is not None:
                bound = (
                    (bound + " and " if bound else "") + ("below " if param.below_maximum else "at most ") + f"{high:g}"
                )
            raise NetError(f"{where} must be {bound}, got {value:g}", expr.span, trace=ctx.trace)
        return value

    # --- constant expressions ------------------------------------------------------------------

    def _eval(self, expr: s.Expr, ctx: Context, tensor_ok: bool = False):
        if isinstance(expr, s.Number):  # a literal is bounded like every result, so float() of it cannot overflow
            value = expr.value  # (a preset's evaluated value can also be a word or a tuple)
            return self._checked(value, expr, ctx) if isinstance(value, (int, float)) else value
        if isinstance(expr, s.Name):
            value = ctx.scope.lookup(expr.name)
            if isinstance(value, Towered) and ctx.tower:
                value = value.view(ctx.tower)
            if tensor_ok and (value is None or isinstance(value, (Tensors, Towered))):
                return self._tensor_ref(expr, ctx)
            if value is None:
                raise self._undefined(expr.name, expr.span, ctx)
            if isinstance(value, Towered):
                raise NetError(
                    f"`{expr.name}` has one value per tower ({', '.join(value.towers)}), so it cannot be read here",
                    expr.span,
                    trace=ctx.trace,
                    hint="define the constant outside the towers block",
                )
            if isinstance(value, (Tensors, Towered)):
                raise NetError(
                    f"`{expr.name}` is a layer's output, but a number is expected here", expr.span, trace=ctx.trace
                )
            if isinstance(value, (Preset, Block)):
                raise NetError(
                    f"`{expr.name}` is a {'preset' if isinstance(value, Preset) else 'block'}, "
                    "but a number is expected here",
                    expr.span,
                    trace=ctx.trace,
                )
            return value
        if isinstance(expr, (s.AllRef, s.TowerRef)):
            if tensor_ok:
                return self._tensor_ref(expr, ctx)
            raise NetError(
                "a layer's output cannot be used here",
                expr.span,
                trace=ctx.trace,
                hint="only a layer's first argument (its input) reads other layers",
            )
        if isinstance(expr, s.Tuple):
            return tuple(self._number(item, ctx, "a tuple item") for item in expr.items)
        if isinstance(expr, s.Neg):
            return self._checked(-self._number(expr.operand, ctx, "an operand of -"), expr, ctx)
        if isinstance(expr, s.BinOp):
            return self._binop(expr, ctx)
        raise AssertionError(f"unknown expression {expr!r}")

    def _number(self, expr: s.Expr, ctx: Context, what: str) -> int | float:
        value = self._eval(expr, ctx)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NetError(f"{what} must be a number, got {_describe_value(value)}", expr.span, trace=ctx.trace)
        return value

    def _int(self, expr: s.Expr, ctx: Context, what: str, low: int, high: int) -> int:
        value = self._number(expr, ctx, what)
        if isinstance(value, float):
            if not value.is_integer():
                raise NetError(f"{what} must be a whole number, got {value:g}", expr.span, trace=ctx.trace)
            value = int(value)
        if not low <= value <= high:
            raise NetError(f"{what} must be between {low} and {high}, got {value}", expr.span, trace=ctx.trace)
        return value

    def _binop(self, expr: s.BinOp, ctx: Context):
        a = self._number(expr.left, ctx, f"an operand of {expr.op}")
        b = self._number(expr.right, ctx, f"an operand of {expr.op}")
        if expr.op in ("/", "//", "%") and b == 0:
            raise NetError("division by zero", expr.right.span, trace=ctx.trace)
        if expr.op == "**":
            if abs(b) > 64 and abs(a) > 1:
                raise NetError("number too large", expr.span, trace=ctx.trace)
            if a == 0 and b < 0:
                raise NetError("division by zero", expr.span, trace=ctx.trace)
            try:
                value = a**b
            except OverflowError:
                raise NetError("number too large", expr.span, trace=ctx.trace) from None
            if isinstance(value, complex):
                raise NetError("the result is not a real number", expr.span, trace=ctx.trace)
        else:
            value = {
                "+": lambda: a + b,
                "-": lambda: a - b,
                "*": lambda: a * b,
                "/": lambda: a / b,
                "//": lambda: a // b,
                "%": lambda: a % b,
            }[expr.op]()
        return self._checked(value, expr, ctx)

    def _checked(self, value, expr: s.Expr, ctx: Context):
        if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_NUMBER:
            raise NetError("number too large", expr.span, trace=ctx.trace)
        return value


def _describe_value(value) -> str:
    if isinstance(value, Symbol):
        return f"the word `{value.word}`"
    if isinstance(value, tuple):
        return "a tuple"
    if isinstance(value, Tensors):
        return "a layer's output"
    return type(value).__name__


def _example(spec: OpSpec) -> str:
    examples = {
        "conv": "conv(x, 64, size=3, pad=1)",
        "fc": "fc(x, 4096)",
        "maxpool": "maxpool(x, 3, stride=2)",
        "avgpool": "avgpool(x, 2)",
    }
    return "e.g. " + examples.get(spec.name, f"{spec.name}(x)")


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text) or "net"


def _first_device(statements, file: Path, seen: set[Path]) -> str | None:
    """The default device for inputs: the first declared one (`device`), else the first one named by
    `towers` or `on`; included files count too."""
    mentions = list(_device_mentions(statements, file, seen))
    declared = [name for is_declaration, name in mentions if is_declaration]
    return (declared or [name for _, name in mentions] or [None])[0]


def _device_mentions(statements, file: Path, seen: set[Path]):
    """(is_declaration, device name) for each device the statements name, in source order."""
    for stmt in statements:
        if isinstance(stmt, s.DeviceStmt):
            yield from ((True, name.name) for name in stmt.names)
        elif isinstance(stmt, s.TowersStmt):
            yield from ((False, name.name) for name in stmt.towers)
        elif isinstance(stmt, (s.AssignStmt, s.InputStmt)) and stmt.device is not None:
            yield False, stmt.device.name
        elif isinstance(stmt, s.IncludeStmt):
            try:
                path = (file.parent / stmt.path).resolve()
                if path in seen or not path.is_file():
                    continue  # reported when the include runs
            except (OSError, ValueError):
                continue  # likewise
            seen.add(path)
            try:
                included = parse_file(path).statements
            except NetError:
                continue
            yield from _device_mentions(included, path, seen)


def build(module: s.Module) -> nx.DiGraph:
    """Build the layer graph of a parsed file (shapes are not inferred yet)."""
    try:
        return Builder().build(module)
    except RecursionError:  # expressions and block calls are evaluated recursively
        raise NetError(
            "the net nests too deeply (an expression, block calls or includes)",
            where=module.file,
            hint="split long expressions with `const`, and flatten deep chains of blocks",
        ) from None
