"""Thread counts picked by the size of the work, so small products do not pay for a thread team.

torch runs every operation on all its intra-op threads. For the r x r and k-wide products of a
correction that costs more than it saves, and on a loaded machine (other processes on the other
cores) each parallel region waits for descheduled threads: ``correct`` on a real 135M adapter took
9-18 s with the default threads against 2.6-2.8 s on one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Below this many floating-point operations a product runs on one thread: about 10 ms of one core,
# far above a thread team's start-up cost, so a second thread can only help above it.
PARALLEL_MIN_FLOPS = 1e8


def threads_for(flops: float) -> int:
    """1 for small work, else torch's current intra-op thread count."""
    return 1 if flops < PARALLEL_MIN_FLOPS else torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` intra-op threads, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    if count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def correction_flops(m: int, n: int, rank: int, k: int, with_delta: bool) -> float:
    """Rough cost of correcting one ``m x n`` rank-``rank`` update: k-wide projections, r x r algebra,
    and, when the method reads the full alignment matrix, products with that ``m x n`` matrix."""
    flops = 4.0 * (m + n) * rank * (k + rank)
    if with_delta:
        flops += 4.0 * m * n * rank
    return flops
