"""The `roomkeeper` command line: migrate, sandbox, run, demo, and the operator's views of meetings."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from config.settings import SettingsError, get_settings, reset_settings, whereby_unconfigured
from worker.lifecycle import fmt
from worker.models import MeetingState

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()


def _cells(*values: str | None) -> list[Text]:
    """Table cells shown as written: booking ids and Whereby's messages are not rich markup."""
    return [Text(value or "") for value in values]


def _logging() -> None:
    from worker import redact

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact.install()


@cli.command()
def migrate() -> None:
    """Create or upgrade the database schema (safe to run again)."""
    _logging()
    from worker.store import migrate as run_migrations

    run_migrations()


@cli.command()
def sandbox(
    host: Annotated[str, typer.Option(envvar="SANDBOX_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SANDBOX_PORT")] = 8765,
    api_key: Annotated[
        str, typer.Option(envvar="SANDBOX_API_KEY", help="bearer key it accepts")
    ] = "sandbox-key",
    points_per_minute: Annotated[
        int, typer.Option(envvar="SANDBOX_POINTS_PER_MINUTE", help="0: unlimited")
    ] = 0,
    latency_ms: Annotated[float, typer.Option(envvar="SANDBOX_LATENCY_MS")] = 0.0,
    error_rate: Annotated[float, typer.Option(envvar="SANDBOX_ERROR_RATE")] = 0.0,
    lost_reply_rate: Annotated[float, typer.Option(envvar="SANDBOX_LOST_REPLY_RATE")] = 0.0,
    expiry_seconds: Annotated[float, typer.Option(envvar="SANDBOX_EXPIRY_SECONDS")] = 86400.0,
    webhook_url: Annotated[
        str | None, typer.Option(envvar="SANDBOX_WEBHOOK_URL", help="where to POST Whereby's webhooks")
    ] = None,
    webhook_secret: Annotated[
        str | None,
        typer.Option(envvar="SANDBOX_WEBHOOK_SECRET", help="signs the webhooks", show_default=False),
    ] = None,
) -> None:
    """Serve the bundled Whereby sandbox (a faithful in-memory server of the documented API)."""
    _logging()
    from worker.sandbox import SandboxConfig, serve

    config = SandboxConfig(
        api_key=api_key,
        points_per_minute=points_per_minute,
        latency_ms=latency_ms,
        error_rate=error_rate,
        lost_reply_rate=lost_reply_rate,
        expiry_seconds=expiry_seconds,
        webhook_url=webhook_url or None,
        webhook_secret=webhook_secret or None,
    )
    serve(config, host, port)


@cli.command()
def flower(
    port: Annotated[int, typer.Option(envvar="PORT")] = 5555,
    address: Annotated[
        str, typer.Option(envvar="FLOWER_ADDRESS", help="listen address; empty: every interface")
    ] = "",
) -> None:
    """Run Flower; refuses to listen beyond loopback without credentials (FLOWER_BASIC_AUTH)."""
    # Flower's pages are open without auth, and its task list shows every meeting view, host room
    # keys included: nobody without credentials may reach it from another host.
    from worker.flower import command, refusal

    problem = refusal(os.environ, address)
    if problem:
        print(f"roomkeeper flower: {problem}", file=sys.stderr)
        raise typer.Exit(2)
    argv = command(port, address)
    os.execv(argv[0], argv)  # Flower takes this process over, and SIGTERM with it


@cli.command()
def web(
    host: Annotated[str, typer.Option(envvar="ROOMKEEPER_WEB_HOST", help="listen address")] = "0.0.0.0",
    port: Annotated[int | None, typer.Option(help="default: ROOMKEEPER_WEB_PORT (8000)")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the HTTP face (CONTRACT §4): health, metrics, Whereby's webhooks, bookings, feeds."""
    import uvicorn

    _logging()
    settings = get_settings()
    uvicorn.run(
        "worker.web.app:create_app",
        factory=True,
        host=host,
        port=port or settings.web_port,
        workers=workers,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )


@cli.command()
def run() -> None:
    """Run worker, beat, Flower and web on the configured settings (and the sandbox without a Whereby key)."""
    from worker.flower import credentials, refusal
    from worker.localredis import free_port
    from worker.processes import process_env, run_processes
    from worker.store import migrate as run_migrations

    _logging()
    names = ["worker", "beat", "flower", "web"]
    overrides: dict[str, str] = {}
    if whereby_unconfigured():
        port = free_port()
        overrides = {"SANDBOX_PORT": str(port), "WHEREBY_API_URL": f"http://127.0.0.1:{port}/v1"}
        os.environ.update(overrides)
        reset_settings()
        names.insert(0, "sandbox")
        console.print(f"No WHEREBY_API_KEY: using the bundled sandbox at {overrides['WHEREBY_API_URL']}")
    get_settings().require_whereby_key()  # fail fast, naming the variable, before anything starts
    if not credentials(os.environ):
        # Without credentials Flower serves this host only (`roomkeeper flower` insists).
        overrides["FLOWER_ADDRESS"] = os.environ.get("FLOWER_ADDRESS") or "127.0.0.1"
    problem = refusal(os.environ, overrides.get("FLOWER_ADDRESS", os.environ.get("FLOWER_ADDRESS", "")))
    if problem:  # stop before anything starts, as Flower alone would
        print(f"roomkeeper run: {problem}", file=sys.stderr)
        sys.exit(2)
    run_migrations()
    flower_port = int(os.environ.get("PORT", "5555"))
    console.print(f"Flower: http://127.0.0.1:{flower_port}")
    web_url = f"http://127.0.0.1:{get_settings().web_port}"
    console.print(f"Web: {web_url} (/healthz, /readyz, /metrics)", soft_wrap=True)
    sys.exit(run_processes(names, process_env(overrides), ports={"flower": flower_port}))


@cli.command()
def demo(
    meetings: Annotated[int, typer.Option(help="how many sample meetings")] = 5,
    timeout: Annotated[float, typer.Option(help="give up after this many seconds")] = 180.0,
) -> None:
    """Run the whole system on embedded defaults and show meetings going through their lifecycle."""
    from worker.demo import run_demo

    sys.exit(run_demo(meetings, timeout))


def _caller() -> Any:
    """A Celery client as any other application would have one: no project import needed."""
    from celery import Celery

    settings = get_settings()
    return Celery(broker=settings.broker_url, backend=settings.backend_url)


def _send(task: str, kwargs: dict[str, Any], wait: float) -> dict[str, Any]:
    result = _caller().send_task(task, queue=get_settings().queue, kwargs=kwargs)
    try:
        value: dict[str, Any] = result.get(timeout=wait)
    except Exception as exc:  # the worker's error, re-raised here: show it as the caller sees it
        console.print(f"[red]{task} failed:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    return value


@cli.command()
def book(
    booking_id: str,
    start: Annotated[str | None, typer.Option(help="ISO-8601; default: now + --in")] = None,
    end: Annotated[str | None, typer.Option(help="ISO-8601; default: start + --minutes")] = None,
    in_seconds: Annotated[float, typer.Option("--in", help="seconds from now to the start")] = 60.0,
    minutes: Annotated[float, typer.Option(help="length when --end is not given")] = 30.0,
    room: Annotated[str | None, typer.Option(help="the room object, as JSON")] = None,
    metadata: Annotated[str | None, typer.Option(help="a JSON object")] = None,
    wait: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 30.0,
) -> None:
    """Book (or reschedule) a meeting through the queue, as a caller would."""
    begin = start or (datetime.now(UTC) + timedelta(seconds=in_seconds)).isoformat()
    finish = end or (datetime.fromisoformat(begin) + timedelta(minutes=minutes)).isoformat()
    kwargs: dict[str, Any] = {"booking_id": booking_id, "start": begin, "end": finish}
    if room:
        kwargs["room"] = json.loads(room)
    if metadata:
        kwargs["metadata"] = json.loads(metadata)
    console.print_json(data=_send("rooms.schedule_meeting", kwargs, wait))


@cli.command()
def cancel(booking_id: str, wait: Annotated[float, typer.Option()] = 30.0) -> None:
    """Cancel a meeting through the queue (its room, if any, is deleted now)."""
    console.print_json(data=_send("rooms.cancel_meeting", {"booking_id": booking_id}, wait))


@cli.command()
def show(booking_id: str) -> None:
    """A meeting's view and its whole history: every state change and every Whereby call."""
    from worker import booking
    from worker.requests import BookingRef, InvalidRequest, validate

    try:
        # Validated like a caller's id: one the store cannot hold (an undecodable byte in the
        # argument arrives as a lone surrogate) is named, not a driver's traceback.
        ref = validate(BookingRef, (), {"booking_id": booking_id})
        console.print_json(data=booking.get_meeting(ref.booking_id))
    except InvalidRequest as exc:  # booking.UnknownBooking included
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    table = Table("at", "kind", "what", "outcome", title=f"history of {escape(booking_id)}")
    for entry in booking.history(booking_id):
        table.add_row(*_cells(fmt(entry.at), entry.kind, entry.action, entry.outcome))
    console.print(table)


@cli.command(name="list")
def list_(
    state: Annotated[MeetingState | None, typer.Option(help="only meetings in this state")] = None,
    limit: Annotated[int, typer.Option()] = 200,
) -> None:
    """A table of meetings, soonest first."""
    from worker import booking

    table = Table("booking_id", "state", "start", "end", "room", "last_error")
    for item in booking.list_meetings(state, limit):
        room = item["room"]["room_url"] if item["room"] else ""
        table.add_row(
            *_cells(item["booking_id"], item["state"], item["start"], item["end"], room, item["last_error"])
        )
    console.print(table)


@cli.command()
def failed(limit: Annotated[int, typer.Option()] = 200) -> None:
    """Meetings the service gave up on, with the reason."""
    from worker import booking

    rows = booking.list_meetings(MeetingState.FAILED, limit)
    table = Table("booking_id", "start", "end", "last_error", title=f"{len(rows)} failed meeting(s)")
    for item in rows:
        table.add_row(*_cells(item["booking_id"], item["start"], item["end"], item["last_error"]))
    console.print(table)


@cli.command()
def retry(
    booking_ids: Annotated[list[str] | None, typer.Argument(help="failed meetings to retry")] = None,
    all_: Annotated[bool, typer.Option("--all", help="retry every failed meeting")] = False,
) -> None:
    """Put failed meetings back to be tried afresh (meetings already over are left as they are)."""
    from worker import booking

    if not booking_ids and not all_:
        console.print("name the booking ids to retry, or pass --all")
        raise typer.Exit(2)
    retried = booking.retry_failed(None if all_ else booking_ids)
    console.print(f"retried {len(retried)}: {escape(', '.join(retried)) or '-'}")


tokens_cli = typer.Typer(
    no_args_is_help=True, help="Bearer tokens for the HTTP API (/v1): create, list, revoke."
)
cli.add_typer(tokens_cli, name="tokens")


@tokens_cli.command("create")
def tokens_create(name: Annotated[str, typer.Argument(help="1-100 characters of a-z 0-9 . _ -")]) -> None:
    """Make a token and print it, once: the store keeps only its SHA-256."""
    from worker import tokens

    try:
        token = tokens.create(name)
    except tokens.TokenError as exc:
        print(exc, file=sys.stderr)
        raise typer.Exit(1) from None
    # The token alone on stdout (TOKEN=$(roomkeeper tokens create app) works); the advice on stderr.
    print(token)
    print(
        f"token {name!r} created; it is shown only this once. Send it as 'Authorization: Bearer TOKEN'.",
        file=sys.stderr,
    )


@tokens_cli.command("list")
def tokens_list() -> None:
    """Every token's name, when it was made, last used and revoked (never the token)."""
    from worker import tokens

    table = Table("name", "created", "last used", "revoked")
    for info in tokens.list_tokens():
        table.add_row(*_cells(info.name, fmt(info.created_at), fmt(info.last_used_at), fmt(info.revoked_at)))
    console.print(table)


@tokens_cli.command("revoke")
def tokens_revoke(name: str) -> None:
    """Revoke a token: from now on it is answered 401 (revoking again is not an error)."""
    from worker import tokens

    if not tokens.revoke(name):
        print(f"name: no token called {name!r}", file=sys.stderr)
        raise typer.Exit(1)
    console.print(f"token {escape(name)} revoked")


feeds_cli = typer.Typer(no_args_is_help=True, help="Calendar feeds (ICS URLs, CalDAV calendars) as bookings.")
cli.add_typer(feeds_cli, name="feeds")


def _feed_json(text: str | None, field: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        print(f"{field}: is not valid JSON", file=sys.stderr)
        raise typer.Exit(1) from None


def _feed_call(call: Any, *args: Any, **kwargs: Any) -> Any:
    from worker.feeds import sync

    try:
        return call(*args, **kwargs)
    except sync.FeedError as exc:
        print(exc, file=sys.stderr)
        raise typer.Exit(1) from None


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
        str | None, typer.Option(help="the CalDAV password, kept encrypted (needs ROOMKEEPER_SECRET_KEY)")
    ] = None,
    caldav: Annotated[bool, typer.Option("--caldav", help="read the URL as a CalDAV calendar")] = False,
) -> None:
    """Add a feed: every event in its horizon (matching --match) becomes a booking."""
    from worker.feeds import sync

    spec = sync.FeedSpec(
        name=name,
        url=url,
        match=match,
        horizon_days=horizon_days,
        room=_feed_json(room, "room"),
        notify=_feed_json(notify, "notify"),
        username=username,
        password_env=password_env,
        password=password,
        timezone=timezone,
        caldav=caldav,
    )
    _feed_call(sync.add_feed, spec)
    console.print(f"feed {escape(name)} added; synced at the next poll (or: roomkeeper feeds sync NAME)")


def _changes(changes: dict[str, Any] | None) -> str:
    if not changes:
        return "-"
    return f"+{changes.get('booked', 0)} ~{changes.get('rescheduled', 0)} -{changes.get('cancelled', 0)}"


@feeds_cli.command("list")
def feeds_list() -> None:
    """Every feed: its last poll, outcome, occurrences held and last changes (+booked ~moved -cancelled)."""
    from worker.feeds import sync

    table = Table("name", "kind", "last poll", "outcome", "occurrences", "changes", "url")
    for feed in _feed_call(sync.list_feeds):
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
    from worker.feeds import sync

    print(json.dumps(_feed_call(sync.show_feed, name), indent=2))


@feeds_cli.command("sync")
def feeds_sync(
    name: str,
    force: Annotated[bool, typer.Option(help="accept a sudden loss of most occurrences")] = False,
) -> None:
    """Poll the feed now and apply what changed."""
    from worker.feeds import sync

    _logging()
    result = _feed_call(sync.sync_feed, name, force=force)
    print(json.dumps(result, indent=2))
    if result.get("last_outcome") not in ("ok",):
        raise typer.Exit(1)


@feeds_cli.command("remove")
def feeds_remove(name: str) -> None:
    """Remove the feed; its bookings that have not ended are cancelled."""
    from worker.feeds import sync

    result = _feed_call(sync.remove_feed, name)
    console.print(f"feed {escape(name)} removed; {result['cancelled']} booking(s) cancelled")


def main() -> None:
    try:
        cli()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
