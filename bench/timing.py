"""What the GPU sweeps share: the device they run on, and the timer: Triton's do_bench (median ms) on a
GPU, one wall-clock run under the interpreter (`--smoke`, where the number means nothing but the code
path runs)."""

import time

import torch


def announce_device(smoke: bool) -> str | None:
    """ "cpu" for --smoke; "cuda" (named on stdout) where there is a GPU; else None, having said why."""
    if smoke:
        return "cpu"
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to time (run this on a machine with one, or --smoke)")
        return None
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    return "cuda"


def timer(smoke: bool):
    if smoke:

        def wall(fn) -> float:
            began = time.perf_counter()
            fn()
            return (time.perf_counter() - began) * 1e3

        return wall
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
