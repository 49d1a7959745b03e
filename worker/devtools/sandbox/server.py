"""The sandbox app and how it runs: create_app, SandboxServer (background thread), serve (foreground)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from types import TracebackType
from typing import Self

import uvicorn
from starlette.applications import Starlette

from worker.devtools.sandbox import admin, api
from worker.devtools.sandbox.config import SandboxConfig
from worker.devtools.sandbox.state import Sandbox

# The stall fault keeps a request open for stall_seconds; stopping must not wait that long.
GRACEFUL_SHUTDOWN_SECONDS = 1


def create_app(config: SandboxConfig | None = None) -> Starlette:
    """The ASGI app; ``app.state.sandbox`` is its Sandbox."""
    app = Starlette(routes=[*api.ROUTES, *admin.ROUTES])
    app.state.sandbox = Sandbox(config)
    return app


def _base(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _answers(url: str) -> bool:
    # urllib, not httpx: an httpx client loads a TLS context this plain-HTTP probe never uses.
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class SandboxServer:
    """Runs the app with uvicorn in a background thread on 127.0.0.1 and a free port (for tests/bench)."""

    def __init__(
        self,
        config: SandboxConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.app = create_app(config)
        self.sandbox: Sandbox = self.app.state.sandbox
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self._origin() + "/v1"

    @property
    def admin_url(self) -> str:
        return self._origin() + "/_sandbox"

    def _origin(self) -> str:
        if not self.port:
            raise RuntimeError("the sandbox has no port until start()")
        return _base(self.host, self.port)

    def start(self, timeout: float = 10.0) -> SandboxServer:
        if self._thread is not None:
            raise RuntimeError("the sandbox server is already running")
        # Binding here, not in uvicorn, tells us the free port before anyone asks for the URL.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say they are TCP,
        # and without it every small reply waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            )
        )
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name="whereby-sandbox",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while True:
            if not thread.is_alive():
                sock.close()
                self._server = self._thread = None
                raise RuntimeError("the sandbox server failed to start")
            if server.started and _answers(self.admin_url + "/health"):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the sandbox server did not answer in time")
            time.sleep(0.01)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=GRACEFUL_SHUTDOWN_SECONDS + 2)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=2)
        self._server = self._thread = None
        self.sandbox.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(config: SandboxConfig, host: str, port: int) -> None:
    """Serves the sandbox in the foreground until SIGINT/SIGTERM (uvicorn shuts down gracefully)."""
    app = create_app(config)
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="info",
            # The sandbox keeps its own call log; uvicorn's access log would only duplicate it.
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
    finally:
        # The webhook sender's thread must not outlive the server.
        app.state.sandbox.close()
