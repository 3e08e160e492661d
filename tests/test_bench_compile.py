"""bench/compile.py runs between GPU leases: `--smoke` prints both tables, every net in nets/ in the
first; its compile time includes the launch recording; each roofline row is fused at its own batch and
dtype. No timing is judged."""

import importlib.util
import re
from pathlib import Path

from netdsl import graph_from_text
from netdsl.compiler.compile import compile_net
from netdsl.compiler.passes import Options

ROOT = Path(__file__).resolve().parent.parent
NETS = sorted((ROOT / "nets").glob("*.net"))


def bench():
    spec = importlib.util.spec_from_file_location("bench_compile", ROOT / "bench" / "compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(out: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the rows (split on runs of two or more spaces) of the table whose header
    line starts with `header_start`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return re.split(r"\s{2,}", lines[start].strip()), rows


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_smoke_prints_both_tables_with_every_net(capsys):
    assert bench().main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# python bench/compile.py --smoke\n")
    assert "launch recording" in out and "No Triton JIT, no sm_90 build" in out
    header, rows = table(out, "net ")
    assert header == ["net", "layers", "kernels", "compile ms", "launch recording ms", "total ms", "us / layer"]
    assert [row[0] for row in rows] == [path.stem for path in NETS]  # every net, no generated ones
    for path, row in zip(NETS, rows):
        layers, kernels, compile_ms, record_ms, total_ms, _ = map(number, row[1:])
        assert layers == graph_from_text(path.read_text(), str(path)).number_of_nodes()
        assert kernels == len(compile_net(path, Options()).kernels)
        assert compile_ms > 0 and record_ms > 0
        assert abs(total_ms - compile_ms - record_ms) <= 0.15  # printed to 0.1 ms
    header, rows = table(out, "batch ")
    assert header[:3] == ["batch", "dtype", "kernels"] and "bytes saved" in header
    assert [(row[0], row[1]) for row in rows] == [("1", "fp32"), ("1", "bf16"), ("128", "fp32"), ("128", "bf16")]
    assert all(number(row[2]) < number(row[3]) for row in rows)  # fused kernels < unfused


def test_compile_time_includes_the_launch_recording(monkeypatch):
    module = bench()
    recorded = []

    def record(files, batch, dtype):
        recorded.append((len(files), batch, dtype))
        return []

    monkeypatch.setattr(module, "record_launches", record)
    _, _, kernels = module.time_compile(ROOT / "nets/lenet5.net", 2, Options(batch=4, dtype="bf16"))
    assert recorded == [(kernels, 4, "bf16")] * 2


def test_each_roofline_row_is_fused_at_its_batch_and_dtype():
    """At batch 128 in TF32 the cost model makes conv1 + ReLU + LRN + max-pool one kernel in each tower
    (tests/test_compile.py), so that row has two kernels fewer than batch 1 in fp32."""
    _, rows = table("\n".join(bench().roofline_table(((1, "fp32"), (128, "tf32")))), "batch ")
    assert [(row[1], number(row[2])) for row in rows] == [("fp32", 22), ("tf32", 20)]
