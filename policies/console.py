"""Presentation shared by both CLIs: one-line errors, JSON or rich tables, exit codes.

Lives in ``policies`` because it is the one package both sides may import.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

out = Console()
err = Console(stderr=True)


def emit_json(data: Any) -> None:
    """Print one JSON document on one line (the last line of output, for scripts)."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    whole: Sequence[str] = (),
) -> None:
    """Print a table; columns named in ``whole`` (ids, times) are never wrapped, so an admin can
    copy them from an 80-column terminal, and the other columns give way. No cell is ever cut
    with an ellipsis: a value too long for its column folds onto the next line (issue 26:
    ids, e-mails and status words read ``pen…`` at 80 columns)."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    t = Table(title=title)
    for i, c in enumerate(columns):
        if c in whole:
            width = max([len(c), *(len(r[i]) for r in cells)])
            t.add_column(c, no_wrap=True, min_width=width, overflow="fold")
        else:
            t.add_column(c, overflow="fold")
    for row in cells:
        t.add_row(*row)
    out.print(t)


def run_cli(app: Callable[..., Any], handled: tuple[type[BaseException], ...]) -> None:
    """Run a typer app; errors of ``handled`` types become one line on stderr and exit 1."""
    warnings.filterwarnings("ignore")  # syft and opacus warn on stderr; our errors must stand out
    debug = "--debug" in sys.argv
    if debug:
        sys.argv = [a for a in sys.argv if a != "--debug"]
    try:
        code = app(standalone_mode=False)  # click returns an Exit's code in this mode
    except handled as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug or an unforeseen failure: one line, never locals
        if debug:
            traceback.print_exc()  # the plain traceback: no local variables, which hold secrets
        err.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {escape(str(exc)[:300])} "
            "(add --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
            markup=True,
        )
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)


_local = threading.local()


class _ThreadQuietStream:
    """A stream that drops writes from threads inside :func:`quiet`, passes the rest through."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def write(self, text: str) -> int:
        return len(text) if getattr(_local, "depth", 0) else self._real.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence syft's banners (stdout) and progress bars (stderr) for this thread only:
    redirect_stdout is process-wide, and threads that talk to several sites at once would swap
    each other's streams. Our own errors are printed outside, after the block."""
    if not isinstance(sys.stdout, _ThreadQuietStream):
        sys.stdout = _ThreadQuietStream(sys.stdout)
    if not isinstance(sys.stderr, _ThreadQuietStream):
        sys.stderr = _ThreadQuietStream(sys.stderr)
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
