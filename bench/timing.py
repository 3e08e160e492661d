"""The timer the GPU sweeps share: Triton's do_bench (median ms) on a GPU, one wall-clock run under the
interpreter (`--smoke`, where the number means nothing but the code path runs)."""

import time


def timer(smoke: bool):
    if smoke:

        def wall(fn) -> float:
            began = time.perf_counter()
            fn()
            return (time.perf_counter() - began) * 1e3

        return wall
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
