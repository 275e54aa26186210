"""kill -9 of every role once, restarted as a supervisor would: nothing lost, exact counts.

One run of the whole stack (2 shard servers with data dirs, 2 trainers, the joiner,
the publisher and a subscriber, on the session's broker and a redis-server of its
own; :mod:`tests.faults.killstack`) under a steady feed of impressions and clicks.
Each role is killed with SIGKILL once and restarted; after each fault serving must
move on (the subscriber applies a version covering events produced after the
restart). At the end, exactly:

- every impression became one sample (the joiner's replay suppression) and every
  sample was trained: the parameter server's show count of its unique ``req`` id is
  at least 1, and the group committed every message (lag 0);
- duplicates (show counts beyond 1) are counted and at most the rows the group had
  not committed when a trainer was killed: one uncommitted window per trainer kill;
  shard server, joiner, publisher and subscriber kills add none;
- the show counts summed are the rows the parameter server applied (samples plus
  duplicates), and the job's global metrics (resumed across the trainer restart)
  count them too, give or take what the killed trainer did around its kill: rows it
  trained after its last metrics write (about a second's worth) are missing, rows it
  counted but never pushed are counted twice (at most its uncommitted window);
- every version a subscriber applied was whole (the subscriber verifies every chunk's
  checksum against its manifest) and in order: increasing, each delta on the version
  before it, none rejected.

A second run kills Redis once (started again empty, no persistence): the same
accounting, with no duplicates at all (pushes Redis lost are added again, never
twice).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.killstack import KillStack
from tests.procgroups import ProcessGroups

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

#: one of each role, in an order that keeps every fault's recovery independent
FAULTS = ("ps0", "t0", "join", "publish", "subscribe")


@pytest.mark.timeout(420)
def test_kill_9_each_role_once_loses_nothing_and_counts_exactly(
    stack_binaries: None,
    kafka_bootstrap: str,
    project_topics: dict[str, str],
    topic_prefix: str,
    unique: str,
    tmp_path: Path,
    processes: ProcessGroups,
) -> None:
    stack = KillStack(processes, tmp_path, kafka_bootstrap, project_topics, topic_prefix, unique)
    stack.up()
    recovery = {role: stack.fault(role) for role in FAULTS}
    result = stack.account()
    summary = f"{result}, recovery {recovery}"
    assert result.impressions > 0 and result.samples == result.impressions, summary
    assert result.missing_samples == 0 and result.duplicate_samples == 0, summary
    assert result.never_trained == 0, summary
    assert result.lag == 0, summary
    assert 0 <= result.duplicates <= result.duplicate_bound, summary
    assert result.trained == result.samples + result.duplicates, summary
    # a killed trainer's rows after its last metrics write are trained but not in the
    # metrics; rows it wrote to them but never pushed are in them twice (retrained)
    assert -result.duplicate_bound <= result.trained - result.metrics_rows, summary
    assert result.trained - result.metrics_rows <= result.metrics_slack, summary
    assert result.rejected == [], summary
    assert len(result.versions) >= len(FAULTS), summary


def test_kill_9_of_redis_loses_nothing_and_counts_exactly(
    stack_binaries: None,
    kafka_bootstrap: str,
    project_topics: dict[str, str],
    topic_prefix: str,
    unique: str,
    tmp_path: Path,
    processes: ProcessGroups,
) -> None:
    """Redis killed and started empty: the same accounting (duplicates bounded by the
    trainers' uncommitted windows: pushes Redis lost are added again, never twice)."""
    stack = KillStack(processes, tmp_path, kafka_bootstrap, project_topics, topic_prefix, unique)
    stack.up()
    stack.fault("redis")
    result = stack.account()
    assert result.samples == result.impressions and result.never_trained == 0, result
    assert result.lag == 0 and result.rejected == [], result
    assert 0 <= result.duplicates <= result.duplicate_bound, result
