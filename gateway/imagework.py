"""CPU-heavy image work (decoding, drawing, encoding) off the event loop.

A few dedicated threads (``engine.image_workers``) at a lower scheduling priority
(``engine.image_nice``): Pillow releases the GIL while it works, so these threads compete with
the API for CPU, not for the GIL. At a lower priority, when the machine is busy the event loop
(and the clients it serves) get the CPU first and the engine's image work takes what is left;
when it is idle the image work runs at full speed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _lower_priority(nice: int) -> None:
    if nice <= 0:
        return
    try:  # Linux: a thread's own nice value (PRIO_PROCESS with a thread id)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):  # elsewhere the threads run at normal priority
        pass


class ImageWorkers:
    def __init__(self, workers: int, *, nice: int = 10) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-work",
                                        initializer=_lower_priority, initargs=(nice,))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on an image thread; waits (without blocking the loop) for a free one."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
