"""One dedicated thread for every network and index call of a service.

PyTorch's OpenMP thread team belongs to the thread that starts a parallel region. Measured here
(2 cores): once the main thread had run one parallel op, MobileFaceNet on another thread took 64 ms
instead of 20 ms, and a web server's thread pool hands each request to whichever worker is free. So
the service loads its models on this thread and runs all inference and faiss work on it; calls
queue in order, which also serialises the networks (each call already uses every core).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ModelThread:
    """``run(fn, *args)`` executes ``fn`` on the one model thread and returns its result (or raises its error)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facesphere-models")

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return self._executor.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


__all__ = ["ModelThread"]
