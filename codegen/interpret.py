"""Running the generated kernels under Triton's interpreter (`TRITON_INTERPRET=1`, the CPU path).

Triton's interpreter keeps bfloat16 values as their raw 16 bits in uint16 arrays, and its `tl.dot`
multiplies those integers (triton-lang/triton#11584): every bf16 matrix product comes out wrong, with
no error. `widen_bf16_dots()` makes the interpreter widen bf16 dot operands to float32 first (bf16 is
the top half of a float32), which is what a tensor core computes: exact products, fp32 accumulation.
It also makes its float32 -> bf16 casts round to nearest even, as a GPU's do (it truncates). Neither
changes anything for other dtypes, nor when Triton stores bf16 some other way. `netdsl.codegen`
applies it when imported under the interpreter; the runtime refuses bf16 there if it cannot.

The interpreter also checks every 32-bit integer add, subtract and multiply for overflow (it does each
again in 64 bits and compares) and then drops the answer: its device_assert does nothing unless the debug
option is on, which the interpreter never turns on. That is about half of a conv kernel's time under the
interpreter, for nothing; `skip_dead_overflow_checks()` turns the checks off where debug is off.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_interpreter() -> None:
    """Runs the kernels under Triton's interpreter from now on (on a machine without a GPU), prepared as
    `prepare_interpreter` says: for a command that decides this after `netdsl.codegen` was imported (which
    prepares it only when the interpreter was already chosen)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if interpreting():
        prepare_interpreter()


def prepare_interpreter() -> None:
    """What netdsl asks of Triton's interpreter: bf16 dots widened, no overflow checks that cannot report."""
    widen_bf16_dots()
    skip_dead_overflow_checks()


def skip_dead_overflow_checks() -> bool:
    """Turns off the interpreter's 32-bit integer overflow checks where its debug option, without which they
    report nothing, is off; False when this Triton's interpreter has no such settings (or debug is on)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(options) or not hasattr(options, "sanitize_overflow"):
        return False
    if getattr(options, "debug", True):  # on (or a Triton whose interpreter has no such switch): they may report
        return False
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True


def widen_bf16_dots() -> bool:
    """Patches the interpreter's dot (once per process); False when this Triton has no such hook."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    create_dot = getattr(builder, "create_dot", None)
    tensor_handle = getattr(interpreter, "TensorHandle", None)
    if create_dot is None or tensor_handle is None:
        return False
    if getattr(create_dot, "widens_bf16", False):
        return True

    def widen(handle):
        data = getattr(handle, "data", None)
        if getattr(handle, "dtype", None) != tl.bfloat16 or not isinstance(data, np.ndarray) or data.dtype != np.uint16:
            return handle
        return tensor_handle((data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot_widened(self, a, b, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), *args, **kwargs)

    create_dot_widened.widens_bf16 = True
    builder.create_dot = create_dot_widened
    _round_bf16_casts(builder, tensor_handle, tl)
    return True


def _round_bf16_casts(builder, tensor_handle, tl) -> None:
    """The interpreter casts float32 to bf16 by dropping the low 16 bits (towards zero); a GPU, and PyTorch,
    round to nearest even. Patched so that bf16 results under the interpreter are a GPU's, not biased."""
    cast = getattr(builder, "cast_impl", None)
    if cast is None or getattr(cast, "rounds_bf16", False):
        return

    def cast_rounded(self, src, dst_type):
        data = getattr(src, "data", None)
        if (getattr(src, "dtype", None) != tl.float32 or dst_type.scalar != tl.bfloat16
                or not isinstance(data, np.ndarray) or data.dtype != np.float32):  # fmt: skip
            return cast(self, src, dst_type)
        bits = data.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # to nearest, ties to even
        rounded = np.where(np.isnan(data), ((bits >> 16) | 0x40).astype(np.uint16), rounded)  # NaN stays NaN
        return tensor_handle(rounded, dst_type.scalar)

    cast_rounded.rounds_bf16 = True
    builder.cast_impl = cast_rounded
