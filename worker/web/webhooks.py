"""Routes of the web process: webhooks (placeholder until built)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
