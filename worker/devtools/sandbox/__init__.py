"""In-memory stand-in for Whereby's /v1/meetings API, served over real HTTP for the demo, tests and bench.

One job per module:

- ``wire``: Reply, BadRequest and Whereby's timestamp format, shared by the rest.
- ``config``: SandboxConfig, the TUNABLE settings and their checks.
- ``rooms``: the in-memory rooms and the create/get/list/delete endpoints over them, with expiry.
- ``budget``: the points-per-minute window and the 429 it earns.
- ``faults``: the fault script and the seeded random faults.
- ``participants``: who is in each room, the sessions they make and the events joins and leaves cause.
- ``webhooks``: the signed webhooks, sent from a background thread with seeded drops, repeats, delays.
- ``state``: Sandbox, one lock over the above, the /v1 dispatch (meetings and insights), the call
  log and the admin operations.
- ``api``: the /v1 HTTP route.
- ``admin``: the /_sandbox HTTP routes and SandboxAdmin, their client.
- ``server``: create_app, SandboxServer (background thread) and serve (foreground).
"""

from __future__ import annotations

from worker.devtools.sandbox.admin import SandboxAdmin
from worker.devtools.sandbox.config import TUNABLE, SandboxConfig
from worker.devtools.sandbox.server import SandboxServer, create_app, serve
from worker.devtools.sandbox.state import Sandbox
from worker.devtools.sandbox.wire import BadRequest, Reply

__all__ = [
    "TUNABLE",
    "BadRequest",
    "Reply",
    "Sandbox",
    "SandboxAdmin",
    "SandboxConfig",
    "SandboxServer",
    "create_app",
    "serve",
]
