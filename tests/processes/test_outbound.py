"""Outbound rules (CONTRACT §3), notify URL validation, signatures and the retry rules, as plain functions."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.settings import Settings
from worker.adapters.outbound import OutboundRefused, check_url, is_public, pinned
from worker.adapters.signing import receiver, shown_url, signature
from worker.jobs import delivery
from worker.rules import delivery as delivery_rules
from worker.rules.validation import InvalidRequest, ScheduleRequest, validate

SIGNED = Settings(notify_signing_secret="s" * 32)
SIGNED_LOCAL = Settings(notify_signing_secret="s" * 32, outbound_allowed_hosts="127.0.0.1, hooks.internal")
# The verifiers a receiver copies are the README's own ("Events over HTTP").
NOTES = Path(__file__).resolve().parents[2] / "README.md"


def refused(url: str, settings: Settings = SIGNED) -> str:
    with pytest.raises(OutboundRefused) as caught:
        check_url(url, settings)
    return str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "https://127.0.0.1/hook",
        "https://localhost/hook",
        "https://10.0.0.7/hook",
        "https://172.16.3.4/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://100.64.0.1/hook",
        "https://0.0.0.0/hook",
        "https://224.0.0.1/hook",
        "https://[::1]/hook",
        "https://[::]/hook",
        "https://[fe80::1]/hook",
        "https://[fc00::1]/hook",
        "https://[ff02::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://[::ffff:169.254.169.254]/hook",
        "https://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1
        "https://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
        "https://[::127.0.0.1]/hook",  # IPv4-compatible
        "https://2130706433/hook",  # 127.0.0.1 as one number: resolves to loopback
        "https://0x7f.1/hook",
    ],
)
def test_private_loopback_and_reserved_addresses_are_refused(url: str) -> None:
    message = refused(url)
    assert "ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS" in message or "does not resolve" in message


def test_plain_http_is_refused_unless_its_host_is_listed() -> None:
    assert "must be https" in refused("http://127.0.0.1:8080/hook")
    assert "must be https" in refused("http://1.1.1.1/hook")
    assert check_url("http://127.0.0.1:8080/hook", SIGNED_LOCAL)
    assert check_url("http://hooks.internal/x", SIGNED_LOCAL)
    # Listed by its address: another spelling of the same host is not the listed one.
    assert refused("http://[::ffff:127.0.0.1]/hook", SIGNED_LOCAL)
    assert refused("https://[::ffff:127.0.0.1]/hook", SIGNED_LOCAL)
    assert refused("https://[::1]/hook", SIGNED_LOCAL)


@pytest.mark.parametrize(
    "url", ["https://1.1.1.1/hook", "https://8.8.8.8:8443/x?y=1", "https://[2606:4700:4700::1111]/hook"]
)
def test_https_to_a_public_address_is_allowed(url: str) -> None:
    assert check_url(url, SIGNED) == url


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("ftp://1.1.1.1/x", "http(s) URL"),
        ("https:///x", "http(s) URL"),
        ("hook", "http(s) URL"),
        ("https://1.1.1.1:99999/x", "not a valid URL"),
        ("https://user:pw@1.1.1.1/x", "credentials"),
        ("https://token@1.1.1.1/x", "credentials"),
        ("https://no-such-host.invalid/x", "does not resolve"),
    ],
)
def test_malformed_urls_are_refused(url: str, rule: str) -> None:
    message = refused(url)
    assert rule in message
    assert "pw" not in message and "token" not in message


def test_ipv4_inside_ipv6_is_judged_by_the_ipv4_address() -> None:
    assert is_public(ipaddress.ip_address("::ffff:8.8.8.8"))
    assert is_public(ipaddress.ip_address("64:ff9b::808:808"))
    assert not is_public(ipaddress.ip_address("64:ff9b::a00:1"))
    assert not is_public(ipaddress.ip_address("2002:a00:1::"))


# --------------------------------------------------------------------------------------------
# The notify model: one model for Celery kwargs and HTTP bodies.

BOOKING = {"booking_id": "b-1", "start": "2030-01-01T10:00:00Z", "end": "2030-01-01T11:00:00Z"}


def rejected(notify: Any, settings: Settings = SIGNED) -> str:
    with pytest.raises(InvalidRequest) as caught:
        validate(ScheduleRequest, (), {**BOOKING, "notify": notify}, settings=settings)
    return str(caught.value)


def test_a_url_notify_is_accepted_and_stored_as_given() -> None:
    request = validate(
        ScheduleRequest, (), {**BOOKING, "notify": {"url": "https://1.1.1.1/h?k=v"}}, settings=SIGNED
    )
    assert request.notify is not None and request.notify.model_dump() == {"url": "https://1.1.1.1/h?k=v"}
    task = validate(ScheduleRequest, (), {**BOOKING, "notify": {"task": "t", "queue": "q"}}, settings=SIGNED)
    assert task.notify is not None and task.notify.model_dump() == {"task": "t", "queue": "q"}


def test_a_url_notify_without_the_signing_secret_is_refused_naming_notify_url() -> None:
    message = rejected({"url": "https://1.1.1.1/hook"}, Settings())
    assert message.startswith("notify.url: ") and "ROOMKEEPER_NOTIFY_SIGNING_SECRET" in message


@pytest.mark.parametrize(
    ("notify", "expected"),
    [
        ({"url": "http://127.0.0.1/hook"}, "notify.url: must be https"),
        ({"url": "https://10.9.8.7/hook"}, "notify.url: host '10.9.8.7' is a private"),
        ({"url": "https://[::ffff:127.0.0.1]/hook"}, "notify.url: host '::ffff:127.0.0.1' is a private"),
        ({"url": "https://a:b@1.1.1.1/hook"}, "notify.url: must not carry credentials"),
        ({"url": 7}, "notify.url: Input should be a valid string"),
        ({"url": ""}, "notify.url: String should have at least 1 character"),
        ({"url": "https://1.1.1.1/" + "x" * 2000}, "notify.url: String should have at most 2000"),
        ({"url": "https://1.1.1.1/\x00"}, "notify.url: must not contain the NUL character"),
        ({"url": "https://1.1.1.1/", "task": "t", "queue": "q"}, 'notify: give either {"url"}'),
        ({}, 'notify: must be {"task": NAME, "queue": QUEUE} or {"url"'),
        ({"task": "t"}, "notify.queue: is required"),
        ({"queue": "q"}, "notify.task: is required"),
        ({"uri": "https://1.1.1.1/"}, "notify.uri: unknown field"),
    ],
)
def test_bad_notify_names_its_field_and_rule(notify: dict[str, Any], expected: str) -> None:
    assert expected in rejected(notify)


def test_the_model_reads_the_settings_the_faces_pass() -> None:
    # The faces (Celery and HTTP) validate with the same model and pass the process's settings; the
    # rules read none themselves, so a face that forgot them fails loudly, not as a caller's mistake.
    from config.settings import get_settings
    from tests.conftest import apply_settings

    url_notify = {**BOOKING, "notify": {"url": "https://1.1.1.1/hook"}}
    with pytest.raises(LookupError, match="settings"):
        validate(ScheduleRequest, (), url_notify)
    apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET=None)
    with pytest.raises(InvalidRequest, match=r"^notify\.url: .*ROOMKEEPER_NOTIFY_SIGNING_SECRET"):
        validate(ScheduleRequest, (), url_notify, settings=get_settings())
    apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET="x" * 32)
    try:
        validate(ScheduleRequest, (), url_notify, settings=get_settings())
    finally:
        apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET=None)


# --------------------------------------------------------------------------------------------
# Signatures, as a receiver checks them.


def verify_from_contract(secret: str, header: str, raw: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(","))
    mac = hmac.new(secret.encode(), f"{fields['t']}.".encode() + raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, fields["v1"])


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = json.dumps({"event": "room.ready", "booking_id": "b"}, separators=(",", ":")).encode()
    header = signature("sekrit", body, 1_790_000_000)
    assert re.fullmatch(r"t=1790000000,v1=[0-9a-f]{64}", header)
    assert verify_from_contract("sekrit", header, body)
    assert not verify_from_contract("sekrit", header, body + b" ")
    assert not verify_from_contract("other", header, body)


def _readme_block(language: str) -> str:
    text = NOTES.read_text().split("## Events over HTTP", 1)[-1].split("\n## ", 1)[0]
    found = re.findall(rf"```{language}\n(.*?)```", text, re.S)
    assert found, f"no {language} block in {NOTES}"
    return str(found[0])


def test_the_documented_python_verifier_accepts_the_service_signature() -> None:
    namespace: dict[str, Any] = {}
    exec(_readme_block("python"), namespace)
    verify = namespace["verify_roomkeeper_signature"]
    body = b'{"event":"room.ready","booking_id":"b-1"}'
    header = signature("sekrit", body, int(time.time()))
    assert verify("sekrit", header, body) is True
    assert verify("sekrit", header, body.replace(b"b-1", b"b-2")) is False
    assert verify("wrong", header, body) is False
    assert verify("sekrit", signature("sekrit", body, int(time.time()) - 3600), body) is False  # replayed
    assert verify("sekrit", "garbage", body) is False


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_documented_typescript_verifier_accepts_the_service_signature(tmp_path: Path) -> None:
    source = _readme_block("typescript")
    # Type annotations off, so plain node runs it (the README's code is otherwise unchanged).
    javascript = re.sub(r"^export ", "", source, flags=re.M)
    javascript = re.sub(r": (string|boolean|Buffer|number)\b", "", javascript)
    javascript = javascript.replace('import { createHmac, timingSafeEqual } from "node:crypto";', "")
    body = '{"event":"room.ready","booking_id":"b-1"}'
    header = signature("sekrit", body.encode(), int(time.time()))
    script = tmp_path / "verify.js"
    script.write_text(
        'const { createHmac, timingSafeEqual } = require("node:crypto");\n'
        + javascript
        + "\nconst body = Buffer.from(process.argv[3]);\n"
        + "console.log(JSON.stringify([verifyRoomkeeperSignature('sekrit', process.argv[2], body),"
        + " verifyRoomkeeperSignature('wrong', process.argv[2], body),"
        + " verifyRoomkeeperSignature('sekrit', process.argv[2], Buffer.from(process.argv[3] + ' '))]));\n"
    )
    out = subprocess.run(["node", str(script), header, body], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [True, False, False]


# --------------------------------------------------------------------------------------------
# What history shows of a URL, and the retry rules.


def test_history_shows_no_query_string_or_credentials() -> None:
    assert (
        shown_url("https://hooks.example.com/rk/events?token=abc#x") == "https://hooks.example.com/rk/events"
    )
    assert shown_url("http://127.0.0.1:8080/h?k=1") == "http://127.0.0.1:8080/h"
    assert shown_url("https://u:p@example.com") == "https://example.com/"
    assert shown_url("https://[2606:4700::1111]:8443/x") == "https://[2606:4700::1111]:8443/x"
    assert receiver("https://A.example.com:8443/x?y") == receiver("https://a.example.com:8443/z")
    assert receiver("http://127.0.0.1:1/x") != receiver("http://127.0.0.1:2/x")


def test_backoff_doubles_with_jitter_and_is_capped_at_five_minutes() -> None:
    rng = random.Random(7)
    for attempts in range(1, 40):
        wait = delivery_rules.backoff(attempts, rng.random()).total_seconds()
        ceiling = min(300.0, 2.0 ** (attempts - 1))
        assert ceiling / 2 <= wait <= ceiling
    waits = {round(delivery_rules.backoff(12, rng.random()).total_seconds(), 3) for _ in range(20)}
    assert len(waits) > 10, "jitter spreads receivers' retries apart"


def test_retries_stop_at_the_window_and_the_last_one_lands_on_it() -> None:
    window = timedelta(hours=24)  # ROOMKEEPER_NOTIFY_RETRY_HOURS
    created = datetime(2030, 1, 1, tzinfo=UTC)

    def next_attempt(attempts: int, now: datetime) -> datetime | None:
        return delivery_rules.next_attempt(created, attempts, now, window, random.random())

    later = created + timedelta(hours=23, minutes=59, seconds=50)
    assert next_attempt(200, later) == created + timedelta(hours=24)
    assert next_attempt(200, created + timedelta(hours=24)) is None
    first = next_attempt(1, created)
    assert first is not None and timedelta(seconds=0.5) <= first - created <= timedelta(seconds=1)
    # Down for an hour: every attempt after it comes back is at most five minutes away.
    hour = created + timedelta(hours=1)
    retry = next_attempt(60, hour)
    assert retry is not None and retry - hour <= timedelta(minutes=5)


def test_delivery_slots_leave_room_work_its_share() -> None:
    slots = delivery._Slots(4)
    assert slots.acquire("a") and slots.acquire("a")
    assert not slots.acquire("a"), "one receiver takes at most half the delivery slots"
    assert slots.acquire("b") and slots.acquire("c")
    assert not slots.acquire("d"), "deliveries never take more than their slots"
    slots.release("a")
    assert slots.acquire("d")


# --------------------------------------------------------------------------------------------
# The request goes to the address that was checked (no DNS rebinding between check and connect).


def test_a_request_is_pinned_to_the_checked_address_keeping_host_and_tls_name() -> None:
    v4, v6 = ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("2606:4700::1111")
    assert pinned("https://hooks.example.com/a/b?t=1", v4) == (
        "https://1.1.1.1/a/b?t=1",
        {"Host": "hooks.example.com"},
        {"sni_hostname": "hooks.example.com"},
    )
    assert pinned("https://hooks.example.com:8443/x", v6) == (
        "https://[2606:4700::1111]:8443/x",
        {"Host": "hooks.example.com:8443"},
        {"sni_hostname": "hooks.example.com"},
    )
    # Listed hosts (None) and address literals go as they are.
    assert pinned("http://127.0.0.1:9/x", None) == ("http://127.0.0.1:9/x", {}, {})
    assert pinned("https://1.1.1.1/x", v4) == ("https://1.1.1.1/x", {}, {})


def _head(url: str) -> delivery.Head:
    now = datetime.now(UTC)
    body = '{"event":"room.ready","booking_id":"b-1","meeting":{},"occurred_at":"x"}'
    return delivery.Head(1, "d-1", "b-1", "room.ready", url, body, now, now, 0, None, None)


def test_post_connects_to_the_address_it_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["1.1.1.1", "127.0.0.1"])  # a rebinding name: public when checked, then loopback

    def getaddrinfo(host: str, *_: Any, **__: Any) -> list[Any]:
        assert host == "hooks.example.com"
        return [(2, 1, 6, "", (next(answers), 0))]

    seen: list[Any] = []

    def handler(request: Any) -> Any:
        seen.append(request)
        return httpx.Response(204)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    mocked = httpx.Client(transport=httpx.MockTransport(handler))
    monkeypatch.setattr(delivery, "_get_client", lambda: mocked)
    outcome = delivery.post(_head("https://hooks.example.com/in?token=t0k"), SIGNED)
    assert outcome.delivered and outcome.status == 204
    (request,) = seen
    assert request.url.host == "1.1.1.1" and request.url.query == b"token=t0k"
    assert request.headers["host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert verify_from_contract("s" * 32, request.headers["roomkeeper-signature"], request.content)
    # The next attempt resolves again, and refuses the loopback answer without connecting.
    refused_outcome = delivery.post(_head("https://hooks.example.com/in?token=t0k"), SIGNED)
    assert not refused_outcome.delivered and "refused: host 'hooks.example.com'" in refused_outcome.error
    assert len(seen) == 1
    delivery._reset()


@pytest.mark.parametrize(
    ("status", "delivered", "error"),
    [
        (200, True, ""),
        (202, True, ""),
        (301, False, "HTTP 301 (redirects are not followed)"),
        (410, False, "HTTP 410"),
    ],
)
def test_only_2xx_is_delivered_and_redirects_are_not_followed(
    monkeypatch: pytest.MonkeyPatch, status: int, delivered: bool, error: str
) -> None:
    calls: list[str] = []

    def handler(request: Any) -> Any:
        calls.append(str(request.url))
        return httpx.Response(status, headers={"Location": "http://127.0.0.1/elsewhere"})

    mocked = httpx.Client(transport=httpx.MockTransport(handler))
    monkeypatch.setattr(delivery, "_get_client", lambda: mocked)
    outcome = delivery.post(_head("https://1.1.1.1/in"), SIGNED)
    assert (outcome.delivered, outcome.error) == (delivered, error)
    assert calls == ["https://1.1.1.1/in"]
    delivery._reset()


def test_transport_errors_are_described_without_the_query_string(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: Any) -> Any:
        raise httpx.ConnectError(f"cannot reach {request.url}")

    mocked = httpx.Client(transport=httpx.MockTransport(handler))
    monkeypatch.setattr(delivery, "_get_client", lambda: mocked)
    outcome = delivery.post(_head("https://1.1.1.1/in?token=t0k"), SIGNED)
    assert not outcome.delivered
    assert outcome.error == "ConnectError: cannot reach https://1.1.1.1/in"
    delivery._reset()


def test_an_attempt_ends_after_the_total_timeout_and_keeps_its_slot_until_its_thread_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A receiver that drips its answer: every read inside httpx's timeout, the whole far beyond.
    answered = threading.Event()

    def dripping(head: delivery.Head, settings: Settings) -> delivery.Outcome:
        answered.wait(5)
        return delivery.Outcome(True, 200, "", 5.0)

    monkeypatch.setattr(delivery, "post", dripping)
    slots = delivery._Slots(2)
    assert slots.acquire("drip")
    released = threading.Event()

    def release() -> None:
        slots.release("drip")
        released.set()

    outcome, release_now = delivery._Attempt(_head("https://1.1.1.1/x"), SIGNED, release).run(0.2)
    assert (outcome.delivered, outcome.error, release_now) == (False, "no answer within 0.2s", False)
    assert slots.running == {"drip": 1}, "the slot stays taken while the request still runs"
    answered.set()
    assert released.wait(5) and slots.running == {}


def test_an_attempt_that_answers_in_time_is_returned_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "post", lambda head, settings: delivery.Outcome(True, 204, "", 0.01))
    outcome, release_now = delivery._Attempt(_head("https://1.1.1.1/x"), SIGNED, lambda: None).run(5)
    assert outcome.delivered and outcome.status == 204 and release_now


def test_the_rules_judge_a_url_without_resolving_its_name() -> None:
    # worker.rules.outbound decides from the URL and the settings alone (validation uses it); the
    # adapter's check adds what only the network can tell: the addresses a name resolves to.
    from worker.rules import outbound as rules

    assert rules.check_url("https://no-such-host.invalid/x", SIGNED) == "https://no-such-host.invalid/x"
    assert "does not resolve" in refused("https://no-such-host.invalid/x", SIGNED)
    for url in ("https://10.9.8.7/hook", "https://[::ffff:127.0.0.1]/hook", "http://1.1.1.1/hook"):
        with pytest.raises(rules.OutboundRefused) as caught:
            rules.check_url(url, SIGNED)
        assert str(caught.value) == refused(url, SIGNED)


def test_a_notify_url_whose_name_resolves_inside_is_refused_when_booked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The rules judge the text; every face passes the adapter's check, which resolves the name, so
    # a caller learns at booking (not at its first event) that its URL points inside.
    from tasks.meetings import schedule_meeting
    from tests.conftest import apply_settings
    from worker.jobs import batch

    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example.com":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    start = datetime.now(UTC) + timedelta(hours=1)
    booking = {
        "booking_id": "inside-1",
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=30)).isoformat(),
        "notify": {"url": "https://hooks.example.com/rooms"},
    }
    apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET="x" * 32)
    try:
        with pytest.raises(InvalidRequest, match=r"^notify\.url: .*10\.1\.2\.3"):
            schedule_meeting(**booking)
        (result,) = batch.schedule_many([booking])
        assert result["ok"] is False
        assert result["errors"][0]["field"] == "notify.url" and "10.1.2.3" in result["errors"][0]["rule"]
    finally:
        apply_settings(ROOMKEEPER_NOTIFY_SIGNING_SECRET=None)
