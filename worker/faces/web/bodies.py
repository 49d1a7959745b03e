"""Request bodies read with a bound: the declared Content-Length first, then the bytes as they stream.

Every route that reads a body reads it here, after it has authenticated the caller (a router
dependency, or a signature header's shape), so an unauthenticated caller cannot make the process
hold more than a route's limit, and a body nested deeper than anything the service stores is
refused before a recursive walk could trip on it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from worker.faces.web.problems import Refused
from worker.rules.validation import InvalidRequest

# Deeper than any body the service takes (metadata included) and far below Python's recursion limit.
MAX_DEPTH = 32


def _too_large(limit: int) -> Refused:
    return Refused(413, "Payload Too Large", f"the body is larger than {limit} bytes")


def declared_too_large(request: Request, limit: int) -> bool:
    """Whether the body's Content-Length alone is over `limit` (nothing read yet)."""
    declared = request.headers.get("content-length", "").strip()
    return declared.isascii() and declared.isdigit() and int(declared[:20]) > limit


async def read(request: Request, limit: int) -> bytes:
    """The raw body, at most `limit` bytes; Refused (413) as soon as it is known to be larger."""
    if declared_too_large(request, limit):
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` nests objects and arrays deeper than `limit` (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(raw: bytes) -> Any:
    """JSON as the service takes it: no NaN or Infinity (PostgreSQL's json type refuses them), and
    no nesting deeper than MAX_DEPTH. ValueError otherwise."""
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    if too_deep(value):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return value


async def json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read with `read` and parsed with `parse_json`; InvalidRequest
    (`body`) if it is not one."""
    raw = await read(request, limit)
    try:
        # A large body takes tens of milliseconds to parse: not on the event loop.
        data = await run_in_threadpool(parse_json, raw) if len(raw) > 64 * 1024 else parse_json(raw)
    except ValueError as exc:
        deep = "nested deeper" in str(exc)
        rule = (
            f"must be a JSON object ({exc})"
            if deep
            else "must be a JSON object (this body is not valid JSON)"
        )
        raise InvalidRequest([("body", rule)]) from None
    if not isinstance(data, dict):
        raise InvalidRequest([("body", "must be a JSON object")])
    return data
