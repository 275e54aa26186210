"""Riding out an outage of Redis or the broker: capped exponential backoff with jitter.

Every role calls Redis through :func:`retry_call` (or keeps an :class:`Outage` of its
own): while the dependency is away it waits 0.1 s, 0.2 s, ... up to 5 s between
tries (each delay jittered by +-20 %), logs one line when the outage starts and one
when it ends ("redis at X back after N s"), and resumes by itself. Only calls that
are safe to repeat go through here; a push is made idempotent first
(:mod:`pipeline.ps.client`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

__all__ = ["Backoff", "Outage", "Retrying", "redis_errors", "redis_where", "retry_call", "retrying"]

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays between tries: ``initial_s`` doubling up to ``max_s``, +-``jitter``."""

    initial_s: float = 0.1
    max_s: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        """The delay before try ``attempt + 1`` (attempt counts from 0)."""
        base = min(self.max_s, self.initial_s * self.factor ** min(attempt, 64))
        return base * (1.0 + self.jitter * (2.0 * random.random() - 1.0))


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis outage raises (refused, reset, timed out, loading, cluster down)."""
    import redis
    from redis.exceptions import ClusterDownError, TryAgainError

    return (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError)


def is_refusal(exc: BaseException) -> bool:
    """Redis answered and refused us (wrong password, ACL): not an outage, never retried.

    redis-py derives ``AuthenticationError`` from ``ConnectionError``; retrying it would
    hide a changed password behind "unreachable" log lines forever.
    """
    from redis.exceptions import AuthenticationError, AuthorizationError

    return isinstance(exc, (AuthenticationError, AuthorizationError))


def redis_where(client: Any) -> str:
    """``host:port`` of a Redis client, for log lines (never its password)."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if kwargs:
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
    manager = getattr(client, "nodes_manager", None)  # redis.RedisCluster
    nodes = list(getattr(manager, "startup_nodes", {}).values())
    if nodes:
        return ",".join(f"{n.host}:{n.port}" for n in nodes[:3])
    return "?"


class Outage:
    """The state of one dependency (``what``, e.g. "redis at 127.0.0.1:6379") for one role.

    :meth:`failed` on each failed try (logs the first), :meth:`ok` after a success
    (logs the end of an outage and returns True then). Thread-safe.
    """

    def __init__(self, what: str, log: logging.Logger, backoff: Backoff | None = None) -> None:
        self.what = what
        self.log = log
        self.backoff = backoff or Backoff()
        self.since: float | None = None
        self.attempts = 0
        self.outages = 0  # outages ridden out so far
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> float:
        """Record a failed try; the delay before the next one."""
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                self.attempts = 0
                self.log.warning(
                    "%s unreachable (%s: %s), retrying with backoff up to %g s",
                    self.what,
                    type(exc).__name__,
                    exc,
                    self.backoff.max_s,
                )
            delay = self.backoff.delay(self.attempts)
            self.attempts += 1
            return delay

    def ok(self) -> bool:
        """Record a success; True when it ended an outage."""
        if self.since is None:
            return False
        with self._lock:
            if self.since is None:
                return False
            self.log.warning(
                "%s back after %.1f s (%d tries)",
                self.what,
                time.monotonic() - self.since,
                self.attempts,
            )
            self.since = None
            self.outages += 1
            return True

    def elapsed_s(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since


def retry_call(
    fn: Callable[[], T],
    outage: Outage,
    *,
    errors: tuple[type[BaseException], ...] | None = None,
    give_up_s: float | None = None,
    stop: threading.Event | None = None,
    on_recover: Callable[[], None] | None = None,
) -> T:
    """``fn()``, retried with backoff while it raises one of ``errors`` (Redis outages).

    Raises the last error once the outage lasted ``give_up_s`` (None: never) or ``stop``
    is set. ``on_recover`` runs after the first success that ends an outage.
    """
    caught = errors if errors is not None else redis_errors()
    while True:
        try:
            out = fn()
        except caught as exc:
            if is_refusal(exc):
                raise
            delay = outage.failed(exc)
            if give_up_s is not None and outage.elapsed_s() >= give_up_s:
                outage.log.error("%s away for %.0f s: giving up", outage.what, outage.elapsed_s())
                raise
            if stop is not None:
                if stop.wait(delay):
                    raise
            else:
                time.sleep(delay)
            continue
        if outage.ok() and on_recover is not None:
            on_recover()
        return out


class Retrying:
    """Calls every method of ``target`` through :func:`retry_call` (for objects whose
    methods are all safe to repeat: metrics sinks, heartbeats, reads)."""

    def __init__(self, target: Any, outage: Outage) -> None:
        self._target = target
        self._outage = outage

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            return retry_call(lambda: value(*args, **kwargs), self._outage)

        return call


def retrying(target: T, outage: Outage) -> T:
    """``target`` with every method call retried through an outage (see :class:`Retrying`)."""
    return cast(T, Retrying(target, outage))
