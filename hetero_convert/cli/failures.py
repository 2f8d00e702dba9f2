"""The one place where a failed command becomes one line on stderr.

Every command runs inside `Commands.invoke`. What escapes a command is printed as `error: <one line>` and the
process exits 1:
  - a refusal (`HeteroConvertError`): its message, which names the file and the field, layer or tensor;
  - what the environment or a library raises about a file: DCP's `CheckpointException` (a BaseException,
    which `except Exception` misses, carrying a multi-rank traceback as text), an `OSError` (disk full, a
    missing or unreadable file, a file-size limit), torch's C++ `RuntimeError` from its zip container
    (`inline_container.cc`), a failed allocation (`MemoryError`, torch's allocator): a line naming what is
    known, without the traceback;
  - anything else is a bug: one line saying so, with the exception's type and first line, and that
    `hetero-convert --debug COMMAND ...` shows the traceback.
With `--debug` (or HETERO_CONVERT_DEBUG=1) nothing is caught: the traceback is printed as Python prints it.
A message of several lines (a list of problems) is joined into one: the lines after the first become items
separated by "; ". Under torchrun, every process of a failed distributed job raises the same `JobFailed`;
only the coordinator prints it.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape
from typer.core import TyperGroup

from ..errors import OUT_OF_MEMORY_ADVICE, HeteroConvertError, JobFailed, out_of_memory
from ..launch import world

DEBUG_ENV = "HETERO_CONVERT_DEBUG"
# click's own exits and errors (usage errors, --help, typer.Exit), and the ways a process is told to stop
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
PASS_THROUGH = (typer.Exit, typer.Abort, _CLICK_EXCEPTION, SystemExit, KeyboardInterrupt, GeneratorExit)
# errno values that mean "the output could not be written" rather than "an input is missing"
_WRITE_ERRNOS = {"ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO"}
LIMIT = 4000  # characters of one message (a list of 50 problems stays readable; a megabyte does not)


def one_line(text: str) -> str:
    """A message on one line: further lines (list items "  - x") become "; "-separated items."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    items = [ln[2:] if ln.startswith("- ") else ln for ln in lines[1:]]
    out = lines[0] + (" " + "; ".join(items) if items else "")
    return out if len(out) <= LIMIT else out[: LIMIT - 30] + f" ... ({len(out) - LIMIT + 30} more characters)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _os_error(e: OSError) -> str:
    import errno

    code = errno.errorcode.get(e.errno or 0, "")
    what = e.strerror or _first_line(e) or type(e).__name__
    where = ", ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    hint = " (the disk or a quota is full, or a file-size limit was reached)" if code in _WRITE_ERRNOS else ""
    return f"{where}: {what}{hint}" if where else f"{what}{hint} [{code or type(e).__name__}]"


def describe(e: BaseException) -> tuple[str, bool]:
    """(the one-line message, whether it is a bug)."""
    if isinstance(e, HeteroConvertError):
        return one_line(str(e)), False
    api = sys.modules.get("torch.distributed.checkpoint.api")  # not imported: none of its errors was raised
    if api is not None and isinstance(e, api.CheckpointException):
        failures = getattr(e, "failures", None) or {}
        first = next(iter(failures.values()), (e, None))[0]
        return one_line(f"torch.distributed.checkpoint could not load the checkpoint ({type(first).__name__}: "
                        f"{_first_line(first)})"), False
    if out_of_memory(e):  # before OSError: ENOMEM is one
        detail = f": {_first_line(e)}" if _first_line(e) else ""
        return one_line(f"out of memory ({type(e).__name__}{detail}): {OUT_OF_MEMORY_ADVICE}"), False
    if isinstance(e, OSError):
        return one_line(_os_error(e)), False
    if isinstance(e, RuntimeError) and ("inline_container" in str(e) or "PytorchStream" in str(e)):
        return one_line(f"torch could not read or write a checkpoint file ({_first_line(e)}): a truncated "
                        f"or corrupt input, or a full disk"), False
    return (f"internal error, a bug in hetero-convert: {type(e).__name__}: {_first_line(e)} (run "
            f"`hetero-convert --debug COMMAND ...` for the traceback, and please report it)"), True


def print_error(message: str) -> None:
    from .render import err

    err.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False)


def debugging() -> bool:
    """--debug (the app's option sets the variable while a command runs) or HETERO_CONVERT_DEBUG=1."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class Commands(TyperGroup):
    """The app's command group: runs a command, and turns whatever escapes it into one line (see above)."""

    def invoke(self, ctx):
        before = os.environ.get(DEBUG_ENV)
        if ctx.params.get("debug"):
            os.environ[DEBUG_ENV] = "1"  # also seen by `fail()` inside commands, and by the workers they start
        try:
            return super().invoke(ctx)
        except PASS_THROUGH:
            raise
        except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
            if debugging():
                raise
            if not (isinstance(e, JobFailed) and not world().coordinator):
                print_error(describe(e)[0])
            raise typer.Exit(1) from None
        finally:
            if before is None:
                os.environ.pop(DEBUG_ENV, None)
            else:
                os.environ[DEBUG_ENV] = before
