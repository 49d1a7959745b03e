"""Whereby's point budget, shared by every worker process through Redis."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis

from config.settings import get_settings
from worker.adapters import whereby
from worker.runtime import resources

log = logging.getLogger(__name__)

WINDOW_MS = 60_000
# Creations and reads may spend only this share of the budget; the rest is kept for deletions,
# so ended rooms are deleted first when the budget runs short.
ORDINARY_SHARE = 0.8
# When a pause ends and deletions were held back by it, they get the budget to themselves for
# this long before creations and reads resume, so ended rooms are not queued behind creations.
DELETE_HEAD_START_MS = 3_000

# A sliding 60-second window over a sorted set of "id:points" scored by Redis's own clock, so
# workers on different hosts agree on time. Spending at most the budget in ANY 60 s window is
# safe whether Whereby counts fixed clock minutes or a sliding window (a token bucket is not).
# Returns 0 when the points were spent, else the milliseconds to wait (negative: a pause).
# A limit below zero keeps no budget but still honours a pause. A deletion held back by a pause
# marks that deletions are waiting; while they are, creations and reads resume `head` ms after
# the pause ends, so the deletions go first.
_ACQUIRE = """
local window, limit, points, member = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local head, deleting = tonumber(ARGV[5]), ARGV[6] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now and deleting then
  redis.call('SET', KEYS[3], '1', 'PX', paused - now + head)
  return now - paused
end
if paused > 0 and not deleting then
  local behind = 0
  if redis.call('EXISTS', KEYS[3]) == 1 then behind = head end
  if paused + behind > now then return now - (paused + behind) end
end
if limit < 0 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local used = 0
for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], ':(%d+)$')) end
if used + points <= limit then
  redis.call('ZADD', KEYS[1], now, member .. ':' .. points)
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local need, freed = used + points - limit, 0
for i = 1, #entries, 2 do
  freed = freed + tonumber(string.match(entries[i], ':(%d+)$'))
  if freed >= need then return math.max(1, tonumber(entries[i + 1]) + window - now) end
end
return window
"""

_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
if until_ms > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + tonumber(ARGV[2]))
end
return until_ms
"""


class BudgetExhausted(whereby.RateLimitedError):
    """Our own limiter refused a call: Whereby was not asked, and the work waits its turn."""

    def __init__(self, retry_after: float, paused: bool = False) -> None:
        if paused:
            message = f"Whereby calls are paused after a 429 or 401; next call in {retry_after:.1f}s"
        else:
            message = f"Whereby point budget spent; next call in {retry_after:.1f}s"
        super().__init__(message, status_code=None, retry_after=retry_after)


class Budget:
    def __init__(
        self,
        redis_url: str,
        points_per_minute: int,
        prefix: str = "roomkeeper",
        window_ms: int = WINDOW_MS,
        head_start_ms: int = DELETE_HEAD_START_MS,
    ) -> None:
        self.limit = points_per_minute
        self.window_ms = window_ms
        self.head_start_ms = head_start_ms
        self.client = redis.Redis.from_url(redis_url)
        self.keys = [f"{prefix}:budget:window", f"{prefix}:budget:paused", f"{prefix}:budget:deletes-waiting"]
        self._acquire = self.client.register_script(_ACQUIRE)
        self._pause = self.client.register_script(_PAUSE)

    def acquire(self, method: str, points: int) -> None:
        """Spend `points` for one call, or raise BudgetExhausted with how long to wait."""
        deleting = method == "DELETE"
        if self.limit <= 0:
            limit = -1  # no budget to keep, but a pause still holds every worker back
        else:
            limit = self.limit if deleting else max(points, int(self.limit * ORDINARY_SHARE))
        args = [self.window_ms, limit, points, uuid.uuid4().hex, self.head_start_ms, int(deleting)]
        wait_ms = int(self._acquire(keys=self.keys, args=args))
        if wait_ms != 0:
            raise BudgetExhausted(abs(wait_ms) / 1000, paused=wait_ms < 0)

    def pause(self, seconds: float, why: str = "Whereby rate limit hit") -> None:
        """Stop every worker's Whereby calls for a while: after a 429 (another app spends the same
        budget) or a 401 (a bad key would only burn attempts)."""
        self._pause(keys=self.keys[1:2], args=[max(1, int(seconds * 1000)), self.head_start_ms])
        log.warning("%s: every worker pauses Whereby calls for %.1fs", why, seconds)

    def spent(self) -> int:
        total = 0
        for member in self.client.zrange(self.keys[0], 0, -1):
            total += int(member.rsplit(b":", 1)[1])
        return total

    def close(self) -> None:
        self.client.close()


def _make_budget() -> Budget:
    settings = get_settings()
    return Budget(settings.broker_url, settings.api_points_per_minute)


def get_budget() -> Budget:
    """This process's client of the shared budget (owned by worker.runtime.resources)."""
    return resources.own("point budget", _make_budget, Budget.close)


def before_request(method: str, points: int, *_: Any) -> None:
    get_budget().acquire(method, points)
