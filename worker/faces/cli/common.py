"""What the `roomkeeper` command and its sub-commands share: the console, table cells, logging."""

from __future__ import annotations

import logging

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
