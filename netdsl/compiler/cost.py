"""The roofline cost model: FLOPs, the fewest bytes a kernel must move, and its time floor on an H100.

A kernel's floor is max(FLOPs / peak, bytes / bandwidth): it cannot be faster than its arithmetic on
the units it uses, nor than reading its inputs and weights once and writing its output once. Convs
and fcs run on tensor cores (TF32, BF16, FP16) or on CUDA cores (plain FP32); everything else on CUDA
cores. Peaks are the H100 SXM's dense figures from `shared/REFERENCES.md`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from netdsl.compiler.steps import Step
from netdsl.ir import Layer, layers
from netdsl.ir.dtypes import DTYPE_BYTES
from netdsl.ir.stats import layer_stats

HBM_BYTES_PER_S = 3.35e12
NVLINK_BYTES_PER_S = 450e9  # one direction of the H100 SXM's NVLink
CUDA_CORE_FLOPS = 67e12
TENSOR_CORE_FLOPS = {"fp32": 67e12, "tf32": 495e12, "bf16": 990e12, "fp16": 990e12}
MATMUL_KINDS = {"conv", "fc", "conv_lrn_maxpool"}


@dataclass(frozen=True)
class Cost:
    name: str
    kind: str
    device: str
    flops: float
    bytes: float
    seconds: float  # the roofline floor
    bound: str  # what sets the floor: compute, memory, or the link between devices

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else 0.0


def _layer_flops(item: Layer) -> float:
    """Arithmetic of one layer per image (a multiply-accumulate is two FLOPs)."""
    stats = layer_stats(item)
    out = math.prod(item.shape)
    if item.op in MATMUL_KINDS:
        return 2.0 * stats.macs + (out if item.params.get("bias") else 0)
    if item.op == "lrn":
        return out * (2.0 * item.params["size"] + 6)  # squares and sums over the window, pow, divide
    if item.op in ("maxpool", "avgpool"):
        return out * math.prod(item.params["size"])
    if item.op == "global_avgpool":
        return math.prod(item.input_shape)
    if item.op == "softmax":
        return 5.0 * out
    if item.op in ("relu", "leaky_relu", "add", "batchnorm"):
        return 2.0 * out * max(1, len(item.inputs))
    return 0.0


def _weight_elements(item: Layer) -> int:
    stats = layer_stats(item)
    return stats.params + stats.buffers


def peak_flops(kind: str, dtype: str) -> float:
    """The dense peak of the units a kernel of this kind runs on."""
    return TENSOR_CORE_FLOPS[dtype] if kind in MATMUL_KINDS else CUDA_CORE_FLOPS


def _cost(name: str, kind: str, device: str, flops: float, elements: float, dtype: str) -> Cost:
    nbytes = elements * DTYPE_BYTES[dtype]
    if kind == "transfer":
        return Cost(name, kind, device, 0.0, nbytes, nbytes / NVLINK_BYTES_PER_S, "link")
    compute, memory = flops / peak_flops(kind, dtype), nbytes / HBM_BYTES_PER_S
    return Cost(name, kind, device, flops, nbytes, max(compute, memory), "compute" if compute > memory else "memory")


def step_cost(program: nx.DiGraph, step: Step, batch: int, dtype: str) -> Cost:
    """A fused step reads its inputs and weights once and writes only its last layer's output."""
    if step.kind in ("input", "view"):
        return Cost(step.name, step.kind, step.device, 0.0, 0.0, 0.0, "none")
    read = sum(math.prod(program.nodes[name]["step"].shape) for name in step.inputs) * batch
    written = math.prod(step.shape) * batch
    if step.kind == "transfer":
        return _cost(step.name, step.kind, step.device, 0.0, written, dtype)
    if step.kind == "space_to_depth":  # a copy that rearranges a conv's input: no arithmetic
        return _cost(step.name, step.kind, step.device, 0.0, read + written, dtype)
    flops = sum(_layer_flops(item) for item in step.layers) * batch
    if step.kind == "conv_lrn_maxpool":  # conv, ReLU and LRN are recomputed where pooling windows overlap
        flops += sum(_layer_flops(item) for item in step.layers[:-1]) * batch * (_overlap(step.layers[-1]) - 1)
    if step.kind == "lrn_maxpool":  # LRN is recomputed where pooling windows overlap
        pool = step.layers[-1]
        overlap = math.prod(pool.params["size"]) / math.prod(pool.params["stride"])
        flops += _layer_flops(step.layers[-2]) * batch * max(0.0, overlap - 1)
    weights = sum(_weight_elements(item) for item in step.layers)
    return _cost(step.name, step.kind, step.device, flops, read + written + weights, dtype)


def fused_costs(program: nx.DiGraph, batch: int, dtype: str) -> list[Cost]:
    order = [name for names in program.graph["partitions"].values() for name in names]
    return [step_cost(program, program.nodes[name]["step"], batch, dtype) for name in order]


def unfused_costs(graph: nx.DiGraph, batch: int, dtype: str) -> list[Cost]:
    """One kernel per layer of the shaped graph (dropout and flatten, which compute nothing, excepted)."""
    costs = []
    for item in layers(graph):
        if item.op in ("input", "dropout", "flatten"):
            continue
        read = sum(math.prod(graph.nodes[name]["layer"].shape) for name in item.inputs) * batch
        written = math.prod(item.shape) * batch
        elements = read + written + _weight_elements(item)
        costs.append(_cost(item.name, item.op, item.device, _layer_flops(item) * batch, elements, dtype))
    return costs


def _overlap(pool: Layer) -> float:
    """How many pooling windows cover an input pixel on average: the recompute factor of fusing
    what comes before the pool into it."""
    return max(1.0, math.prod(pool.params["size"]) / math.prod(pool.params["stride"]))


def stage_fusion_wins(stage: list[Layer], batch: int, dtype: str) -> bool:
    """Whether conv + ReLU + LRN + max-pool as one kernel beats the conv kernel then the LRN + max-pool one."""
    apart, together = stage_floors(stage, batch, dtype)
    return together < apart


def stage_floors(stage: list[Layer], batch: int, dtype: str) -> tuple[float, float]:
    """Roofline floors (s) of conv + ReLU + LRN + max-pool as two kernels and as one. The one kernel
    never writes the conv's output but recomputes conv, ReLU and LRN where pooling windows overlap
    (2.25x for 3x3 stride 2); matmul and CUDA-core work are counted one after the other."""
    conv, relu, norm, pool = stage
    width = DTYPE_BYTES[dtype]
    conv_in = math.prod(conv.input_shape) * batch
    conv_out = math.prod(conv.shape) * batch
    pooled = math.prod(pool.shape) * batch
    weights = _weight_elements(conv)
    conv_flops, relu_flops = _layer_flops(conv) * batch, _layer_flops(relu) * batch
    norm_flops, pool_flops = _layer_flops(norm) * batch, _layer_flops(pool) * batch
    overlap = _overlap(pool)

    def floor(matmul: float, other: float, elements: float) -> float:
        compute = matmul / peak_flops("conv", dtype) + other / CUDA_CORE_FLOPS
        return max(compute, elements * width / HBM_BYTES_PER_S)

    apart = floor(conv_flops, relu_flops, conv_in + weights + conv_out) + floor(
        0.0, norm_flops * overlap + pool_flops, conv_out + pooled
    )
    together = floor(conv_flops * overlap, (relu_flops + norm_flops) * overlap + pool_flops, conv_in + weights + pooled)
    return apart, together
