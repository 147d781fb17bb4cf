"""The command line's error boundary and the checks a command makes before it starts work.

`guarded` turns an exception into one red sentence on stderr and the exit code the docs promise
(`SddusrError.exit_code`: 2 for a usage error, 1 for files, memory and failed work; 3 for a bug,
with the advice to rerun with `--debug`; 130 for Ctrl-C, which `interrupt.run_interruptible` makes
heard within a couple of seconds even inside one long operation). A memory error of any origin (GPU, the
CPU allocator) becomes a sentence naming the option that fits, from the command's own `--tile`;
on the CPU, `memory_ceiling` makes running out of memory such an error rather than a kill.
`load_engine` says which weights are missing before torch is even asked; `refuse_existing` is the
one overwrite rule of the image outputs (`sr` refuses, `batch` skips, unless `--overwrite`);
`plain_help_and_errors` makes typer's own help and usage errors read like the rest.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import typer
from rich.text import Text

from .console import err
from .interrupt import run_interruptible


def _fail(message: str, code: int = 1) -> None:
    err.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


def _user_message(e: BaseException, tile: int | None = None) -> tuple[str, int] | None:
    """(sentence, exit code) for an error a user can act on; None for a bug."""
    from sddusr_engine.errors import FootprintNotFoundError, SddusrError, memory_advice

    memory = memory_advice(e, tile)
    if memory is not None:
        return memory, 1
    if isinstance(e, SddusrError):
        msg = str(e).strip() or type(e).__name__
        if isinstance(e, FootprintNotFoundError):
            msg = msg.rstrip(".") + "; pass --no-reference-ok to enlarge the wide photo without it."
        return msg, e.exit_code
    if isinstance(e, OSError):  # FileNotFoundError, PermissionError, ...
        msg = (e.strerror or str(e)).strip() or type(e).__name__
        if e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        return msg.rstrip(".") + ".", 1
    return None


def _say_interrupted() -> None:
    err.print(Text("interrupted.", style="red"))


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
            with memory_ceiling():
                # in a worker thread, so that Ctrl-C is heard even inside one long torch op
                return run_interruptible(fn, *args, say=_say_interrupted, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            _say_interrupted()
            raise typer.Exit(130) from None
        except Exception as e:
            if debug:
                raise
            known = _user_message(e, kwargs.get("tile"))
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


def _kib(path: str, key: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise ValueError(f"no {key} in {path}")


@contextlib.contextmanager
def memory_ceiling():
    """On Linux without a GPU, hold the process's data under what the machine has free (its
    current size plus available memory and swap) while a command runs: running out of memory is
    then an allocation error, told in one sentence, rather than the kernel's kill with no word.
    Best effort: another program can still take the memory first. The old limit comes back after."""
    old = None
    try:
        import resource

        import torch

        free = _kib("/proc/meminfo", "MemAvailable") + _kib("/proc/meminfo", "SwapFree")
        limit = (_kib("/proc/self/status", "VmData") + free) * 1024
        current = resource.getrlimit(resource.RLIMIT_DATA)
        lower = current[0] == resource.RLIM_INFINITY or limit < current[0]
        if lower and not torch.cuda.is_available():  # a GPU driver's mappings: left alone
            resource.setrlimit(resource.RLIMIT_DATA, (limit, current[1]))
            old = current
    except (ImportError, OSError, ValueError):  # not Linux, or a hard limit below: as it is
        old = None
    try:
        yield
    finally:
        if old is not None:
            resource.setrlimit(resource.RLIMIT_DATA, old)


def load_engine(
    weights: Path | None,
    device: str,
    precision: str,
    backend: str,
    tile: int,
    ensemble: int = 1,
    adapt: int = 0,
):
    """The engine for a command's options, or `WeightsError` naming the weights file it lacks."""
    from sddusr_engine.engine import Engine
    from sddusr_engine.errors import WeightsError
    from sddusr_engine.weights import DEFAULT_WEIGHTS

    if weights is None and not DEFAULT_WEIGHTS.is_file():
        raise WeightsError(
            f"the default weights are not installed ({DEFAULT_WEIGHTS}); pass a weights file "
            "with --weights FILE (or set SDDUSR_WEIGHTS)."
        )
    if weights is not None and not weights.is_file():
        raise WeightsError(f"weights file not found: {weights}.")
    return Engine.from_pretrained(
        weights,
        device=device,
        dtype=getattr(precision, "value", precision),
        backend=getattr(backend, "value", backend),
        tile=tile,
        ensemble=ensemble,
        adapt=adapt,
    )


def refuse_existing(*paths: Path | None, overwrite: bool) -> None:
    """`UsageError` (exit 2) for the first output that exists, unless `overwrite`."""
    from sddusr_engine.errors import UsageError

    for p in paths:
        if p is not None and p.exists() and not overwrite:
            raise UsageError(f"{p} exists; pass --overwrite to replace it.")


def plain_help_and_errors() -> None:
    """Two changes to typer's output, made once: on/off flags take no value, so their help shows
    no type (typer prints `<bool>`); and a usage error typer finds itself (an option value not in
    its choices, a missing argument, an unknown command) is one `error:` sentence like ours, not
    a box. Its exit code stays click's 2."""
    from typer import rich_utils
    from typer.core import TyperOption

    if getattr(TyperOption, "_sddusr_plain", False):
        return
    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    def usage_error(e) -> None:
        if type(e).__name__ == "NoArgsIsHelpError":  # `sddusr` alone: the help was printed
            return
        msg = " ".join(e.format_message().replace("Value error, ", "").split()).rstrip(".")
        msg = msg[:1].lower() + msg[1:]
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        err.print(Text(f"error: {msg}{hint}.", style="bold red"), soft_wrap=True)

    TyperOption.display_type_rich = display_type_rich
    rich_utils.rich_format_error = usage_error
    TyperOption._sddusr_plain = True
