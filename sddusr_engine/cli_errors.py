"""The command line's error boundary: an exception becomes one red sentence on stderr and the
exit code the docs promise (`SddusrError.exit_code`; 1 for files and memory; 3 for a bug, with
the advice to rerun with `--debug`)."""

from __future__ import annotations

import functools
import os

import typer
from rich.text import Text

from .console import err


def _fail(message: str, code: int = 1) -> None:
    err.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


def _user_message(e: BaseException) -> tuple[str, int] | None:
    """(sentence, exit code) for an error a user can act on; None for a bug."""
    import torch

    from sddusr_engine.errors import FootprintNotFoundError, SddusrError

    if isinstance(e, SddusrError):
        msg = str(e).strip() or type(e).__name__
        if isinstance(e, FootprintNotFoundError):
            msg = msg.rstrip(".") + "; pass --no-reference-ok to enlarge the wide photo without it."
        return msg, e.exit_code
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return (
            "out of GPU memory; try a smaller --tile (e.g. --tile 128), --precision fp16, "
            "or --device cpu.",
            1,
        )
    if isinstance(e, OSError):  # FileNotFoundError, PermissionError, ...
        msg = str(e).strip() or type(e).__name__
        if e.filename and str(e.filename) not in msg:
            msg = f"{msg} ({e.filename})"
        return msg, 1
    if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
        return "out of memory; try a smaller --tile or a smaller image.", 1
    return None


STATE = {"debug": False}  # set by the root callback for the command that follows


def describe(e: BaseException) -> str:
    known = _user_message(e)
    return known[0] if known else f"{type(e).__name__}: {e}"


def guarded(fn):
    """Turn the project's user errors into one red sentence on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = STATE["debug"] or os.environ.get("SDDUSR_DEBUG", "") not in ("", "0")
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            err.print(Text("interrupted.", style="red"))
            raise typer.Exit(130) from None
        except Exception as e:
            if debug:
                raise
            known = _user_message(e)
            if known is None:
                first = (str(e).strip().splitlines() or [""])[0]
                _fail(
                    f"internal error ({type(e).__name__}: {first}); rerun with `sddusr --debug ...` "
                    "for the traceback and report it.",
                    3,
                )
            msg, code = known
            lines = msg.splitlines()
            err.print(Text(f"error: {lines[0]}", style="bold red"), soft_wrap=True)
            for line in lines[1:]:  # e.g. the list of missing weight keys
                err.print(Text(line, style="red"), soft_wrap=True)
            raise typer.Exit(code) from None

    return wrapper
