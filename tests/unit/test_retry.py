"""pipeline.retry: capped backoff with jitter, one log line per outage, retried calls."""

from __future__ import annotations

import logging

import pytest
import redis

from pipeline.retry import Backoff, Outage, retry_call, retrying

pytestmark = pytest.mark.unit

log = logging.getLogger("test.retry")


def test_backoff_doubles_up_to_its_cap_within_the_jitter() -> None:
    backoff = Backoff(initial_s=0.1, max_s=5.0, jitter=0.2)
    for attempt, base in [(0, 0.1), (1, 0.2), (3, 0.8), (6, 5.0), (100, 5.0)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert min(delays) >= base * 0.8 - 1e-12
        assert max(delays) <= base * 1.2 + 1e-12
        assert max(delays) > min(delays)  # jittered


def test_an_outage_logs_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = Outage("redis at h:1", log, Backoff(initial_s=0.0, max_s=0.0))
    failures = iter([redis.ConnectionError("refused")] * 3)

    def call() -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return "ok"

    recovered: list[bool] = []
    with caplog.at_level(logging.WARNING, logger="test.retry"):
        assert retry_call(call, outage, on_recover=lambda: recovered.append(True)) == "ok"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("redis at h:1 unreachable (ConnectionError: refused)")
    assert lines[1].startswith("redis at h:1 back after") and "(3 tries)" in lines[1]
    assert recovered == [True]
    assert outage.outages == 1 and not outage.down


def test_retry_call_gives_up_after_its_bound_and_passes_other_errors() -> None:
    outage = Outage("redis at h:1", log, Backoff(initial_s=0.01, max_s=0.01))

    def refused() -> None:
        raise redis.ConnectionError("refused")

    with pytest.raises(redis.ConnectionError):
        retry_call(refused, outage, give_up_s=0.05)

    def wrong() -> None:
        raise redis.ResponseError("WRONGTYPE")

    with pytest.raises(redis.ResponseError):  # not an outage: never retried
        retry_call(wrong, Outage("x", log))


def test_retrying_retries_every_method_of_its_target() -> None:
    class Flaky:
        calls = 0
        name = "flaky"

        def read(self, x: int) -> int:
            self.calls += 1
            if self.calls < 3:
                raise redis.TimeoutError("timed out")
            return x * 2

    target = Flaky()
    wrapped = retrying(target, Outage("redis", log, Backoff(initial_s=0.0, max_s=0.0)))
    assert wrapped.read(21) == 42
    assert target.calls == 3
    assert wrapped.name == "flaky"


def test_a_refused_password_is_raised_at_once_not_retried_as_an_outage() -> None:
    outage = Outage("redis at h:1", log, Backoff(initial_s=0.0, max_s=0.0))
    calls: list[int] = []

    def refused() -> None:
        calls.append(1)
        raise redis.AuthenticationError("invalid username-password pair")

    with pytest.raises(redis.AuthenticationError):
        retry_call(refused, outage)
    assert calls == [1] and not outage.down
