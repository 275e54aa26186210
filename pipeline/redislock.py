"""A single-holder lease in Redis (SET NX PX + token-checked refresh and release).

Roles that must run as one active instance (the publisher of a model, the snapshot
coordinator of a series) hold one. The lease expires after ``ttl_ms`` unless its
holder refreshes it, so a crashed holder frees it; only the token that set it can
refresh or delete it, so a late holder never steals or drops another's lease.
"""

from __future__ import annotations

import uuid
from typing import Any

__all__ = ["RedisLock"]

_REFRESH_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLock:
    """The lease ``key``, held by this object's token.

    The token is random unless ``holder`` names a stable identity: a holder restarted
    under the same name (a supervisor restarting a crashed process) takes its lease
    back at once instead of waiting ``ttl_ms`` for it to expire.
    """

    def __init__(self, client: Any, key: bytes, ttl_ms: int, holder: str | None = None) -> None:
        self.redis = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = f"holder:{holder}" if holder else uuid.uuid4().hex

    def acquire(self) -> bool:
        """Take the lease, or refresh it when it is already ours; False if someone else holds it."""
        if self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return True
        return bool(self.redis.eval(_REFRESH_SCRIPT, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> None:
        """Drop the lease if it is still ours."""
        self.redis.eval(_RELEASE_SCRIPT, 1, self.key, self.token)
