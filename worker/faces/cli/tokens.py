"""`roomkeeper tokens`: the bearer tokens of the HTTP face (CONTRACT §4.2)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from worker.faces.cli.common import _cells, console, refusals
from worker.rules.lifecycle import fmt

tokens_cli = typer.Typer(
    no_args_is_help=True, help="Bearer tokens for the HTTP API (/v1): create, list, revoke."
)


@tokens_cli.command("create")
def tokens_create(name: Annotated[str, typer.Argument(help="1-100 characters of a-z 0-9 . _ -")]) -> None:
    """Make a token and print it, once: the store keeps only its SHA-256."""
    from worker.store import tokens

    with refusals(tokens.TokenError):
        token = tokens.create(name)
    # The token alone on stdout (TOKEN=$(roomkeeper tokens create app) works); the advice on stderr.
    print(token)
    print(
        f"token {name!r} created; it is shown only this once. Send it as 'Authorization: Bearer TOKEN'.",
        file=sys.stderr,
    )


@tokens_cli.command("list")
def tokens_list() -> None:
    """Every token's name, when it was made, last used and revoked (never the token)."""
    from worker.store import tokens

    table = Table("name", "created", "last used", "revoked")
    for info in tokens.list_tokens():
        table.add_row(*_cells(info.name, fmt(info.created_at), fmt(info.last_used_at), fmt(info.revoked_at)))
    console.print(table)


@tokens_cli.command("revoke")
def tokens_revoke(name: str) -> None:
    """Revoke a token: from now on it is answered 401 (revoking again is not an error)."""
    from worker.store import tokens

    if not tokens.revoke(name):
        print(f"name: no token called {name!r}", file=sys.stderr)
        raise typer.Exit(1)
    console.print(f"token {escape(name)} revoked")
