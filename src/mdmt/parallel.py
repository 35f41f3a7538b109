"""Work over many items in order, in this process or in a pool of processes (the twin's images, the caches)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_CHUNK = 32
"""Items a process takes at a time, at most (fewer for short lists: about 4 chunks per process)."""


def ordered_map(work: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``work(item)`` for each item, in order: here when ``workers`` <= 0, else in that many processes.

    Closing the iterator early (an error in the caller) cancels the chunks no process has started.
    """
    if workers <= 0:
        yield from map(work, items)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        try:
            yield from pool.map(work, items, chunksize=max(1, min(MAX_CHUNK, len(items) // (4 * workers))))
        finally:
            pool.shutdown(cancel_futures=True)
