"""What the face's answer models share: an instant, passed through as the views write it."""

from __future__ import annotations

from typing import Annotated

from pydantic import WithJsonSchema

# The view's own text (worker/rules/lifecycle.fmt: UTC, a Z, milliseconds only when there are
# some), described as a date-time. Read as a datetime, a model would write it again otherwise
# (with microseconds), and the answer would no longer be the view.
Instant = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
