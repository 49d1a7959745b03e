"""The one `t=…,v1=HMAC` implementation (worker/adapters/signing.py): what it signs, what it refuses.

Checked against an HMAC computed here, the way a receiver would, so a change to the format fails."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from worker.adapters import signing
from worker.adapters.signing import BadSignature

SECRET = "s" * 32
BODY = b'{"event":"room.ready","booking_id":"b-1"}'
AT = 4_000_000_000
NAME = "Test-Signature"


def expected(secret: str, stamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()


def test_the_signature_is_hmac_sha256_of_the_timestamp_and_the_raw_body() -> None:
    assert signing.signature(SECRET, BODY, AT) == f"t={AT},v1={expected(SECRET, str(AT), BODY)}"


def test_a_signature_verifies_within_the_tolerance_either_way() -> None:
    header = signing.signature(SECRET, BODY, AT)
    for now in (AT, AT - 300, AT + 300, AT + 299.9):
        signing.verify(SECRET, BODY, header, now, name=NAME)


@pytest.mark.parametrize(
    ("secret", "body", "now", "why"),
    [
        ("t" * 32, BODY, AT, "does not match the body"),  # another secret
        (SECRET, BODY + b" ", AT, "does not match the body"),  # another body
        (SECRET, BODY, AT + 301, "outside the 5 minute tolerance"),  # a replay
        (SECRET, BODY, AT - 301, "outside the 5 minute tolerance"),  # from the future
    ],
)
def test_a_signature_is_refused(secret: str, body: bytes, now: float, why: str) -> None:
    header = signing.signature(SECRET, BODY, AT)
    with pytest.raises(BadSignature, match=why) as refused:
        signing.verify(secret, body, header, now, name=NAME)
    assert str(refused.value).startswith(NAME)


def test_any_of_several_v1_signatures_may_match_and_hex_case_does_not_matter() -> None:
    good = expected(SECRET, str(AT), BODY)
    header = f"t={AT}, v1={'0' * 64}, v1={good.upper()}"
    signing.verify(SECRET, BODY, header, AT, name=NAME)


def test_the_tolerance_is_the_callers() -> None:
    header = signing.signature(SECRET, BODY, AT)
    signing.verify(SECRET, BODY, header, AT + 3000, name=NAME, tolerance=3600)
    with pytest.raises(BadSignature, match="outside the 1 minute tolerance"):
        signing.verify(SECRET, BODY, header, AT + 61, name=NAME, tolerance=60)


ODD_HEADERS = [
    None,
    "",
    "t=",
    "v1=" + "a" * 64,
    f"t={AT}",
    f"t={AT},v1=" + "a" * 63,
    f"t={AT},v1=" + "g" * 64,
    f"t={AT},v0=" + "a" * 64,
    "t=-1,v1=" + "a" * 64,
    "t=1e9,v1=" + "a" * 64,
    "t=" + "9" * 13 + ",v1=" + "a" * 64,
    f"t={AT},v1=" + "a" * 64 + "," * 3000,
    "t=\u0661\u0662\u0663,v1=" + "a" * 64,  # digits that are not ASCII
    "t=\x00,v1=\x00",
    ",,,,==,=",
]


@pytest.mark.parametrize("header", ODD_HEADERS)
def test_a_header_of_any_other_shape_is_refused_as_such_never_another_error(header: str | None) -> None:
    with pytest.raises(BadSignature) as refused:
        signing.verify(SECRET, BODY, header, AT, name=NAME)
    assert str(refused.value).startswith(NAME)
    assert "tolerance" not in str(refused.value) and "match" not in str(refused.value)
