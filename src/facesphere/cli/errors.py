"""Turn the toolkit's expected errors into one clear line on stderr and exit code 2, not a traceback.

An expected error is one a user's input can cause: a refused file, value or path (the types below). Anything
else is a bug and keeps its traceback (exit 1). The line is printed plainly (``error: ...``), never through a
wrapping log renderer, so a long path stays on one line.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from typing import Iterator

import typer
from pydantic import ValidationError

from facesphere.models.runs import CheckpointError
from facesphere.train.config import ConfigError

try:  # typer >= 0.24 ships its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on the click package
    from click.exceptions import ClickException, NoArgsIsHelpError

logger = logging.getLogger("facesphere")

REFUSED = 2  # exit code of a refused input or usage
INTERRUPTED = 130  # exit code after Ctrl-C (128 + SIGINT), as shells report it

# OSError subclasses that a user's path causes (missing, a folder for a file, no permission); other OSErrors
# (disk full, I/O errors) are not refusals of an input and keep their traceback.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
EXPECTED_ERRORS = (ConfigError, CheckpointError, *PATH_ERRORS, ValueError, KeyError, FloatingPointError,
                   pickle.UnpicklingError)  # ValueError covers UnicodeDecodeError of a text input


def describe(error: BaseException) -> str:
    """The one-line message of an expected error. A pydantic validation error is described without the values
    it was given: settings such as API keys are secrets, and its default text echoes them."""
    if isinstance(error, ValidationError):
        text = "; ".join(f"{'.'.join(str(part) for part in e['loc']) or 'value'}: {e['msg']}"
                         for e in error.errors(include_input=False, include_url=False))
    elif isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"  # "[Errno 21] Is a directory: 'x'" reads worse
    elif isinstance(error, (ClickException, typer.TyperException)):
        text = error.format_message()
    else:
        text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    return " ".join(text.split()) or type(error).__name__  # one line, whatever the message held


def refuse(message: str) -> None:
    """Print the one-line refusal on stderr."""
    typer.echo(f"error: {message}", err=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Expected errors raised in the block: one line on stderr, exit code 2."""
    try:
        yield
    except EXPECTED_ERRORS as error:
        if not isinstance(error, ValidationError):  # its traceback text would echo the rejected values
            logger.debug("details", exc_info=True)
        refuse(describe(error))
        raise typer.Exit(code=REFUSED) from None


def run_app(app: typer.Typer, args: list[str] | None = None, prog_name: str = "facesphere") -> int:
    """Run the command line and return its exit code: usage errors and expected errors as one line (2), Ctrl-C as
    one line (130), ``typer.Exit(code)`` as its code; any other exception propagates (a bug: its traceback)."""
    try:
        with user_errors():
            code = app(args=args, prog_name=prog_name, standalone_mode=False)
    except typer.Exit as done:
        return done.exit_code
    except NoArgsIsHelpError as error:  # a bare group: its help (exit 2, as click reports a missing command)
        typer.echo(error.ctx.get_help())
        return REFUSED
    except (ClickException, typer.TyperException) as error:  # usage errors, bad option values, missing paths
        refuse(describe(error))
        return REFUSED
    except typer.Abort:  # end of input at a prompt
        refuse("aborted")
        return 1
    code = code if isinstance(code, int) else 0
    if code == INTERRUPTED:  # typer turns Ctrl-C into exit code 130, silently
        refuse("interrupted")
    return code
