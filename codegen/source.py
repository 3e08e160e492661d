"""The source of a `@triton.jit` kernel and of the `@triton.jit` device functions it calls.

A generated kernel file (netdsl.compiler.emit) holds copies of them, and the sm_90 cache keys its
entries on all of them (netdsl.compiler.launches): a change to a shared helper must reach both.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import threading
import types

DEVICE_GLOBALS = {"triton": "triton", "tl": "triton.language"}
_PARSING = threading.Lock()


def device_functions(kernel) -> list[types.FunctionType]:
    """The Python functions of a `@triton.jit` kernel and of every `@triton.jit` function it calls, directly
    or not: the kernel first, then the others in the order they are first called, each once.

    Any other global a device function names must be one of `DEVICE_GLOBALS`, the modules a generated file
    imports: a copy that needs more would fail only when it runs, so this fails now."""
    from triton.runtime.jit import KernelInterface  # the type of @triton.jit functions, interpreted or not

    functions: list[types.FunctionType] = []

    def visit(jit_function) -> None:
        fn = getattr(jit_function, "fn", jit_function)
        if fn in functions:
            return
        functions.append(fn)
        for name in _global_names(fn):
            if name not in fn.__globals__:
                continue  # a builtin: range, float
            value = fn.__globals__[name]
            if isinstance(value, KernelInterface):
                visit(value)
            elif not (isinstance(value, types.ModuleType) and value.__name__ == DEVICE_GLOBALS.get(name)):
                raise TypeError(
                    f"{fn.__module__}.{fn.__qualname__} uses the global {name!r}, which a generated kernel file "
                    f"does not define: device functions may only name {sorted(DEVICE_GLOBALS)} and @triton.jit "
                    "functions"
                )

    visit(kernel)
    return functions


def _global_names(fn: types.FunctionType) -> list[str]:
    """The names a function reads that are neither its arguments nor assigned in it, in source order."""
    with _PARSING:  # CPython 3.11's AST constructor keeps one recursion count per interpreter: threads that
        # parse at once (the sm_90 builds describe kernels from a thread pool) corrupt it ("SystemError: AST
        # constructor recursion depth mismatch"), so one parse at a time
        (definition,) = ast.parse(textwrap.dedent(inspect.getsource(fn))).body
    names = [node for node in ast.walk(definition) if isinstance(node, ast.Name)]
    local = {arg.arg for arg in ast.walk(definition.args) if isinstance(arg, ast.arg)}
    local |= {node.id for node in names if not isinstance(node.ctx, ast.Load)}
    loads = sorted((node for node in names if node.id not in local), key=lambda node: (node.lineno, node.col_offset))
    return list(dict.fromkeys(node.id for node in loads))
