"""`report.txt`: per kernel its FLOPs, fewest bytes, arithmetic intensity and roofline time on an H100,
with totals for the fused plan and for an unfused plan (one kernel per layer), and the memory plan."""

from __future__ import annotations

import networkx as nx

from netdsl.compiler.cost import Cost, fused_costs, stage_floors, unfused_costs
from netdsl.ir.dtypes import DTYPE_BYTES
from netdsl.tables import format_bytes, format_table


def _row(cost: Cost) -> tuple[str, ...]:
    return (
        cost.name,
        cost.kind,
        cost.device,
        f"{cost.flops / 1e6:,.1f}",
        f"{cost.bytes / 1e6:,.3f}",
        f"{cost.intensity:,.1f}" if cost.bytes else "",
        f"{cost.seconds * 1e6:,.2f}",
        cost.bound,
    )


def _sum(costs: list[Cost]) -> tuple[float, float, float]:
    """FLOPs, bytes and floor time of the kernels (transfers are reported apart)."""
    chosen = [c for c in costs if c.kind != "transfer"]
    return sum(c.flops for c in chosen), sum(c.bytes for c in chosen), sum(c.seconds for c in chosen)


def cost_report(program: nx.DiGraph, layer_graph: nx.DiGraph, batch: int, dtype: str) -> str:
    fused = [c for c in fused_costs(program, batch, dtype) if c.kind not in ("input", "view")]
    unfused = unfused_costs(layer_graph, batch, dtype)
    header = ("kernel", "kind", "device", "MFLOP", "MB moved", "FLOP/B", "floor us", "bound")
    lines = [
        f"net {program.graph['name']}: batch {batch}, {dtype}; roofline floors on one H100 SXM "
        "(FP32 67, TF32 495, BF16/FP16 990 TFLOP/s dense; HBM 3.35 TB/s; NVLink 450 GB/s a direction)",
        "",
        *format_table(header, [_row(c) for c in fused], left={0, 1, 2, 7}),
        "",
    ]
    f_flops, f_bytes, f_time = _sum(fused)
    u_flops, u_bytes, u_time = _sum(unfused)
    kernels = sum(1 for c in fused if c.kind != "transfer")
    transfers = [c for c in fused if c.kind == "transfer"]
    summary = [
        ("fused", str(kernels), f"{f_flops / 1e9:,.3f}", f"{f_bytes / 1e6:,.1f}", f"{f_time * 1e6:,.1f}"),
        (
            "unfused (one kernel per layer)",
            str(len(unfused)),
            f"{u_flops / 1e9:,.3f}",
            f"{u_bytes / 1e6:,.1f}",
            f"{u_time * 1e6:,.1f}",
        ),
    ]
    lines += format_table(("plan", "kernels", "GFLOP", "MB moved", "floor us (sum)"), summary, left={0})
    if u_bytes:
        lines.append(
            f"fusion saves {100 * (1 - f_bytes / u_bytes):.1f}% of the bytes and "
            f"{100 * (1 - f_time / u_time):.1f}% of the roofline time"
        )
    if transfers:
        lines.append(
            f"transfers between devices: {len(transfers)}, {sum(c.bytes for c in transfers) / 1e6:,.3f} MB, "
            f"{sum(c.seconds for c in transfers) * 1e6:,.1f} us over NVLink"
        )
    if "merge_towers" in program.graph:  # netdsl.compiler.merge_towers ran (--merge-towers)
        lines.append(f"towers: {program.graph['merge_towers']}")
    lines += _explored(program, batch, dtype)
    lines += ["", "memory plan (activations, with buffer reuse vs one buffer per step):"]
    width = DTYPE_BYTES[dtype] * batch
    for device, elements in program.graph["arena"].items():
        naive = program.graph["arena_without_reuse"][device]
        lines.append(f"  {device}: peak {format_bytes(elements * width)}, without reuse {format_bytes(naive * width)}")
    return "\n".join(lines) + "\n"


def _explored(program: nx.DiGraph, batch: int, dtype: str) -> list[str]:
    """The cost model's verdict on each conv + ReLU + LRN + max-pool stage: one kernel or two."""
    lines = []
    for name in program.nodes:
        step = program.nodes[name]["step"]
        if step.kind == "conv_lrn_maxpool":
            stage, verdict = step.layers, "one kernel"
        elif step.kind == "lrn_maxpool" and len(step.inputs) == 1:
            conv = program.nodes[step.inputs[0]]["step"]
            stage = conv.layers + step.layers
            if [item.op for item in stage] != ["conv", "relu", "lrn", "maxpool"]:
                continue
            verdict = "two kernels"
        else:
            continue
        apart, together = stage_floors(stage, batch, dtype)
        lines.append(
            f"  {stage[0].name}: two kernels {apart * 1e6:,.2f} us, one kernel {together * 1e6:,.2f} us -> {verdict}"
        )
    if not lines:
        return []
    return [
        "",
        "conv + ReLU + LRN + max-pool stages: one kernel saves writing and reading the conv's output but",
        "recomputes conv and LRN where pooling windows overlap; the roofline floors decide:",
        *lines,
    ]
