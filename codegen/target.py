"""Compile a Triton kernel for the H100 (sm_90) without a GPU and report what it costs in hardware.

`compile_sm90` runs Triton's real CUDA backend for `GPUTarget("cuda", 90, 32)`, then reads the resources back
from the binary with the NVIDIA tools that ship inside the Triton wheel:

- `cuobjdump --dump-resource-usage` on the cubin: registers, stack, static shared and local memory per thread;
- `ptxas -v` on the PTX (re-assembled with the ptxas Triton itself uses): spill stores and loads;
- `cuobjdump -sass`: the SASS text, searched with the PTX for tensor-core instructions.

Under `TRITON_INTERPRET=1` the `@triton.jit` decorator hands out interpreter objects, and running them patches
`triton.language` in place, after which the real compiler fails in the same process. So when the interpreter is on,
or the kernel is not a real `JITFunction`, the compile runs in a child process (this file run as a script, as
`python -m netdsl.codegen.target` also does: a JSON list of requests on stdin, a JSON list of answers on stdout)
with `TRITON_INTERPRET` removed from its environment. `compile_sm90_many` sends several requests to one child,
which saves starting Python and Triton for each.

Registers, stack and local memory come from the cubin Triton built. The spill counts come from a second ptxas
run that may use slightly different flags from Triton's; a non-zero `stack_bytes` is the cubin's own sign of spilling.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import types
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SM90_MAX_REGISTERS = 255  # per thread
# per block, dynamic shared memory included: limits.MAX_SHARED_BYTES (this file also runs alone, in a child process)
SM90_MAX_SHARED_BYTES = 227 * 1024

TENSOR_CORE_INSTRUCTIONS = {
    "ptx": ("wgmma.mma_async", "mma.sync", "wmma.mma"),
    "sass": ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA", "DMMA"),
}


@dataclass(frozen=True)
class CompileRequest:
    """One kernel specialization to compile: the same arguments as `compile_sm90`."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    sass: bool = True
    divisible_by_16: tuple[str, ...] | None = None


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel needs from an sm_90 streaming multiprocessor.

    Byte counts are per thread except `shared_bytes`, which is per block: the dynamic shared memory Triton launches
    with plus any static shared memory in the cubin.
    """

    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    local_bytes: int
    mma: tuple[str, ...]
    ptx: str = field(repr=False)
    sass: str | None = field(default=None, repr=False)
    cubin: bytes = field(default=b"", repr=False)  # the compiled kernel, an sm_90 ELF

    @property
    def spills(self) -> int:
        """Bytes spilled to local memory, stores and loads together."""
        return self.spill_stores + self.spill_loads


def compile_sm90(
    kernel: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    num_warps: int = 4,
    num_stages: int = 3,
    *,
    sass: bool = True,
    divisible_by_16: Sequence[str] | None = None,
) -> KernelResources:
    """Compile `kernel` for sm_90 with Triton's CUDA backend and measure it.

    `signature` maps every argument name, in order, to a Triton type ("*fp32", "i32", "fp32", ...) or "constexpr";
    `constexprs` gives the value of each "constexpr" argument. To compile what a launch would, give an integer
    argument that will be 1 at run time (a unit stride) as a constexpr 1, as Triton's launcher specializes it.
    `divisible_by_16` names the arguments a launch would find divisible by 16 (addresses in bytes, integers
    in value); None means every pointer, as torch allocations are. `sass=False` skips the disassembly (about half
    a second of CPU per kernel); `mma` is then read from the PTX alone.
    """
    aligned = None if divisible_by_16 is None else tuple(divisible_by_16)
    request = CompileRequest(kernel, signature, constexprs, num_warps, num_stages, sass, aligned)
    return compile_sm90_many([request])[0]


def compile_sm90_many(requests: Sequence[CompileRequest]) -> list[KernelResources]:
    """Compile several specializations, in one child process when the interpreter is on."""
    if not requests:
        return []
    if _interpreter_on() or not all(_is_jit_function(request.kernel) for request in requests):
        return _compile_in_child(requests)
    return _compile_here(requests)


def format_table(results: Sequence[KernelResources]) -> str:
    """A plain-text table, one row per compiled kernel, for benchmarks and test failure messages."""
    header = ("kernel", "config", "dtypes", "warps", "stages", "regs", "spill st/ld", "stack", "smem", "local", "mma")
    rows = [header]
    for result in results:
        config = " ".join(f"{name}={value}" for name, value in result.constexprs.items())
        dtypes = ",".join(dict.fromkeys(t[1:] for t in result.signature.values() if t.startswith("*")))
        rows.append(
            (
                result.name,
                config,
                dtypes,
                str(result.num_warps),
                str(result.num_stages),
                str(result.registers),
                f"{result.spill_stores}/{result.spill_loads}",
                str(result.stack_bytes),
                str(result.shared_bytes),
                str(result.local_bytes),
                ",".join(result.mma) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _is_jit_function(kernel: Any) -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(kernel, JITFunction)


def _compile_here(requests: Sequence[CompileRequest]) -> list[KernelResources]:
    """Compile one after another in this process, then run the NVIDIA tools on all of them side by side."""
    compiled = [_compile(request) for request in requests]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_measure, requests, compiled))


def _compile(request: CompileRequest) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = request.divisible_by_16
    if aligned is None:
        aligned = [name for name, kind in request.signature.items() if kind.startswith("*")]
    attrs = {(request.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=request.kernel, signature=request.signature, constexprs=request.constexprs, attrs=attrs)
    return triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        # fp fusion (FMA contraction) stated, as Triton's JIT defaults to it: unset, Triton 3.9 warns on every compile
        options={"num_warps": request.num_warps, "num_stages": request.num_stages, "enable_fp_fusion": True},
    )


def _measure(request: CompileRequest, compiled: Any) -> KernelResources:
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory(prefix="netdsl-sm90-") as tmp:
        ptx_path = Path(tmp, "kernel.ptx")
        cubin_path = Path(tmp, "kernel.cubin")
        ptx_path.write_text(ptx)
        cubin_path.write_bytes(compiled.asm["cubin"])
        usage = _resource_usage(cubin_path, compiled.metadata.name)
        spill_stores, spill_loads = _spills(ptx_path, Path(tmp, "reassembled.cubin"))
        sass = _sass(cubin_path) if request.sass else None
    mma = [name for name in TENSOR_CORE_INSTRUCTIONS["ptx"] if name in ptx]
    mma += [name for name in TENSOR_CORE_INSTRUCTIONS["sass"] if sass and re.search(rf"\b{name}\b", sass)]
    return KernelResources(
        name=compiled.metadata.name,
        signature=dict(request.signature),
        constexprs=dict(request.constexprs),
        num_warps=request.num_warps,
        num_stages=request.num_stages,
        registers=usage["REG"],
        spill_stores=spill_stores,
        spill_loads=spill_loads,
        stack_bytes=usage["STACK"],
        shared_bytes=compiled.metadata.shared + usage["SHARED"],
        local_bytes=usage["LOCAL"],
        mma=tuple(mma),
        ptx=ptx,
        sass=sass,
        cubin=bytes(compiled.asm["cubin"]),
    )


def _tool(name: str) -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not in the Triton wheel at {path.parent}")
    return path


def _ptxas() -> Path:
    """The ptxas Triton uses for sm_90 (3.9 picks `ptxas-blackwell` from sm_90 up, older wheels plain `ptxas`)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return Path(get_ptxas(90).path)
        except TypeError:  # Triton versions whose get_ptxas takes no architecture
            return Path(get_ptxas().path)
    except (ImportError, AttributeError, RuntimeError):
        return _tool("ptxas")


def _run(command: list[str | Path]) -> str:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}):\n{done.stderr.strip()}")
    return done.stdout + done.stderr


def _resource_usage(cubin: Path, kernel_name: str) -> dict[str, int]:
    """Parse `cuobjdump --dump-resource-usage`: ` Function NAME:` then ` REG:26 STACK:0 SHARED:0 LOCAL:0 ...`."""
    text = _run([_tool("cuobjdump"), "--dump-resource-usage", cubin])
    match = re.search(rf"Function {re.escape(kernel_name)}:\s*\n(.*)", text)
    if match is None:
        raise RuntimeError(f"no resource usage for {kernel_name} in:\n{text}")
    usage = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", match.group(1))}
    return {key: usage.get(key, 0) for key in ("REG", "STACK", "SHARED", "LOCAL")}


def _spills(ptx: Path, scratch_cubin: Path) -> tuple[int, int]:
    """Re-assemble the PTX with `ptxas -v` and read `N bytes spill stores, M bytes spill loads`."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx.read_text(), re.MULTILINE)
    gpu_name = target.group(1) if target else "sm_90a"
    text = _run([_ptxas(), "-v", f"--gpu-name={gpu_name}", ptx, "-o", scratch_cubin])
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if match is None:
        raise RuntimeError(f"no spill counts in ptxas output:\n{text}")
    return int(match.group(1)), int(match.group(2))


def _sass(cubin: Path) -> str | None:
    try:
        return _run([_tool("cuobjdump"), "-sass", cubin])
    except (OSError, RuntimeError):
        return None


def _compile_in_child(requests: Sequence[CompileRequest]) -> list[KernelResources]:
    payload = [_describe(request) for request in requests]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # Run this file by path rather than `-m netdsl.codegen.target`, which would import the netdsl package first.
    run_this_file = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
    done = subprocess.run(
        [sys.executable, "-c", run_this_file, __file__],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"sm_90 compile in a child process failed:\n{done.stderr.strip()}")
    answers = json.loads(done.stdout)
    return [
        KernelResources(**{**answer, "mma": tuple(answer["mma"]), "cubin": base64.b64decode(answer["cubin"])})
        for answer in answers
    ]


def _describe(request: CompileRequest) -> dict[str, Any]:
    """Tell a fresh process how to rebuild the kernel.

    A kernel whose functions (it and the device functions it calls) name no global but Triton's modules (the
    convention for netdsl kernels) travels as source, so the child never imports the kernel's module and
    whatever that imports (torch takes seconds). Any other kernel is found again by module and qualified
    name, or by source file when the module cannot be imported.
    """
    fn = getattr(request.kernel, "fn", request.kernel)
    return {
        "module": fn.__module__,
        "qualname": fn.__qualname__,
        "file": inspect.getsourcefile(fn),
        "source": _standalone_source(fn),
        "signature": request.signature,
        "constexprs": request.constexprs,
        "num_warps": request.num_warps,
        "num_stages": request.num_stages,
        "sass": request.sass,
        "divisible_by_16": request.divisible_by_16,
    }


def _standalone_source(fn: Any) -> str | None:
    """The kernel and the device functions it calls (`source.device_functions`) as a file of their own,
    `import` lines first, or None when they need more than Triton's modules."""
    # Here, not at the top: the child process runs this file by path and must not import the netdsl package.
    from netdsl.codegen.source import DEVICE_GLOBALS, device_functions

    try:
        functions = device_functions(fn)
    except TypeError:
        return None
    parts = [f"import {module}" + (f" as {name}" if name != module else "") for name, module in DEVICE_GLOBALS.items()]
    for function in functions:
        source = textwrap.dedent(inspect.getsource(function))
        definition = re.search(r"^def ", source, re.MULTILINE)
        if definition is None:
            return None
        parts += ["", "", "@triton.jit", source[definition.start() :].rstrip()]
    return "\n".join(parts) + "\n"


def _load_kernel(description: dict[str, Any], scratch: Path) -> Any:
    if description["source"] is not None:
        path = scratch / f"kernel_{len(list(scratch.iterdir()))}.py"
        path.write_text(description["source"])
        module = _import_file(path)
        return getattr(module, description["qualname"].rpartition(".")[2])
    module = None
    if description["module"] != "__main__":
        try:
            module = importlib.import_module(description["module"])
        except ImportError:
            module = None
    if module is None:
        module = _import_file(Path(description["file"]))
    kernel = module
    for part in description["qualname"].split("."):
        kernel = getattr(kernel, part)
    return kernel


def _import_file(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"_netdsl_sm90_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _serve_child() -> None:
    with tempfile.TemporaryDirectory(prefix="netdsl-sm90-src-") as scratch:
        requests = [
            CompileRequest(
                kernel=_load_kernel(description, Path(scratch)),
                signature=description["signature"],
                constexprs=description["constexprs"],
                num_warps=description["num_warps"],
                num_stages=description["num_stages"],
                sass=description["sass"],
                divisible_by_16=description["divisible_by_16"],
            )
            for description in json.load(sys.stdin)
        ]
        # stdout carries the answer: anything the compiler prints goes to stderr instead.
        with contextlib.redirect_stdout(sys.stderr):
            answers = [
                {**dataclasses.asdict(result), "cubin": base64.b64encode(result.cubin).decode("ascii")}
                for result in _compile_here(requests)
            ]
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    _serve_child()
