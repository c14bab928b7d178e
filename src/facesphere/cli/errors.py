"""Turn the toolkit's expected errors into one clear line and exit code 2, not a traceback."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import typer
from pydantic import ValidationError

from facesphere.models.runs import CheckpointError
from facesphere.train.config import ConfigError

logger = logging.getLogger("facesphere")

EXPECTED_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError, KeyError,
                   FloatingPointError)


def describe(error: BaseException) -> str:
    """The one-line message of an expected error. A pydantic validation error is described without the values
    it was given: settings such as API keys are secrets, and its default text echoes them."""
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(str(part) for part in e['loc']) or 'value'}: {e['msg']}"
                         for e in error.errors(include_input=False, include_url=False))
    return str(error.args[0] if isinstance(error, KeyError) and error.args else error)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except EXPECTED_ERRORS as error:
        if not isinstance(error, ValidationError):  # its traceback text would echo the rejected values
            logger.debug("details", exc_info=True)
        logger.error("%s", describe(error))
        raise typer.Exit(code=2) from None
