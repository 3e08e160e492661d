"""Triton kernels that netdsl's code generator specializes for each fused layer group.

Installed as `netdsl.codegen`. Each module holds one family of kernels: the `@triton.jit` kernel,
self-contained so the emitter can copy its source into a generated file, then a launcher that
checks shapes, allocates the output and launches it.
"""
