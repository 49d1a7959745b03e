"""The one settings object: every environment variable of CONTRACT §3 (and a few documented extras)."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_WHEREBY_API_URL = "https://api.whereby.dev/v1"
# The key the bundled sandbox accepts unless told otherwise; used when the API URL is not Whereby's.
SANDBOX_API_KEY = "sandbox-key"
_WHEREBY_HOSTS = ("whereby.dev", "whereby.com")


class SettingsError(SystemExit):
    """Raised at start-up when a variable is invalid; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROOMKEEPER_", extra="ignore", frozen=True)

    whereby_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("WHEREBY_API_KEY"))
    whereby_api_url: str = Field(
        default=DEFAULT_WHEREBY_API_URL, validation_alias=AliasChoices("WHEREBY_API_URL")
    )
    broker_url: str = "redis://localhost:6379/0"
    result_backend: str | None = None
    database_url: str = "sqlite:///var/roomkeeper.db"
    queue: str = "rooms"
    create_lead_seconds: float = Field(default=900, ge=0)
    delete_grace_seconds: float = Field(default=0, ge=0)
    dispatch_interval_seconds: float = Field(default=15, gt=0, le=3600)
    reconcile_interval_seconds: float = Field(default=300, gt=0)
    api_points_per_minute: int = Field(default=100, ge=0)
    room_prefix: str = "rk"
    flower_basic_auth: str | None = Field(default=None, validation_alias=AliasChoices("FLOWER_BASIC_AUTH"))
    web_port: int = Field(default=8000, ge=1, le=65535)
    whereby_webhook_secret: SecretStr | None = None
    overrun_max_seconds: float = Field(default=0, ge=0, le=86400)
    rejoin_grace_seconds: float = Field(default=120, ge=0, le=86400)
    notify_signing_secret: SecretStr | None = None
    # Comma-separated host names (or IP addresses) that notify URLs and feeds may name besides
    # public https hosts.
    outbound_allowed_hosts: str | None = None
    # Encrypts the CalDAV passwords feeds keep: a Fernet key (Fernet.generate_key()).
    # Without it a feed's password can only come from an environment variable (--password-env).
    secret_key: SecretStr | None = None

    # Extensions beyond the contract (documented in the README).
    max_attempts: int = Field(default=8, ge=1, le=100)
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    task_time_limit_seconds: int = Field(default=60, ge=1)
    # A running task renews its claim every third of this; a dead one loses it this long after.
    # A dispatched item not started by this long past the dispatch window is sent again.
    claim_lease_seconds: float = Field(default=4, ge=1, le=600)
    # How often beat looks for due work whose worker died or whose message was lost.
    recover_interval_seconds: float = Field(default=2, gt=0, le=3600)
    whereby_timeout_seconds: float = Field(default=10.0, gt=0)
    # The work waits on Whereby's HTTP replies, not the CPU: threads serve it best.
    worker_pool: str = Field(default="threads", pattern=r"^(threads|prefork|solo)$")
    worker_concurrency: int = Field(default=16, ge=1, le=512)
    # Without webhooks, while Whereby reports an ongoing session past a meeting's end, ask again
    # this often (each ask spends points from the shared budget).
    overrun_poll_seconds: float = Field(default=60, gt=0, le=3600)
    # How often beat polls each calendar feed (CONTRACT §5).
    feed_poll_interval_seconds: float = Field(default=300, gt=0, le=86400)
    # How long an event to a notify URL is tried before it is recorded as undelivered.
    notify_retry_hours: float = Field(default=24, gt=0, le=168)
    # What a token holder may make the service do (README "What a token holder can and cannot do").
    # Tasks an HTTP caller may name as its `notify` ("task" on any queue, or "task@queue"), comma-
    # separated; none by default: over HTTP, events go to a URL (CONTRACT §6.2).
    http_notify_tasks: str | None = None
    # Ports a public host may be reached on (hosts in ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS: any port).
    outbound_public_ports: str = "443,8443"
    # How many feeds the service keeps, and how long one feed's sync may take before it gives up
    # (changing nothing): bounds in every pool and in the web process.
    feed_max_count: int = Field(default=100, ge=1, le=100_000)
    feed_sync_deadline_seconds: float = Field(default=20, ge=1, le=600)
    # Retention (worker/jobs/retention.py): finished bookings whose end is older than this many days go,
    # with everything recorded about them; delivered events (outbox and event_delivery rows) after
    # the second. 0 keeps them forever. Beat prunes every prune_interval_seconds.
    retention_days: int = Field(default=90, ge=0, le=36_500)
    delivered_retention_days: int = Field(default=30, ge=0, le=36_500)
    prune_interval_seconds: float = Field(default=600, gt=0, le=86_400)

    @field_validator(
        "whereby_api_key",
        "result_backend",
        "flower_basic_auth",
        "whereby_webhook_secret",
        "notify_signing_secret",
        "outbound_allowed_hosts",
        "secret_key",
        "http_notify_tasks",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose and shells pass "" for a variable that is declared but not given.
        return None if value == "" else value

    @field_validator("secret_key")
    @classmethod
    def _fernet_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from cryptography.fernet import Fernet

            try:
                Fernet(value.get_secret_value())
            except ValueError:
                raise ValueError(
                    "must be a Fernet key: 32 url-safe base64-encoded bytes (python -c "
                    "'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
                ) from None
        return value

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss"):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value

    @field_validator("whereby_api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme == "sqlite" or scheme.startswith("postgresql") or scheme == "postgres":
            return value
        raise ValueError("must be a sqlite:/// or postgresql:// URL")

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", value):
            raise ValueError("must be 1-100 characters of letters, digits, '_', '.', ':' or '-'")
        return value

    @field_validator("room_prefix")
    @classmethod
    def _room_prefix(cls, value: str) -> str:
        # Short, so the caller's own prefix still fits within Whereby's 39 characters.
        if not re.fullmatch(r"[a-z0-9]{1,8}", value):
            raise ValueError("must be 1-8 characters of [a-z0-9]")
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _basic_auth(cls, value: str | None) -> str | None:
        if value is not None and value != "" and not re.fullmatch(r"[^:,]+:[^,]+", value):
            raise ValueError("must be user:password")
        return value or None

    @field_validator("outbound_allowed_hosts")
    @classmethod
    def _hosts(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for host in (part.strip() for part in value.split(",")):
            if not re.fullmatch(r"[A-Za-z0-9.:\[\]-]{1,253}", host):
                raise ValueError(f"{host!r} is not a host name or IP address (comma-separated list)")
        return value

    @field_validator("http_notify_tasks")
    @classmethod
    def _notify_tasks(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for entry in (part.strip() for part in value.split(",")):
            if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}(@[A-Za-z0-9_.:-]{1,200})?", entry):
                raise ValueError(f"{entry!r} is not a task name or task@queue (comma-separated list)")
        return value

    @field_validator("outbound_public_ports")
    @classmethod
    def _ports(cls, value: str) -> str:
        for part in (p.strip() for p in value.split(",")):
            if not part.isascii() or not part.isdigit() or not 1 <= int(part) <= 65535:
                raise ValueError(f"{part!r} is not a port number (comma-separated list, e.g. 443,8443)")
        return value

    @property
    def public_ports(self) -> frozenset[int]:
        """ROOMKEEPER_OUTBOUND_PUBLIC_PORTS as a set of ports."""
        return frozenset(int(part) for part in self.outbound_public_ports.split(","))

    def http_notify_allowed(self, task: str, queue: str) -> bool:
        """Whether an HTTP caller may have events sent as `task` to `queue`."""
        entries = {part.strip() for part in (self.http_notify_tasks or "").split(",") if part.strip()}
        return task in entries or f"{task}@{queue}" in entries

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """ROOMKEEPER_OUTBOUND_ALLOWED_HOSTS as a set of lower-case host names, brackets stripped."""
        if not self.outbound_allowed_hosts:
            return frozenset()
        return frozenset(
            part.strip().lower().strip("[]")
            for part in self.outbound_allowed_hosts.split(",")
            if part.strip()
        )

    @property
    def webhooks_enabled(self) -> bool:
        """Whereby's webhooks tell who is in each room (CONTRACT §4.3)."""
        return self.whereby_webhook_secret is not None

    @model_validator(mode="after")
    def _retry_bounds(self) -> Settings:
        # The Whereby key is not checked here: commands that only read the store (`show`, `list`,
        # `failed`) need none. Processes that call Whereby check it with require_whereby_key().
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("ROOMKEEPER_RETRY_MAX_SECONDS must be >= ROOMKEEPER_RETRY_BASE_SECONDS")
        return self

    @property
    def is_real_whereby(self) -> bool:
        host = urlsplit(self.whereby_api_url).hostname or ""
        return any(host == h or host.endswith("." + h) for h in _WHEREBY_HOSTS)

    def require_whereby_key(self) -> Settings:
        """Stop a process that will call Whereby when it has no key for it (SettingsError naming
        WHEREBY_API_KEY). Run at the start of the worker and beat, and by `api_key`."""
        if self.whereby_api_key is None and self.is_real_whereby:
            raise SettingsError(
                "roomkeeper: invalid settings: WHEREBY_API_KEY is required when WHEREBY_API_URL points "
                f"at Whereby ({self.whereby_api_url})"
            )
        return self

    @property
    def api_key(self) -> str:
        """The bearer key; the sandbox's own key when pointed at anything but Whereby.

        Pointed at Whereby without a key it raises (require_whereby_key) rather than send the
        sandbox's key: whoever builds a Whereby client stops there, naming WHEREBY_API_KEY."""
        if self.whereby_api_key is not None:
            return self.whereby_api_key.get_secret_value()
        self.require_whereby_key()
        return SANDBOX_API_KEY

    @property
    def hard_time_limit_seconds(self) -> int:
        return self.task_time_limit_seconds + max(2, self.task_time_limit_seconds // 4)

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def room_tag_length(self) -> int:
        """Characters of the room-name prefix the service itself uses: "<prefix>-<5-char deployment
        identity>-<8-char tag>-" (see worker/store/deployment.py)."""
        return len(self.room_prefix) + 16

    @property
    def caller_prefix_max(self) -> int:
        return 39 - self.room_tag_length


_ENV_NAMES = {
    "whereby_api_key": "WHEREBY_API_KEY",
    "whereby_api_url": "WHEREBY_API_URL",
    "flower_basic_auth": "FLOWER_BASIC_AUTH",
}


def env_name(field: str) -> str:
    """The variable behind a field; fields read through an alias are reported under the alias."""
    if field in _ENV_NAMES.values():
        return field
    return _ENV_NAMES.get(field, f"ROOMKEEPER_{field.upper()}")


def load_settings() -> Settings:
    """Read the environment; an invalid value stops the process with a message naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [str(part) for part in error["loc"]]
            message = error["msg"].removeprefix("Value error, ")
            if loc:
                problems.append(f"{env_name(loc[0])}: {message}")
            else:
                problems.append(message)
        raise SettingsError("roomkeeper: invalid settings: " + "; ".join(problems)) from None


def whereby_unconfigured() -> bool:
    """Neither a Whereby key nor an API URL is set: `make run` then brings the sandbox along."""
    return not os.environ.get("WHEREBY_API_KEY") and not os.environ.get("WHEREBY_API_URL")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()
