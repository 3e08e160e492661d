"""Triton kernels that netdsl's code generator specializes for each fused layer group.

Installed as `netdsl.codegen`. Each module holds one family of kernels: the `@triton.jit` kernel
(which may call `@triton.jit` device functions; the emitter copies the kernel and those into a
generated file: `source.py`), then a launcher that checks shapes, allocates the output and launches
it. `reference.py` is what every op means in PyTorch; `limits.py` what the kernels can hold.
"""

from netdsl.codegen.interpret import interpreting, prepare_interpreter

if interpreting():
    # Under Triton's interpreter (the CPU path) bf16 dots would multiply raw bits, and each 32-bit integer
    # operation would be checked for an overflow it cannot report: see codegen/interpret.py. Done where the
    # kernels live, so that the runtime, the generated files run by hand and direct calls of the launchers
    # all get it.
    prepare_interpreter()
