"""Bearer tokens for `/v1` (CONTRACT §4.2): a FastAPI dependency that names the caller's token.

Anything but a live token made by `roomkeeper tokens create` is answered 401 (problem+json, with
`WWW-Authenticate: Bearer`) before the route runs, so a refused call does nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from worker.faces.web.problems import MEDIA_TYPE, Problem
from worker.store import tokens

# auto_error=False: a missing header is ours to answer, as problem+json like every other 401.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="A token made with `roomkeeper tokens create NAME` (shown once, stored hashed).",
)

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {
        "model": Problem,
        "content": {MEDIA_TYPE: {}},
        "description": "no valid bearer token (missing, malformed, unknown or revoked): nothing was done",
    }
}


def _refuse(why: str) -> HTTPException:
    return HTTPException(status_code=401, detail=why, headers={"WWW-Authenticate": "Bearer"})


async def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> str:
    """The name of the caller's token; 401 (problem+json) without a valid one."""
    if credentials is None:
        raise _refuse("a valid bearer token is required (Authorization: Bearer TOKEN)")
    name = await run_in_threadpool(tokens.authenticate, credentials.credentials)
    if name is None:
        # One answer for malformed, unknown and revoked: the caller learns nothing about the store.
        raise _refuse("the bearer token is not valid")
    request.state.token_name = name
    return name
