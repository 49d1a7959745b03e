"""Routes of the web process: health (placeholder until built)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
