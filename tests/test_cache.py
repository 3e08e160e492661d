"""The on-disk cache of sm_90 resources (netdsl/compiler/launches.py) and the report section built from it.

An entry is keyed by everything that changes what Triton builds: the kernel's source, its signature
and constexprs, warps and stages, the netdsl and Triton versions, the ptxas and the environment settings
Triton and ptxas read. A corrupt or edited entry (its report checksums itself, its cubin, its PTX and the
key it was built for) is rebuilt and written again; processes that fill one cache at the same time leave only
whole entries. The kernels are built for GPUTarget("cuda", 90, 32) on the CPU (no GPU needed), about a second
each: a tiny kernel here, LeNet-5's seven for the report.
"""

import json
import multiprocessing
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import triton

import netdsl.codegen.target
import netdsl.compiler.launches
from netdsl.codegen.target import SM90_MAX_REGISTERS, SM90_MAX_SHARED_BYTES, TENSOR_CORE_INSTRUCTIONS
from netdsl.compiler.compile import compile_net, sm90_report, write_build
from netdsl.compiler.launches import (
    COMPILER_ENVIRONMENT,
    Launch,
    _cache_key,
    _read_cache,
    cache_dir,
    cached_cubin,
    load_kernel_file,
    sm90_resources,
)
from netdsl.compiler.passes import Options

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("name", "registers", "spill_stores", "spill_loads", "stack_bytes", "shared_bytes", "local_bytes", "mma")

KERNEL = """
import triton
import triton.language as tl


@triton.jit
def scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * {factor}, mask=mask)
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NETDSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "sm90"


def kernel_launch(folder: Path, factor: str = "2.0", block: int = 128, step: str = "scale") -> Launch:
    """A launch of the tiny kernel, as `record_launches` describes one, from a file of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"scale_{factor.replace('.', '_')}.py"
    path.write_text(KERNEL.format(factor=factor), encoding="utf-8")
    kernel = load_kernel_file(path).scale_kernel
    return Launch(
        step=step,
        grid=(8,),
        signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
        constexprs={"BLOCK": block},
        num_warps=4,
        num_stages=3,
        kernel=kernel,
        source=path.read_text(encoding="utf-8"),
    )


def valid(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and set(FIELDS) <= set(entry)
        and 0 < entry["registers"] <= SM90_MAX_REGISTERS
        and entry["shared_bytes"] <= SM90_MAX_SHARED_BYTES
    )


# --- the key ---------------------------------------------------------------------------------------


def test_key_is_stable_and_names_the_step_not(tmp_path):
    launch = kernel_launch(tmp_path / "a")
    again = kernel_launch(tmp_path / "b", step="another_step")  # the same kernel, loaded from another file
    assert _cache_key(launch) == _cache_key(launch) == _cache_key(again)
    assert re.fullmatch(r"[0-9a-f]{64}", _cache_key(launch))


def test_key_changes_with_everything_that_changes_the_build(tmp_path, monkeypatch):
    launch = kernel_launch(tmp_path)
    keys = {
        "base": _cache_key(launch),
        "source": _cache_key(kernel_launch(tmp_path, factor="3.0")),
        "constexpr": _cache_key(replace(launch, constexprs={"BLOCK": 256})),
        "signature": _cache_key(replace(launch, signature={**launch.signature, "x_ptr": "*fp16"})),
        "integer width": _cache_key(replace(launch, signature={**launch.signature, "n": "i64"})),
        "warps": _cache_key(replace(launch, num_warps=8)),
        "stages": _cache_key(replace(launch, num_stages=2)),
    }
    with monkeypatch.context() as patch:
        patch.setattr(netdsl.compiler.launches, "__version__", "99.0.0")
        keys["netdsl version"] = _cache_key(launch)
    with monkeypatch.context() as patch:
        patch.setattr(triton, "__version__", "99.0.0")
        keys["triton version"] = _cache_key(launch)
    assert len(set(keys.values())) == len(keys), keys
    assert _cache_key(launch) == keys["base"]  # the versions are back


@pytest.mark.parametrize("name", COMPILER_ENVIRONMENT)
def test_key_changes_with_each_compiler_setting_of_the_environment(tmp_path, monkeypatch, name):
    launch = kernel_launch(tmp_path)
    for other in COMPILER_ENVIRONMENT:
        monkeypatch.delenv(other, raising=False)
    unset = _cache_key(launch)
    keys = set()
    for value in ("0", "1", "-O1"):
        monkeypatch.setenv(name, value)
        keys.add(_cache_key(launch))
    assert unset not in keys and len(keys) == 3
    monkeypatch.delenv(name)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # where Triton caches: not what it builds
    assert _cache_key(launch) == unset


def test_every_triton_setting_that_changes_a_build_is_in_the_key():
    """Each environment variable Triton's knobs read for compiling (triton/knobs.py) is in the key or known not to
    change a cubin: a new Triton's new knob fails here until it is sorted."""
    knobs = pytest.importorskip("triton.knobs")
    harmless = {
        "TRITON_KERNEL_DUMP", "TRITON_STORE_BINARY_ONLY", "TRITON_ALWAYS_COMPILE", "TRITON_FRONT_END_DEBUGGING",
        "TRITON_INTERPRET", "NVPTX_ENABLE_DUMP", "TRITON_DUMP_PTXAS_LOG", "TRITON_LIBCUDA_PATH",
        "TRITON_CUOBJDUMP_PATH", "TRITON_NVDISASM_PATH",  # netdsl measures with the wheel's own tools
    }  # fmt: skip
    groups = (knobs.compilation, knobs.language, knobs.nvidia, knobs.runtime)
    read = {descriptor.key for group in groups for descriptor in group.knob_descriptors.values()}
    assert read - harmless - set(COMPILER_ENVIRONMENT) == set()
    assert list(COMPILER_ENVIRONMENT) == sorted(set(COMPILER_ENVIRONMENT))  # one stable order


def test_a_setting_that_changes_the_cubin_gets_its_own_entry(tmp_path, private_cache, monkeypatch):
    """DISABLE_PTXAS_OPT=1 builds another cubin (ptxas -O0): cached under another key, a build without it reads
    what a fresh cache gives, not the unoptimized kernel's registers."""
    launch = kernel_launch(tmp_path, step="k")
    monkeypatch.setenv("DISABLE_PTXAS_OPT", "1")
    unoptimized = sm90_resources([launch])["k"]
    monkeypatch.delenv("DISABLE_PTXAS_OPT")
    optimized = sm90_resources([launch])["k"]
    assert len(list(private_cache.glob("*.json"))) == 2
    assert optimized == sm90_resources([launch], use_cache=False)["k"]
    assert optimized["cubin_sha256"] != unoptimized["cubin_sha256"]


def test_steps_of_one_key_are_built_once(tmp_path, private_cache, monkeypatch):
    """A tower's copies of a step launch the same kernel alike: one build stands for all of them (in the
    order the launches came), each step given its own copy of the report."""
    towers = [kernel_launch(tmp_path, step=f"conv1_gpu{i}") for i in range(2)]
    other = kernel_launch(tmp_path, block=256, step="other")
    real = netdsl.codegen.target.compile_sm90_many
    asked: list[int] = []

    def counting(requests):
        asked.append(len(requests))
        return real(requests)

    monkeypatch.setattr(netdsl.codegen.target, "compile_sm90_many", counting)
    built = sm90_resources([towers[0], other, towers[1]])
    assert asked == [2] and list(built) == ["conv1_gpu0", "other", "conv1_gpu1"]
    assert built["conv1_gpu0"] == built["conv1_gpu1"] and built["conv1_gpu0"] is not built["conv1_gpu1"]
    assert built["conv1_gpu0"]["mma"] is not built["conv1_gpu1"]["mma"]
    assert built["other"]["key"] != built["conv1_gpu0"]["key"] and valid(built["other"])
    again = sm90_resources([towers[1], towers[0]])
    assert list(again) == ["conv1_gpu1", "conv1_gpu0"] and again["conv1_gpu1"] == built["conv1_gpu0"]
    assert asked == [2, 0]  # read from the cache, once


# --- corrupt entries ---------------------------------------------------------------------------------

CORRUPTIONS = {
    "garbage bytes": b"\x00\xff\xfe garbage \x80\x81",
    "truncated JSON": b'{"name": "scale_kernel", "registers": 2',
    "a JSON list": b'["name", "registers", "spill_stores", "spill_loads"]',
    "a dict missing fields": b'{"name": "scale_kernel", "registers": 20, "mma": []}',
    "fields of the wrong type": json.dumps(
        {"name": "scale_kernel", "registers": "20", "spill_stores": 0, "spill_loads": None, "stack_bytes": 0.5,
         "shared_bytes": 0, "local_bytes": 0, "mma": "HGMMA", "cubin_sha256": 7}
    ).encode(),
}


def test_corrupt_entries_are_rebuilt_and_rewritten(tmp_path, private_cache, monkeypatch):
    # One launch per corruption (the block size makes each its own entry), built in one go.
    launches = [kernel_launch(tmp_path, block=32 << i, step=f"k{i}") for i in range(len(CORRUPTIONS))]
    paths = [private_cache / f"{_cache_key(launch)}.json" for launch in launches]
    assert len(set(paths)) == len(paths)
    private_cache.mkdir(parents=True)
    for path, data in zip(paths, CORRUPTIONS.values()):
        path.write_bytes(data)
        assert _read_cache(path) is None
    built = sm90_resources(launches)
    for launch, path, what in zip(launches, paths, CORRUPTIONS):
        assert valid(built[launch.step]), (what, built[launch.step])
        assert json.loads(path.read_text(encoding="utf-8")) == built[launch.step], what  # rewritten
        assert cached_cubin(launch) == path.with_suffix(".cubin")  # the compiled kernel beside it
    assert sorted(p.name for p in private_cache.iterdir()) == entry_files(paths)  # no temporaries

    # Now whole: the next call reads them all and builds nothing.
    def build_nothing(requests):
        assert not requests, [r.kernel for r in requests]
        return []

    monkeypatch.setattr(netdsl.codegen.target, "compile_sm90_many", build_nothing)
    assert sm90_resources(launches) == built


def entry_files(paths: list[Path]) -> list[str]:
    """The files of cache entries: each kernel's report, cubin and PTX."""
    return sorted(path.with_suffix(suffix).name for path in paths for suffix in (".json", ".cubin", ".ptx"))


def test_the_cache_holds_the_compiled_kernel_and_a_broken_one_is_rebuilt(tmp_path, private_cache):
    launch = kernel_launch(tmp_path, step="k")
    assert cached_cubin(launch) is None
    built = sm90_resources([launch])
    cubin = cached_cubin(launch)
    assert cubin is not None and cubin.read_bytes()[:4] == b"\x7fELF"
    assert ".target sm_90" in cubin.with_suffix(".ptx").read_text(encoding="utf-8")
    whole = cubin.read_bytes()
    for damage in (b"", b"\x00\x00\x00\x00 not an ELF", whole[: len(whole) // 2]):  # torn, foreign, truncated ELF
        cubin.write_bytes(damage)
        assert cached_cubin(launch) is None
        assert sm90_resources([launch]) == built  # compiled again, the report the same
        assert cubin.read_bytes()[:4] == b"\x7fELF"
    cubin.unlink()
    assert sm90_resources([launch]) == built and cached_cubin(launch) == cubin


def test_an_edited_report_or_ptx_is_rebuilt(tmp_path, private_cache, monkeypatch):
    """A report edited to other numbers (still valid JSON, the cubin's checksum intact) or a PTX changed beside
    it does not check against the entry's own checksum: built again, not believed."""
    launch = kernel_launch(tmp_path, step="k")
    built = sm90_resources([launch])
    path = private_cache / f"{_cache_key(launch)}.json"
    text = path.read_text(encoding="utf-8")
    edited = json.loads(text)
    edited.update(registers=7, spill_stores=4242)
    path.write_text(json.dumps(edited), encoding="utf-8")
    assert _read_cache(path) is None and cached_cubin(launch) is None
    assert sm90_resources([launch]) == built and path.read_text(encoding="utf-8") == text
    ptx = path.with_suffix(".ptx")
    ptx.write_text(ptx.read_text(encoding="utf-8") + "// edited\n", encoding="utf-8")
    assert cached_cubin(launch) is None
    assert sm90_resources([launch]) == built and cached_cubin(launch) is not None


def test_an_entry_under_another_key_is_not_believed(tmp_path, private_cache):
    """Whole, self-consistent files copied under another launch's key (a cache merged by hand, a rename) are
    not that launch's kernel: the report names the key it was built for, and the other launch is built."""
    small, large = kernel_launch(tmp_path, block=64, step="small"), kernel_launch(tmp_path, block=1024, step="large")
    built = sm90_resources([small])
    source, target = (private_cache / f"{_cache_key(launch)}.json" for launch in (small, large))
    assert built["small"]["key"] == source.stem
    for suffix in (".json", ".cubin", ".ptx"):
        target.with_suffix(suffix).write_bytes(source.with_suffix(suffix).read_bytes())
    assert _read_cache(target) is None and cached_cubin(large) is None
    rebuilt = sm90_resources([large])["large"]
    assert rebuilt["key"] == target.stem and cached_cubin(large) == target.with_suffix(".cubin")
    assert target.with_suffix(".cubin").read_bytes() != source.with_suffix(".cubin").read_bytes()


def _fill_cache(cache: str, kernels: str, barrier, answers) -> None:
    """One of two processes compiling the same launches into one empty cache at the same time."""
    os.environ["NETDSL_CACHE_DIR"] = cache
    launches = [kernel_launch(Path(kernels), block=block, step=f"b{block}") for block in (64, 128)]
    barrier.wait(timeout=120)
    answers.put(sm90_resources(launches))


def test_two_processes_fill_one_cache_at_once(tmp_path, private_cache):
    assert cache_dir() == private_cache and not private_cache.exists()
    context = multiprocessing.get_context("spawn")
    barrier, answers = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_fill_cache, args=(str(private_cache.parent), str(tmp_path / f"k{i}"), barrier, answers))
        for i in range(2)
    ]
    for worker in workers:
        worker.start()
    results = [answers.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert results[0] == results[1] and set(results[0]) == {"b64", "b128"}
    entries = sorted(private_cache.glob("*.json"))
    assert len(entries) == 2
    assert sorted(p.name for p in private_cache.iterdir()) == entry_files(entries)  # no temporary files left
    for path in entries:
        entry = _read_cache(path)
        assert valid(entry) and entry in results[0].values()
        assert path.with_suffix(".cubin").read_bytes()[:4] == b"\x7fELF"


# --- the report's sm_90 section ----------------------------------------------------------------------

SM90_HEADER = ("kernel", "warps", "registers", "spill st/ld B", "stack B", "shared B", "tensor-core instructions")


def sm90_section(report: str) -> list[str]:
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("sm_90 build ("))
    return lines[start + 1 :]


def test_report_has_one_sm90_row_per_kernel_file(tmp_path):
    out = write_build(compile_net(ROOT / "nets/lenet5.net", Options()), tmp_path / "lenet5", Options(), sm90=True)
    report = (out / "report.txt").read_text(encoding="utf-8")
    header, rule, *rows, summary = sm90_section(report)
    assert header.split() == " ".join(SM90_HEADER).split()
    assert set(rule) == {"-", " "}
    files = sorted(path.stem for path in (out / "kernels").glob("*.py"))
    assert len(files) == 7 and len(rows) == len(files)
    names, spilled = [], []
    mma = {*TENSOR_CORE_INSTRUCTIONS["ptx"], *TENSOR_CORE_INSTRUCTIONS["sass"]}
    for row in rows:
        name, warps, registers, spills, stack, shared, instructions = row.split()
        names.append(name)
        assert int(warps) in (1, 2, 4, 8, 16)
        assert 0 < int(registers) <= SM90_MAX_REGISTERS
        stores, loads = map(int, spills.split("/"))
        assert int(stack) >= 0 and 0 <= int(shared) <= SM90_MAX_SHARED_BYTES
        assert instructions == "-" or set(instructions.split(",")) <= mma
        if stores + loads:
            spilled.append(name)
    assert sorted(names) == files
    assert summary == f"kernels that spill: {', '.join(spilled) if spilled else 'none'}"
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    warps = {e["step"]: e["num_warps"] for d in plan["devices"].values() for e in d["launches"] if "kernel" in e}
    assert {row.split()[0]: int(row.split()[1]) for row in rows} == warps


def test_report_without_sm90_has_no_section(tmp_path):
    out = write_build(compile_net(ROOT / "nets/lenet5.net", Options()), tmp_path / "lenet5", Options())
    assert "sm_90 build" not in (out / "report.txt").read_text(encoding="utf-8")


def test_spill_line_names_the_kernels_that_spill(tmp_path):
    launches = [kernel_launch(tmp_path, step=step) for step in ("quiet", "loud", "stacked")]
    resources = {
        "quiet": {"registers": 40, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0, "shared_bytes": 0},
        "loud": {"registers": 255, "spill_stores": 64, "spill_loads": 0, "stack_bytes": 64, "shared_bytes": 0},
        "stacked": {"registers": 255, "spill_stores": 0, "spill_loads": 8, "stack_bytes": 8, "shared_bytes": 512},
    }
    for entry in resources.values():
        entry["mma"] = []
    lines = sm90_report(resources, launches).splitlines()
    assert lines[-1] == "kernels that spill: loud, stacked"
    assert lines[-3].split() == ["loud", "4", "255", "64/0", "64", "0", "-"]
    assert sm90_report({"quiet": resources["quiet"]}, launches[:1]).splitlines()[-1] == "kernels that spill: none"
