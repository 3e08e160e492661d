"""Syntax tree -> IR graph: names, constants, presets, blocks, `repeat`, includes and towers.

The builder walks the statements in order, keeping a scope of what each name means (`scope.py`: a
number, a layer preset, a block, a tensor or, for names defined inside a `towers` block, one value per
tower). Layers are created as their statements run; a name that is not yet defined where a layer reads
it is a forward reference, resolved when the file is done (so any DAG can be written in any order, and
a cycle is reported as one).

Beside it: `expressions.py` evaluates constants and layer parameters, `placement.py` chooses each
layer's device, `includes.py` finds and parses included files, and `settings.py` evaluates the settings
of `train` blocks (kept in `graph.graph["recipe"]`; a recipe file, `build_recipe`, holds only those).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import networkx as nx

from netdsl.errors import Frame, NetError, Span, did_you_mean
from netdsl.ir import Layer, layer
from netdsl.ir.display import LayerGraph
from netdsl.ir.graph import Setting
from netdsl.ir.ops import OPS, REQUIRED, OpSpec
from netdsl.lang import expressions
from netdsl.lang import syntax as s
from netdsl.lang.includes import INCLUDED, Includes
from netdsl.lang.placement import DEFAULT_DEVICE, MEMORY_UNITS, Placement, first_device
from netdsl.lang.scope import (
    BUILTINS,
    Block,
    Context,
    Preset,
    Scope,
    Symbol,
    Tensors,
    Towered,
    check_name,
    undefined,
)
from netdsl.lang.settings import train_settings

# MEMORY_UNITS is defined in placement.py; the CLI reads it from here
__all__ = ["MEMORY_UNITS", "build", "build_recipe"]

MAX_REPEAT = 100_000
MAX_LAYERS = 100_000  # so that nested `repeat`s fail in seconds instead of running for hours
MAX_STEPS = 300_000  # statements run, repeat rounds and block calls: likewise when they make no layers
MAX_DIM = 2**31 - 1

# Hints for the statement errors below (docs/language.md has a section on each statement).
_TOP_LEVEL_HINT = "move the statement out of the block or towers, to the top level of the file"
_RETURN_HINT = "a block ends with `return CHAIN`; the net's result is named with `output NAME`"
_NESTED_TOWERS_HINT = "one towers block lists every tower: `towers gpu0, gpu1 { ... }`"
_TOWER_TWICE_HINT = "each tower is a device of its own: `towers gpu0, gpu1 { ... }`"
_BLOCK_HINT = "define the block at the top level, above its first use, and call it here"
_OWN_NAMES = "give each parameter a name of its own"
_FEWER_ARGS = "pass one value per parameter, by position or by name"
_ONCE = "give each argument once, by position or by name"
_ALIAS_CYCLE_HINT = "names that only rename each other (`a = b`, `b = a`) need a layer somewhere: `b = relu(image)`"
_DIM_HINT = "e.g. input image: 3 x 32 x 32 (each size at least 1; the batch is chosen at run time)"
_REPEAT_HINT = "`repeat 0 { ... }` skips its body; nest `repeat`s, within the net's layer limit, for more"


def _rename(name: str) -> str:
    return f"choose another name, e.g. `{name}_1` or `my_{name}`"


# What a recipe file (`netdsl train --recipe F`) may hold, and how the rest is named in its error.
_RECIPE_STATEMENTS = (s.TrainStmt, s.ConstStmt, s.IncludeStmt)
_NOT_IN_RECIPES = {
    s.NetStmt: "`net`",
    s.InputStmt: "an input",
    s.OutputStmt: "`output`",
    s.AssignStmt: "a layer",
    s.DeviceStmt: "`device`",
    s.ReturnStmt: "`return`",
    s.TowersStmt: "`towers`",
    s.BlockStmt: "a block",
    s.RepeatStmt: "`repeat`",
}


@dataclass
class _Forward:
    """A read of a name not yet defined; resolved when the whole file has run."""

    ref: s.Name | s.AllRef | s.TowerRef
    ctx: Context


class Builder:
    """One visitor over the statements, with one handler per statement record (`_AssignStmt`, ...).

    Statements, chains, block expansions and name references stay together because they share the
    state that grows as the file runs, in source order: the scope, the graph of layers made so far and
    the forward references still open. What needs only a `Context` or the finished graph lives in the
    modules beside this one (expressions, placement, includes).
    """

    def __init__(self, module: s.Module, *, recipe_only: bool = False) -> None:
        self.module = module
        self.recipe_only = recipe_only  # a recipe file: `train` blocks, constants and includes only
        self.recipe: list[Setting] = []  # the settings of every `train` block, in the order they ran
        self.graph = LayerGraph()  # the layers made so far, in definition order; edges are added at the end
        self.globals = Scope()
        self.forwards: dict[str, _Forward] = {}
        self.outputs: list[tuple[s.Name | s.AllRef | s.TowerRef, Context]] = []
        self.inputs: list[str] = []
        self.net_name: str | None = None
        self.includes = Includes(module.file)
        self.placement = Placement(first_device(module, self.includes) or DEFAULT_DEVICE)
        self.steps = 0  # counted against MAX_STEPS
        self.part_numbers: dict[str, int] = {}  # `_part_name`: the number a chain part's search starts at
        self.open_blocks: set[str] = set()  # the blocks being expanded now (a block in it that is called recurs)

    # --- entry point ------------------------------------------------------------------------

    def build(self) -> nx.DiGraph:
        module = self.module
        ctx = Context(self.globals, module.file)
        self.run_all(module.statements, ctx)
        resolved = self._resolve_forwards()
        self._connect()
        self.placement.settle(self.graph)
        self._resolve_outputs(resolved)
        self.placement.check_layers(self.graph)
        graph = self.graph
        graph.graph["name"] = self.net_name or _identifier(Path(module.file).stem)
        graph.graph["inputs"] = self.inputs
        graph.graph["devices"] = self.placement.used(graph)
        graph.graph["file"] = module.file
        graph.graph["recipe"] = self.recipe
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
        if self.recipe_only and not isinstance(stmt, _RECIPE_STATEMENTS):
            raise NetError(
                f"a recipe file holds `train` blocks, constants and includes only, not {_NOT_IN_RECIPES[type(stmt)]}",
                stmt.span,
                hint="layers, inputs and devices belong in the net's .net file (NET); --recipe reads settings only",
            )
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
        dims = tuple(expressions.integer(e, ctx, "an input dimension", 1, MAX_DIM, _DIM_HINT) for e in stmt.shape)
        if len(dims) not in (1, 3):
            raise NetError(
                f"an input is C x H x W or a flat N, not {len(dims)} dimensions",
                stmt.span,
                hint="e.g. input image: 3 x 227 x 227 (the batch is chosen at run time)",
            )
        device = self.placement.on(stmt.device, ctx) or self.placement.default
        node = self._add_layer(ctx.qualify(stmt.name), "input", {"shape": dims}, [], device, stmt.span, ctx)
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
            value = self._preset(stmt, stmt.value, ctx)
        else:
            value = expressions.evaluate(stmt.value, ctx)  # a layer's output here is reported by `evaluate`
        self._bind(stmt.name, value, stmt.span, ctx)

    def _preset(self, stmt: s.ConstStmt, call: s.Call, ctx: Context) -> Preset:
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
        spec = OPS[op]
        given = expressions.arguments(spec, call.args or (), call.kwargs, ctx)
        # Evaluated here, so a preset's names mean what they meant where it was written.
        values.update({key: s.Number(expressions.evaluate(expr, ctx), expr.span) for key, expr in given.items()})
        # Report mistakes where the preset is written; required parameters may come at each use.
        if all(p.name in values for p in spec.params if p.default is REQUIRED):
            expressions.layer_params(spec, values, ctx, call.span)
        else:
            for key, expr in values.items():
                expressions.param_value(spec, spec.param(key), expr, ctx)
        return Preset(op, values, call.span)

    def _AssignStmt(self, stmt: s.AssignStmt, ctx: Context) -> None:
        device = self.placement.on(stmt.device, ctx) or ctx.device
        value = self._chain(stmt.name, stmt.chain, ctx, device)
        self._bind(stmt.name, value, stmt.span, ctx)

    def _IncludeStmt(self, stmt: s.IncludeStmt, ctx: Context) -> None:
        path, module = self.includes.enter(stmt, ctx.file)
        try:
            self.run_all(module.statements, replace(ctx, file=str(path), top_file=False))
        except NetError as error:
            # the chain of includes down to the error, one note per level: the error in this file, or in a
            # file this one included (whose note is the last so far)
            last = error.notes[-1] if error.notes and error.notes[-1][1] == INCLUDED else None
            place = last[0] if last is not None else error.span
            if place is not None and place.file == str(path):
                error.notes.append((stmt.span, INCLUDED))
            raise
        self.includes.leave()

    def _DeviceStmt(self, stmt: s.DeviceStmt, ctx: Context) -> None:
        if ctx.block or ctx.tower:
            raise NetError("devices are declared at the top level", stmt.span, hint=_TOP_LEVEL_HINT)
        self.placement.declare(stmt, ctx)

    def _ReturnStmt(self, stmt: s.ReturnStmt, ctx: Context) -> None:
        raise NetError("`return` is only allowed at the end of a block", stmt.span, hint=_RETURN_HINT)

    def _TowersStmt(self, stmt: s.TowersStmt, ctx: Context) -> None:
        if ctx.tower or ctx.towers:
            raise NetError("towers blocks cannot be nested", stmt.span, hint=_NESTED_TOWERS_HINT)
        if ctx.block:
            raise NetError(
                "towers blocks belong at the top level, not inside a block",
                stmt.span,
                hint="call the block inside the towers block instead",
            )
        names = []
        for tower in stmt.towers:
            if tower.name in names:
                raise NetError(f"tower `{tower.name}` is listed twice", tower.span, hint=_TOWER_TWICE_HINT)
            self.placement.check(tower)
            names.append(tower.name)
        towers = tuple(names)
        # Statement by statement, each tower in turn: a statement can read every tower's copy of
        # what the statements above it defined (`all conv2`).
        for inner in stmt.body:
            for tower in towers:
                self.run(inner, replace(ctx, tower=tower, towers=towers))

    def _BlockStmt(self, stmt: s.BlockStmt, ctx: Context) -> None:
        if ctx.block or ctx.tower or ctx.repeat:
            raise NetError("blocks are defined at the top level", stmt.span, hint=_BLOCK_HINT)
        if stmt.name in OPS:
            raise NetError(
                f"`{stmt.name}` is a built-in layer type and cannot name a block", stmt.span, hint=_rename(stmt.name)
            )
        seen: set[str] = set()
        for param in stmt.params:
            check_name(param.name, param.span)
            if param.name in seen:
                raise NetError(f"block parameter `{param.name}` is listed twice", param.span, hint=_OWN_NAMES)
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
        count = expressions.integer(stmt.count, ctx, "a repeat count", 0, MAX_REPEAT, _REPEAT_HINT)
        index = stmt.index
        if index is not None:
            check_name(index.name, index.span)
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

    def _TrainStmt(self, stmt: s.TrainStmt, ctx: Context) -> None:
        self.recipe.extend(train_settings(stmt, ctx))

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
        while ctx.qualify(name, part) in self.graph:
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
        given = {**base, **expressions.arguments(spec, rest, call.kwargs, ctx)}
        params = expressions.layer_params(spec, given, ctx, call.span)
        node = ctx.qualify(name, part)
        node_device = ctx.tower or device or self.placement.of_first_input(node, inputs.nodes, self.graph)
        self._add_layer(node, spec.name, params, list(inputs.nodes), node_device, call.span, ctx)
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

    def _add_layer(
        self, node: str, op: str, params: dict, inputs: list[str], device: str, span: Span, ctx: Context
    ) -> str:
        if node in self.graph:
            raise NetError(
                f"`{node}` is already defined",
                span,
                trace=ctx.trace,
                notes=[(layer(self.graph, node).span, "first defined here")],
                hint="give each layer its own name (rebinding is allowed inside `repeat`)",
            )
        order = len(self.graph)
        if order >= MAX_LAYERS:
            raise NetError(
                f"the net has more than {MAX_LAYERS} layers",
                span,
                trace=ctx.trace,
                hint="check the repeat counts: nested `repeat`s multiply",
            )
        self.graph.add_node(node, layer=Layer(node, op, params, inputs, device, span, order, ctx.trace, ctx.tower))
        return node

    # --- blocks -----------------------------------------------------------------------------

    def _expand_block(
        self, block: s.BlockStmt, call: s.Call, current: Tensors | None, instance: str, ctx: Context, device: str | None
    ) -> Tensors:
        self._step(call.span, ctx)  # blocks calling blocks twice each also multiply
        if block.name in self.open_blocks:  # a set, not a walk of the trace: deep nesting stays linear
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
                raise NetError(
                    f"block `{block.name}` takes no input",
                    call.span,
                    hint=f"call it on its own, `{block.name}()`, or give it a first parameter for the input",
                )
            given[params[0]] = current
        free = [p for p in params if p not in given]
        if len(args) > len(free):
            raise NetError(
                f"block `{block.name}` takes {len(params)} argument(s) ({', '.join(params)}), "
                f"got {len(args) + len(given)}",
                call.span,
                hint="in a chain, `x | f(...)`, x is the block's first argument" if given else _FEWER_ARGS,
                notes=[(block.span, "defined here")],
                trace=ctx.trace,
            )
        for param, arg in zip(free, args, strict=False):
            given[param] = self._block_argument(arg, ctx)
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
                raise NetError(f"`{kwarg.name}` is given twice", kwarg.span, trace=ctx.trace, hint=_ONCE)
            given[kwarg.name] = self._block_argument(kwarg.value, ctx)
        missing = [p for p in params if p not in given]
        if missing:
            raise NetError(
                f"block `{block.name}` is missing argument(s): {', '.join(missing)}",
                call.span,
                hint=f"pass them by position or by name: {block.name}(..., {missing[0]}=...)",
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
        self.open_blocks.add(block.name)
        try:
            for stmt in body:
                self.run(stmt, inner)
            # The returned chain is named after the instance itself: `s1 = stage(...)` makes layer `s1`.
            return self._chain(instance.split("@")[0], result.chain, replace(inner, prefix="", repeat=()), device)
        finally:
            self.open_blocks.discard(block.name)

    def _block_argument(self, expr: s.Expr, ctx: Context):
        """A block's argument: a tensor (a layer's output, perhaps not defined yet) or a constant."""
        if isinstance(expr, (s.AllRef, s.TowerRef)):
            return self._tensor_ref(expr, ctx)
        if isinstance(expr, s.Name):
            value = ctx.scope.lookup(expr.name)
            if isinstance(value, Towered) and ctx.tower:
                value = value.view(ctx.tower)
            if value is None or isinstance(value, (Tensors, Towered)):
                return self._tensor_ref(expr, ctx)
        return expressions.evaluate(expr, ctx)

    # --- names and references -----------------------------------------------------------------

    def _bind(self, name: str, value, span: Span, ctx: Context) -> None:
        if name in BUILTINS:
            raise NetError(f"`{name}` is a built-in word and cannot be redefined", span, hint=_rename(name))
        check_name(name, span)
        if name in OPS and isinstance(value, (Preset, Block)):
            raise NetError(f"`{name}` is a built-in layer type and cannot be redefined", span, hint=_rename(name))
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
                raise undefined(ref.name, ref.span, ctx)
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
                raise undefined(f"{ref.name}@{ref.tower}", ref.span, ctx)
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
            raise undefined(ref.name, ref.span, ctx)
        key = f"?{len(self.forwards)}"  # never a layer's name: names cannot start with `?`
        self.forwards[key] = _Forward(ref, ctx)
        return Tensors((key,))

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

    # --- when the file is done ----------------------------------------------------------------

    def _resolve_forwards(self) -> dict[str, tuple[str, ...]]:
        """Replaces each forward reference in the layers' inputs by the layers it names; returns what
        each forward reference resolved to."""
        resolved: dict[str, tuple[str, ...]] = {}

        def resolve(key: str, seen: tuple[str, ...]) -> tuple[str, ...]:
            if key in resolved:
                return resolved[key]
            if key in seen:
                forward = self.forwards[key]
                raise NetError(
                    f"`{forward.ref.name}` is defined in terms of itself", forward.ref.span, hint=_ALIAS_CYCLE_HINT
                )
            forward = self.forwards[key]
            tensors = self._tensor_ref(forward.ref, forward.ctx, final=True)
            nodes: list[str] = []
            for node in tensors.nodes:
                nodes.extend(resolve(node, (*seen, key)) if node in self.forwards else (node,))
            resolved[key] = tuple(nodes)
            return resolved[key]

        for key in self.forwards:
            resolve(key, ())
        for _, item in self.graph.nodes(data="layer"):
            if any(node in self.forwards for node in item.inputs):
                item.inputs = [n for node in item.inputs for n in (resolved.get(node, (node,)))]
        return resolved

    def _connect(self) -> None:
        edges = [(node, item.name) for _, item in self.graph.nodes(data="layer") for node in item.inputs]
        self.graph.add_edges_from(edges)
        try:
            cycle = nx.find_cycle(self.graph)
        except nx.NetworkXNoCycle:
            return
        names = [edge[0] for edge in cycle]
        notes = [(layer(self.graph, n).span, f"`{n}` is defined here") for n in names[1:]]
        raise NetError(
            f"layers form a cycle: {' -> '.join([*names, names[0]])}",
            layer(self.graph, names[0]).span,
            notes=notes,
            hint="a layer cannot read, directly or indirectly, its own output",
        )

    def _resolve_outputs(self, resolved: dict[str, tuple[str, ...]]) -> None:
        outputs: list[str] = []
        written: dict[str, str] = {}  # an output layer -> the name its `output` statement wrote for it
        for ref, ctx in self.outputs:
            nodes = [resolved[n][0] if n in self.forwards else n for n in self._tensor_ref(ref, ctx, final=True).nodes]
            outputs.extend(node for node in nodes if node not in outputs)
            if len(nodes) == 1 and isinstance(ref, s.Name | s.TowerRef):
                written.setdefault(nodes[0], ref.name if isinstance(ref, s.Name) else f"{ref.name}@{ref.tower}")
        if not outputs:  # every layer nothing reads
            nodes = self.graph.nodes(data="layer")
            outputs = [n for n, item in nodes if self.graph.out_degree(n) == 0 and item.op != "input"]
        self.graph.graph["outputs"] = outputs
        # What a run's outputs are called (`output a` of a chain `a = conv(...) | relu` is `a`, not `a.relu`): the
        # written name where it is one output's alone, else the layer's.
        names = [written.get(node, node) for node in outputs]
        self.graph.graph["output_names"] = [
            name if names.count(name) == 1 else node for node, name in zip(outputs, names, strict=True)
        ]


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text) or "net"


def build(module: s.Module) -> nx.DiGraph:
    """Build the layer graph of a parsed file (shapes are not inferred yet)."""
    try:
        return Builder(module).build()
    except RecursionError:  # expressions and block calls are evaluated recursively
        raise NetError(
            "the net nests too deeply (an expression, block calls or includes)",
            where=module.file,
            hint="split long expressions with `const`, and flatten deep chains of blocks",
        ) from None


def build_recipe(module: s.Module) -> list[Setting]:
    """The settings of a recipe file: its `train` blocks (and those of the files it includes), in order."""
    builder = Builder(module, recipe_only=True)
    try:
        builder.run_all(module.statements, Context(builder.globals, module.file))
    except RecursionError:
        raise NetError(
            "the recipe nests too deeply (an expression or includes)",
            where=module.file,
            hint="split long expressions with `const`, and shorten chains of files that include each other",
        ) from None
    return builder.recipe
