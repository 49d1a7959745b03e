"""Bearer tokens for `/v1` (CONTRACT §4.2): a FastAPI dependency. Placeholder until built."""

from __future__ import annotations

from fastapi import HTTPException, Request


async def require_token(request: Request) -> str:
    """The name of the caller's token; 401 (problem+json) without a valid one."""
    raise HTTPException(status_code=401, detail="a valid bearer token is required")
