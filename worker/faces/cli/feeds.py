"""`roomkeeper feeds`: calendar feeds as bookings (CONTRACT §5)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from worker.faces.cli.common import _cells, _logging, console, refusals

feeds_cli = typer.Typer(no_args_is_help=True, help="Calendar feeds (ICS URLs, CalDAV calendars) as bookings.")


def _feed_json(text: str | None, field: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        print(f"{field}: is not valid JSON", file=sys.stderr)
        raise typer.Exit(1) from None


def _feed_call(call: Any, *args: Any, **kwargs: Any) -> Any:
    from worker.jobs.feeds import registry

    with refusals(registry.FeedError):
        return call(*args, **kwargs)


@feeds_cli.command("add")
def feeds_add(
    name: Annotated[str, typer.Argument(help="1-50 characters of A-Z a-z 0-9 _ - .")],
    url: Annotated[str, typer.Argument(help="the ICS URL, or the CalDAV calendar's URL")],
    match: Annotated[str | None, typer.Option(help="only events with this text (any case)")] = None,
    horizon_days: Annotated[int, typer.Option(help="book occurrences this many days ahead")] = 14,
    room: Annotated[str | None, typer.Option(help="room options, as JSON")] = None,
    notify: Annotated[str | None, typer.Option(help="where events go, as JSON")] = None,
    timezone: Annotated[str, typer.Option(help="zone of floating times when the feed names none")] = "UTC",
    username: Annotated[str | None, typer.Option(help="CalDAV user name (makes it a CalDAV feed)")] = None,
    password_env: Annotated[
        str | None, typer.Option(help="the environment variable holding the CalDAV password")
    ] = None,
    password: Annotated[
        bool,
        typer.Option(
            "--password",
            help=(
                "read the CalDAV password from standard input (prompted without echo on a terminal), "
                "kept encrypted (needs ROOMKEEPER_SECRET_KEY); never on the command line"
            ),
        ),
    ] = False,
    caldav: Annotated[bool, typer.Option("--caldav", help="read the URL as a CalDAV calendar")] = False,
) -> None:
    """Add a feed: every event in its horizon (matching --match) becomes a booking."""
    from worker.jobs.feeds import registry

    secret = _read_password() if password else None
    spec = registry.FeedSpec(
        name=name,
        url=url,
        match=match,
        horizon_days=horizon_days,
        room=_feed_json(room, "room"),
        notify=_feed_json(notify, "notify"),
        username=username,
        password_env=password_env,
        password=secret,
        timezone=timezone,
        caldav=caldav,
    )
    _feed_call(registry.add_feed, spec)
    console.print(f"feed {escape(name)} added; synced at the next poll (or: roomkeeper feeds sync NAME)")


def _read_password() -> str:
    # Not an argument: argv is visible to every user of the host (ps) and kept in shell history.
    if sys.stdin.isatty():
        return str(typer.prompt("CalDAV password", hide_input=True))
    line = sys.stdin.readline(_max_password() + 2)
    return line.rstrip("\r\n")


def _max_password() -> int:
    from worker.jobs.feeds import registry

    return registry.MAX_PASSWORD


def _changes(changes: dict[str, Any] | None) -> str:
    if not changes:
        return "-"
    return f"+{changes.get('booked', 0)} ~{changes.get('rescheduled', 0)} -{changes.get('cancelled', 0)}"


@feeds_cli.command("list")
def feeds_list() -> None:
    """Every feed: its last poll, outcome, occurrences held and last changes (+booked ~moved -cancelled)."""
    from worker.jobs.feeds import registry

    table = Table("name", "kind", "last poll", "outcome", "occurrences", "changes", "url")
    for feed in _feed_call(registry.list_feeds):
        table.add_row(
            *_cells(
                feed["name"],
                feed["kind"],
                feed["last_poll_at"],
                feed["last_outcome"],
                str(feed["occurrences"]),
                _changes(feed["last_changes"]),
                feed["url"],
            )
        )
    console.print(table)


@feeds_cli.command("show")
def feeds_show(name: str) -> None:
    """One feed as JSON: settings, last poll and outcome, history, the bookings it holds."""
    from worker.jobs.feeds import registry

    print(json.dumps(_feed_call(registry.show_feed, name), indent=2))


@feeds_cli.command("sync")
def feeds_sync(
    name: str,
    force: Annotated[bool, typer.Option(help="accept a sudden loss of most occurrences")] = False,
) -> None:
    """Poll the feed now and apply what changed."""
    from worker.jobs.feeds import sync

    _logging()
    result = _feed_call(sync.sync_feed, name, force=force)
    print(json.dumps(result, indent=2))
    if result.get("last_outcome") not in ("ok",):
        raise typer.Exit(1)


@feeds_cli.command("remove")
def feeds_remove(name: str) -> None:
    """Remove the feed; its bookings that have not ended are cancelled."""
    from worker.jobs.feeds import registry

    result = _feed_call(registry.remove_feed, name)
    console.print(f"feed {escape(name)} removed; {result['cancelled']} booking(s) cancelled")
