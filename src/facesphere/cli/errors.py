"""Turn the toolkit's expected errors into one clear line and exit code 2, not a traceback."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import typer

from facesphere.models.runs import CheckpointError
from facesphere.train.config import ConfigError

logger = logging.getLogger("facesphere")

EXPECTED_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError, KeyError,
                   FloatingPointError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except EXPECTED_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        logger.debug("details", exc_info=True)
        logger.error("%s", message)
        raise typer.Exit(code=2) from None
