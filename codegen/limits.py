"""What the kernels can hold and the GPU they are tuned for, as plain numbers: the compiler's legality
checks and cost model read them without importing Triton or torch."""

MAX_WINDOW_TAPS = 128  # the training max-pools save the winner's offset in its window, 0 .. 127, as int8
MAX_CHANNELS_PER_GROUP = 128  # conv_lrn_pool keeps every output channel of a conv group in one tile
MAX_NCHW_FILTER_TAPS = 31  # conv.py and conv_lrn_pool.py mark a pixel's valid taps in one int32: KH + KW bits
SM_COUNT = 132  # an H100 SXM; the tile pickers only use it to tell when a tile is too big to fill the GPU
MAX_SHARED_BYTES = 227 * 1024  # per block on an H100 / H200, dynamic shared memory included


def fits_shared_memory(rows: int, cols: int, depth: int, stages: int, element_bytes: int) -> bool:
    """Whether a pipelined matrix product's operand tiles, `stages` copies of a rows x depth and a depth x cols tile,
    fit in one block's shared memory (what Triton's software pipelining keeps there, before its own few bytes)."""
    return stages * (rows + cols) * depth * element_bytes <= MAX_SHARED_BYTES


def tile_fits(tile: dict[str, int], element_bytes: int) -> bool:
    """Whether a BLOCK_M x BLOCK_N tile's pipelined operands (K blocks of BLOCK_K, num_stages deep) fit."""
    return fits_shared_memory(tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"], tile["num_stages"], element_bytes)
