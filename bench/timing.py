"""What the GPU sweeps share: the device they run on, and the timer: Triton's do_bench (median ms) on a
GPU, one wall-clock run under the interpreter (`--smoke`, where the number means nothing but the code
path runs). Every GPU benchmark without a GPU (and without `--smoke`) says so in one line on stderr and
exits with NO_GPU, so bench/gpu_session.sh and CI see that nothing was timed."""

import sys
import time

import torch

# The exit status of a GPU benchmark run where there is no GPU: not 0 (nothing was timed), not 1 (a failure,
# a traceback) and not 2 (argparse's bad flag).
NO_GPU = 4


def no_gpu(hint: str = "run this on a machine with one") -> int:
    """Says there is no GPU, so nothing was timed, and returns NO_GPU for main() to exit with."""
    print(f"no CUDA GPU here: nothing to time ({hint})", file=sys.stderr, flush=True)
    return NO_GPU


def announce_device(smoke: bool) -> str | None:
    """ "cpu" for --smoke; "cuda" (named on stdout) where there is a GPU; else None, having said why (no_gpu):
    the caller then returns NO_GPU."""
    if smoke:
        return "cpu"
    if not torch.cuda.is_available():
        no_gpu("run this on a machine with one, or --smoke")
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
