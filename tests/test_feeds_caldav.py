"""A CalDAV feed against a real Radicale server run by the test, with a password from the environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import caldav
import httpx
import pytest
from sqlmodel import delete

from tests.conftest import apply_settings
from tests.test_feeds import base, stamp, vcalendar, vevent
from worker import booking, store
from worker.feeds import registry, sync
from worker.models import Feed, FeedOccurrence

PASSWORD = "radicale-pass-7f3e"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def radicale(tmp_path: Path, configured: str) -> Iterator[str]:
    with store.session_scope() as session:
        session.execute(delete(FeedOccurrence))
        session.execute(delete(Feed))
    (tmp_path / "users").write_text(f"alice:{PASSWORD}\n")
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "radicale",
            f"--server-hosts=127.0.0.1:{port}",
            f"--storage-filesystem-folder={tmp_path / 'collections'}",
            "--auth-type=htpasswd",
            f"--auth-htpasswd-filename={tmp_path / 'users'}",
            "--auth-htpasswd-encryption=plain",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url + "/", timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.1)
    apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS="127.0.0.1")
    os.environ["TEST_CALDAV_PASSWORD"] = PASSWORD
    yield url
    os.environ.pop("TEST_CALDAV_PASSWORD", None)
    apply_settings(ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS=None)
    process.terminate()
    process.wait(10)


def test_caldav_calendar_becomes_bookings(radicale: str, caplog: pytest.LogCaptureFixture) -> None:
    t = base()
    client = caldav.DAVClient(url=radicale, username="alice", password=PASSWORD)
    calendar = client.principal().make_calendar(name="team", cal_id="team")
    calendar_url = str(calendar.url)
    calendar.save_event(vcalendar(vevent("dav-series@x", t, extra="RRULE:FREQ=DAILY;COUNT=2")))
    single = calendar.save_event(vcalendar(vevent("dav-one@x", t + timedelta(hours=2))))
    calendar.save_event(vcalendar(vevent("dav-lunch@x", t + timedelta(hours=3), summary="Lunch")))

    registry.add_feed(
        registry.FeedSpec(
            name="dav",
            url=calendar_url,
            match="whereby",
            username="alice",
            password_env="TEST_CALDAV_PASSWORD",
            horizon_days=5,
        )
    )
    result = sync.sync_feed("dav")
    assert result["last_outcome"] == "ok", result
    expected = {
        f"feed:dav:dav-series@x:{stamp(t)}",
        f"feed:dav:dav-series@x:{stamp(t + timedelta(days=1))}",
        f"feed:dav:dav-one@x:{stamp(t + timedelta(hours=2))}",
    }
    assert {b["booking_id"] for b in registry.show_feed("dav")["bookings"]} == expected
    for bid in expected:
        assert booking.get_meeting(bid)["state"] == "scheduled"

    # Deleted on the server: cancelled at the next sync.
    single.delete()
    assert sync.sync_feed("dav")["last_changes"]["cancelled"] == 1
    assert booking.get_meeting(f"feed:dav:dav-one@x:{stamp(t + timedelta(hours=2))}")["state"] == "cancelled"

    # A wrong password: the read fails, nothing changes, and the password is nowhere.
    os.environ["TEST_CALDAV_PASSWORD"] = "wrong-" + PASSWORD
    failed = sync.sync_feed("dav")
    assert failed["last_outcome"] == "failed"
    assert booking.get_meeting(f"feed:dav:dav-series@x:{stamp(t)}")["state"] == "scheduled"
    shown = str(registry.show_feed("dav")) + str(registry.list_feeds()) + caplog.text
    assert PASSWORD not in shown
    assert "TEST_CALDAV_PASSWORD" in str(registry.show_feed("dav"))


def test_caldav_password_stored_encrypted(radicale: str) -> None:
    from cryptography.fernet import Fernet
    from sqlalchemy import text

    t = base()
    client = caldav.DAVClient(url=radicale, username="alice", password=PASSWORD)
    calendar = client.principal().make_calendar(name="enc", cal_id="enc")
    calendar.save_event(vcalendar(vevent("enc@x", t)))
    spec = registry.FeedSpec(name="enc", url=str(calendar.url), username="alice", password=PASSWORD)
    with pytest.raises(registry.FeedError, match="password: storing a password needs ROOMKEEPER_SECRET_KEY"):
        registry.add_feed(spec)
    apply_settings(ROOMKEEPER_SECRET_KEY=Fernet.generate_key().decode())
    try:
        added = registry.add_feed(spec)
        assert added["password"] == "stored encrypted" and PASSWORD not in str(added)
        result = sync.sync_feed("enc")
        assert result["last_outcome"] == "ok" and result["last_changes"]["booked"] == 1
        with store.session_scope() as session:
            row = session.execute(text("SELECT * FROM feed WHERE name = 'enc'")).one()
        assert PASSWORD not in str(tuple(row))
        assert PASSWORD not in str(registry.show_feed("enc")) + str(registry.list_feeds())
        # Another key cannot read it: the sync fails and changes nothing.
        apply_settings(ROOMKEEPER_SECRET_KEY=Fernet.generate_key().decode())
        failed = sync.sync_feed("enc")
        assert failed["last_outcome"] == "failed" and "decrypt" in failed["last_detail"]
        assert booking.get_meeting(f"feed:enc:enc@x:{stamp(t)}")["state"] == "scheduled"
    finally:
        apply_settings(ROOMKEEPER_SECRET_KEY=None)
