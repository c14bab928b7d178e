"""One progress display for long loops: a rich bar on a terminal, a log line every 10 s otherwise."""

from __future__ import annotations

import contextlib
import logging
import time

logger = logging.getLogger("facesphere")

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int | None, description: str):
    """Yield an ``advance()`` callable: a rich bar on a terminal, a log line every 10 s otherwise."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if console.is_terminal:
        with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda: bar.advance(task)
        return
    state = {"done": 0, "last": time.perf_counter()}

    def advance() -> None:
        state["done"] += 1
        if time.perf_counter() - state["last"] > 10 or state["done"] == total:
            state["last"] = time.perf_counter()
            logger.info("%s: %d/%s", description, state["done"], "?" if total is None else total)

    yield advance
