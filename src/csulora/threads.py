"""Thread counts picked by the size of the work, so small products do not pay for a thread team.

torch runs every operation on all its intra-op threads. For the r x r and k-wide products of a
correction that costs more than it saves, and on a loaded machine (other processes on the other
cores) each parallel region waits for descheduled threads: ``correct`` on a real 135M adapter took
9-18 s with the default threads against 2.6-2.8 s on one. So ``correct`` runs on one thread and
asks for more only around work big enough to use them (a randomized SVD, a product with ``V``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Below this many floating-point operations a product runs on one thread: about 10 ms of one core,
# far above a thread team's start-up cost, so a second thread can only help above it.
PARALLEL_MIN_FLOPS = 1e8

_outer_counts: list[int] = []  # the thread count in force before each active ``torch_threads`` block


def available_threads() -> int:
    """The intra-op thread count outside every ``torch_threads`` block (torch's own setting)."""
    return _outer_counts[0] if _outer_counts else torch.get_num_threads()


def threads_for(flops: float) -> int:
    """1 for small work, else every available thread."""
    return 1 if flops < PARALLEL_MIN_FLOPS else available_threads()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` intra-op threads, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    _outer_counts.append(previous)
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        _outer_counts.pop()
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def correction_flops(m: int, n: int, rank: int, k: int, with_delta: bool) -> float:
    """Rough cost of correcting one ``m x n`` rank-``rank`` update: k-wide projections, r x r algebra,
    and, when the method reads the full alignment matrix, products with that ``m x n`` matrix."""
    flops = 4.0 * (m + n) * rank * (k + rank)
    if with_delta:
        flops += 4.0 * m * n * rank
    return flops


def sketch_flops(m: int, n: int, width: int, power_iters: int) -> float:
    """Cost of a randomized SVD's products with the ``m x n`` matrix at sketch ``width``."""
    return 2.0 * m * n * width * (2 * power_iters + 2)
