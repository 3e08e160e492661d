"""What each generated kernel launches with, found without a GPU, and what it costs on an H100.

`record_launches` imports each file of a build's `kernels/` and calls its `launch` on `meta` tensors
(shapes and dtypes, no data) with the kernel replaced by a recorder: the launcher's own code computes
the grid, the arguments and the block configuration, exactly as it would on a GPU. From a recording,
`sm90_requests` makes the `GPUTarget("cuda", 90, 32)` compile requests of `netdsl.codegen.target`, and
`sm90_resources` compiles them, caching each compiled kernel (cubin and PTX) and its resource report
on disk under a hash of everything that can change it (the kernel's source, its specialization, the
netdsl and Triton versions, the ptxas and the environment settings Triton and ptxas read). A stored
report carries a checksum of itself and of its cubin and PTX: an edited or torn entry is built again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch

from netdsl._version import __version__
from netdsl.codegen.layouts import to_layout
from netdsl.codegen.source import device_functions
from netdsl.errors import NetError
from netdsl.files import parse_json, write_atomic_bytes
from netdsl.ir.dtypes import torch_dtype

_TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass
class Launch:
    step: str
    grid: tuple[int, ...]
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    kernel: object  # the generated file's @triton.jit function
    source: str  # the generated file's text
    divisible_by_16: tuple[str, ...] = ()  # arguments Triton's launcher would find divisible by 16


class Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records the launch instead of running it."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))

        return launch


def load_kernel_file(path: Path) -> ModuleType:
    """Imports a generated kernel file under a private module name (its path may be anywhere)."""
    name = "netdsl_generated_" + hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Triton's JIT looks the module up while it reads the kernel's source
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def recording(module: ModuleType) -> Iterator[Recorder]:
    """A kernel file's kernel replaced by a Recorder for the block: its launcher runs, the kernel does not."""
    kernel, recorder = module.KERNEL, Recorder()
    module.KERNEL = recorder
    try:
        yield recorder
    finally:
        module.KERNEL = kernel


def record_launches(
    kernel_files: list[Path], batch: int, dtype: str, configs: dict[str, dict[str, int]] | None = None
) -> list[Launch]:
    """Each file's launch at `batch` in `dtype`; `configs`: tiles to launch a step with instead of its own."""
    launches = []
    for path in kernel_files:
        module = load_kernel_file(path)
        with recording(module) as recorder:
            dt = torch_dtype(dtype)
            # The maps and weights laid out as the runtime lays them out: the strides decide what Triton
            # specializes (a unit channel stride is a constant, and with it the vector loads).
            inputs = [
                to_layout(torch.empty(batch, *shape, device="meta", dtype=dt), layout)
                for shape, layout in zip(module.INPUT_SHAPES, module.INPUT_LAYOUTS, strict=True)
            ]
            weights = {
                name: to_layout(torch.empty(shape, device="meta", dtype=dt), module.WEIGHT_LAYOUTS.get(name, "nchw"))
                for name, shape in module.WEIGHT_SHAPES.items()
            }
            out = to_layout(torch.empty(batch, *module.OUTPUT_SHAPE, device="meta", dtype=dt), module.OUTPUT_LAYOUT)
            config = (configs or {}).get(module.STEP)
            module.launch(inputs, weights, out=out, **({"config": config} if config else {}))
        source = path.read_text(encoding="utf-8")
        for grid, args, kwargs in recorder.calls[:1]:  # one specialization per step (a concat repeats it)
            launches.append(describe_launch(module.STEP, module.KERNEL, grid, args, kwargs, source))
    return launches


def describe_launch(step: str, kernel, grid, args: tuple, kwargs: dict, source: str) -> Launch:
    fn = getattr(kernel, "fn", kernel)
    parameters = list(inspect.signature(fn).parameters.values())
    values = dict(zip([p.name for p in parameters], args))
    values.update({key: value for key, value in kwargs.items() if key not in ("num_warps", "num_stages")})
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    divisible: list[str] = []  # as Triton's launcher specializes: 16-byte aligned addresses, integers % 16 == 0
    for parameter in parameters:
        value = values[parameter.name]
        if (
            "constexpr" in str(parameter.annotation)
            or value is None
            or (isinstance(value, int) and value == 1 and not isinstance(value, bool))
        ):
            signature[parameter.name] = "constexpr"  # Triton's launcher specializes None and 1 the same way
            constexprs[parameter.name] = value
        elif isinstance(value, torch.Tensor):
            signature[parameter.name] = "*" + _TRITON_TYPES[value.dtype]
            if value.storage_offset() * value.element_size() % 16 == 0:  # arenas and weights start aligned
                divisible.append(parameter.name)
        elif isinstance(value, bool):
            signature[parameter.name] = "i1"
        elif isinstance(value, int):
            signature[parameter.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(parameter.name)
        elif isinstance(value, float):
            signature[parameter.name] = "fp32"
        else:
            raise TypeError(f"{step}: cannot describe argument {parameter.name}={value!r}")
    if callable(grid):
        grid = grid({**values, **kwargs})
    return Launch(
        step,
        tuple(int(g) for g in grid),
        signature,
        constexprs,
        int(kwargs.get("num_warps", 4)),
        int(kwargs.get("num_stages", 3)),
        kernel,
        source,
        tuple(divisible),
    )


# --- sm_90 resources, cached ---------------------------------------------------------------------


def cache_dir() -> Path:
    root = (
        os.environ.get("NETDSL_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "netdsl"
    )
    return Path(root) / "sm90"


# Environment settings Triton (its knobs.py) or ptxas read while building a kernel that change what is built:
# optimization and fusion switches, debug code and line information, overrides, the tools and libraries used.
COMPILER_ENVIRONMENT = (
    "DISABLE_PTXAS_OPT",
    "LLVM_EXTRACT_DI_LOCAL_VARIABLES",
    "PTXAS_OPTIONS",
    "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS",
    "TRITON_DEBUG",
    "TRITON_DEFAULT_FP_FUSION",
    "TRITON_DISABLE_LINE_INFO",
    "TRITON_ENABLE_ASAN",
    "TRITON_F32_DEFAULT",
    "TRITON_FORCE_DISABLE_FP_FUSION",
    "TRITON_FPSAN_HOMOMORPHIC_CASTS",
    "TRITON_INSTRUMENTATION_MODE",
    "TRITON_KERNEL_OVERRIDE",
    "TRITON_LIBDEVICE_PATH",
    "TRITON_MOCK_PTX_VERSION",
    "TRITON_OVERRIDE_ARCH",
    "TRITON_OVERRIDE_DIR",
    "TRITON_PTXAS_BLACKWELL_PATH",
    "TRITON_PTXAS_PATH",
    "USE_IR_LOC",
)


def _cache_key(launch: Launch) -> str:
    import triton

    material = json.dumps(
        {
            "kernel": "".join(inspect.getsource(fn) for fn in device_functions(launch.kernel)),
            "signature": launch.signature,
            "constexprs": {k: repr(v) for k, v in launch.constexprs.items()},
            "warps": launch.num_warps,
            "stages": launch.num_stages,
            "divisible_by_16": list(launch.divisible_by_16),
            "netdsl": __version__,
            "triton": triton.__version__,
            "environment": {name: os.environ.get(name) for name in COMPILER_ENVIRONMENT},  # unset: null
            "ptxas": _ptxas_version(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _ptxas_version_at(path: str, size: int, modified: int) -> str:
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def _ptxas_version() -> str:
    """`ptxas --version` of the ptxas the sm_90 build uses (`TRITON_PTXAS_*_PATH` may name another binary at
    the same path later), or "" where there is none."""
    from netdsl.codegen.target import _ptxas

    try:
        path = _ptxas()
        status = path.stat()
        return _ptxas_version_at(str(path), status.st_size, status.st_mtime_ns)
    except (OSError, RuntimeError):
        return ""


_FIELDS = ("name", "registers", "spill_stores", "spill_loads", "stack_bytes", "shared_bytes", "local_bytes", "mma")
_COUNTS = _FIELDS[1:-1]  # whole numbers >= 0
_CHECKSUMS = ("cubin_sha256", "ptx_sha256", "sha256")  # of the .cubin, of the .ptx, of the report itself
_KEY = "key"  # the cache key the entry was built for: a report copied or renamed under another key is not read


def _read_cache(path: Path) -> dict | None:
    """A report of the cache, checked by content (each field of its type, the checksums SHA-256s, the report's
    own matching, the key it was built for its file's name), or None: missing, torn, edited, foreign, renamed
    or from another netdsl, it is rebuilt."""
    try:
        entry = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or set(entry) != {*_FIELDS, *_CHECKSUMS, _KEY} or entry[_KEY] != path.stem:
        return None
    counts = all(type(entry[key]) is int and entry[key] >= 0 for key in _COUNTS)
    mma = isinstance(entry["mma"], list) and all(isinstance(item, str) for item in entry["mma"])
    checksums = all(isinstance(entry[key], str) and len(entry[key]) == 64 for key in _CHECKSUMS)
    if not (counts and mma and checksums and isinstance(entry["name"], str)):
        return None
    return entry if entry["sha256"] == _record_checksum(entry) else None


def _record_checksum(entry: dict) -> str:
    """SHA-256 of everything in an entry but this checksum: what was measured and the files' checksums."""
    record = {key: value for key, value in entry.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()


def _write_cache(path: Path, entry: dict) -> None:
    _write_bytes(path, json.dumps(entry).encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_bytes(path, data)  # a concurrent reader sees the old file or the new one


def _has_binary(path: Path, entry: dict) -> bool:
    """Whether the entry at `path` (its .json) has its compiled kernel beside it, whole: an ELF file and its
    PTX whose SHA-256s are the ones its report recorded (a cubin truncated after its magic bytes is not)."""
    try:
        cubin, ptx = path.with_suffix(".cubin").read_bytes(), path.with_suffix(".ptx").read_bytes()
    except OSError:
        return False
    return (
        cubin[:4] == b"\x7fELF"
        and hashlib.sha256(cubin).hexdigest() == entry["cubin_sha256"]
        and hashlib.sha256(ptx).hexdigest() == entry["ptx_sha256"]
    )


def _cached(path: Path) -> dict | None:
    """The whole entry at `path`: a readable report and its cubin and PTX."""
    entry = _read_cache(path)
    return entry if entry is not None and _has_binary(path, entry) else None


def cached_cubin(launch: Launch) -> Path | None:
    """The sm_90 cubin `sm90_resources` built for `launch`, if the cache holds it (for cuobjdump & co.)."""
    path = cache_dir() / f"{_cache_key(launch)}.json"
    return path.with_suffix(".cubin") if _cached(path) is not None else None


def sm90_resources(launches: list[Launch], use_cache: bool = True) -> dict[str, dict]:
    """Step name -> registers, spills, shared memory and tensor-core instructions on sm_90.

    Each kernel is compiled once per cache key (a tower's copies of a step share one): the cache holds,
    under the key, the compiled kernel (`<key>.cubin`, an sm_90 ELF, and `<key>.ptx`) and what was measured
    of it (`<key>.json`). An entry whose report or cubin is missing or unreadable is compiled and written
    again."""
    from netdsl.codegen.target import CompileRequest, compile_sm90_many

    results: dict[str, dict] = {}
    missing: list[tuple[Launch, Path]] = []
    alike: dict[Path, list[str]] = {}  # cache entry -> the steps it stands for (a tower's copies share one)
    for launch in launches:
        path = cache_dir() / f"{_cache_key(launch)}.json"
        if path in alike:
            alike[path].append(launch.step)
            continue
        alike[path] = [launch.step]
        entry = _cached(path) if use_cache else None
        if entry is None:
            missing.append((launch, path))
        else:
            results[launch.step] = entry
    requests = [
        CompileRequest(
            launch.kernel,
            launch.signature,
            launch.constexprs,
            launch.num_warps,
            launch.num_stages,
            sass=True,
            divisible_by_16=launch.divisible_by_16,
        )
        for launch, _ in missing
    ]
    try:
        compiled = compile_sm90_many(requests)
    except Exception as error:  # a kernel that does not build for the H100 is a compiler bug worth showing
        raise NetError(
            f"building the kernels for sm_90 failed: {error}",
            where="sm_90",
            hint="this is a bug in a generated kernel: run with --no-sm90 to go on, and please report it",
        ) from error
    for (launch, path), resources in zip(missing, compiled):
        entry = {key: value for key, value in asdict(resources).items() if key in _FIELDS}
        entry["mma"] = list(entry["mma"])
        entry[_KEY] = path.stem
        ptx = resources.ptx.encode("utf-8")
        entry["cubin_sha256"] = hashlib.sha256(resources.cubin).hexdigest()
        entry["ptx_sha256"] = hashlib.sha256(ptx).hexdigest()
        entry["sha256"] = _record_checksum(entry)
        results[launch.step] = entry
        with contextlib.suppress(OSError, NetError):  # an unwritable cache only costs time
            # The compiled kernel first, its report last: an entry whose report can be read is whole.
            _write_bytes(path.with_suffix(".cubin"), resources.cubin)
            _write_bytes(path.with_suffix(".ptx"), ptx)
            _write_cache(path, entry)
    for steps in alike.values():
        for step in steps[1:]:
            results[step] = {**results[steps[0]], "mma": list(results[steps[0]]["mma"])}  # a copy each
    return {launch.step: results[launch.step] for launch in launches}
