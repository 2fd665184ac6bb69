"""Thread counts picked by the size of the work, so small products do not pay for a thread team.

torch runs every operation on all its intra-op threads. For the r x r and k-wide products of a
correction that costs more than it saves, and on a loaded machine (other processes on the other
cores) each parallel region waits for descheduled threads (docs/performance.md has the figures).
So ``correct`` runs on one thread and asks for more only around work big enough to use them (a
randomized SVD, a product with ``V``).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

# Below this many floating-point operations a product runs on one thread: milliseconds of one core,
# far above a thread team's start-up cost, so a second thread can only help above it.
PARALLEL_MIN_FLOPS = 1e8

T = TypeVar("T")
R = TypeVar("R")

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


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, threads_each: int) -> Iterator[R]:
    """``fn`` over ``items`` on ``workers`` threads, each on ``threads_each`` intra-op threads, in order.

    For work made of independent pieces too narrow to keep a thread team busy (a subspace sketch's
    32-column products): two pieces on one thread each beat one piece on two threads, which spend
    their time waiting for each other at every small product. At most ``workers`` pieces run and one
    waits, so memory holds ``workers`` pieces' worth, not all of them. An error in a piece is raised
    here, and the pieces not yet started are cancelled.
    """
    caller = torch.get_num_threads()  # what the caller runs on, and what threads started later get

    def run(item: T) -> R:
        # torch keeps the intra-op thread count per thread, set from the process-wide default at the
        # thread's first parallel op: asking for it first makes that happen now, so the count set
        # next holds even if the other worker resets the default before this one's first product
        torch.get_num_threads()
        torch.set_num_threads(threads_each)
        try:
            return fn(item)
        finally:
            torch.set_num_threads(caller)  # the process-wide default as the caller left it

    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for item in items:
                pending.append(pool.submit(run, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
