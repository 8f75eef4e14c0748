"""Side by side: ``labkit grade -j N`` and ``--gpus 0,1`` share out submissions to workers.

``side_by_side(fn, items, jobs, gpus)`` calls ``fn(item, env)`` for every item, in threads (each
call starts and waits on its own processes: a kernel and a trusted interpreter in sandboxes),
and returns the results in the order of ``items``. Without GPUs, ``jobs`` calls run at once with
``env = {}``; with GPUs, one call per GPU at a time, its ``env`` naming that GPU in
``CUDA_VISIBLE_DEVICES`` (``jobs`` is then the number of GPUs). Timings of calls that ran side
by side share the host's CPUs.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def side_by_side(fn: Callable[[T, dict], R], items: Sequence[T], jobs: int = 1,
                 gpus: Sequence[str] = ()) -> list[R]:
    """``[fn(item, env) for item in items]``, ``jobs`` at a time or one per GPU (module doc)."""
    slots = [{"CUDA_VISIBLE_DEVICES": g} for g in gpus] or [{} for _ in range(max(1, jobs))]
    if len(slots) == 1 or len(items) < 2:
        return [fn(item, dict(slots[0])) for item in items]
    free: queue.SimpleQueue = queue.SimpleQueue()  # slots no call is using
    for slot in slots:
        free.put(slot)

    def in_a_free_slot(item: T) -> R:
        slot = free.get()
        try:
            return fn(item, dict(slot))
        finally:
            free.put(slot)

    with ThreadPoolExecutor(len(slots), thread_name_prefix="grade") as pool:
        return list(pool.map(in_a_free_slot, items))
