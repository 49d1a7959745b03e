"""What the `roomkeeper` command and its sub-commands share: the console, table cells, logging,
and how a refusal is shown."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.text import Text

console = Console()


def _cells(*values: str | None) -> list[Text]:
    """Table cells shown as written: booking ids and Whereby's messages are not rich markup."""
    return [Text(value or "") for value in values]


def _logging() -> None:
    from worker.adapters import redact

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact.install()


@contextmanager
def refusals(*errors: type[Exception]) -> Iterator[None]:
    """Show one of `errors` as its message alone on stderr (it names the field and the rule) and
    exit 1: a refusal is an answer, not a traceback."""
    try:
        yield
    except errors as exc:
        print(exc, file=sys.stderr)
        raise typer.Exit(1) from None
