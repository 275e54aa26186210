"""Reproduce the embedded broker's group-rejoin stall (see docs/stack.md).

Starts the embedded stack, then runs rounds in which MEMBERS consumers join one
group, wait for their assignment, hold it for 3 s and close. On Apache Kafka every
round gets its partitions within a few seconds; on tansu, with two members, rounds
after the first or second get none within 30 s.

    python scripts/repro/tansu_group_rejoin.py [MEMBERS] [ROUNDS] [SESSION_MS] [--static]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient, NewTopic

    from pipeline.config import StackSettings
    from pipeline.stack import EmbeddedStack, free_port

    args = [a for a in argv if not a.startswith("--")]
    members, rounds, session_ms = (int(a) for a in (args + ["2", "4", "6000"][len(args) :]))
    static = "--static" in argv
    with tempfile.TemporaryDirectory() as tmp:
        stack = EmbeddedStack(
            StackSettings(
                state_dir=Path(tmp) / "stack", broker_port=free_port(), redis_port=free_port()
            )
        )
        stack.up()
        try:
            admin = AdminClient({"bootstrap.servers": stack.bootstrap})
            admin.create_topics([NewTopic("t", 6, 1)])["t"].result()

            def member(index: int, out: dict[int, float | None]) -> None:
                conf = {
                    "bootstrap.servers": stack.bootstrap,
                    "group.id": "g",
                    "session.timeout.ms": session_ms,
                    "enable.auto.commit": False,
                    "log_level": 0,
                }
                if static:
                    conf["group.instance.id"] = f"m{index}"
                c = Consumer(conf)
                c.subscribe(["t"])
                began, got = time.monotonic(), None
                while time.monotonic() - began < 30:
                    c.poll(0.2)
                    if c.assignment() and got is None:
                        got = time.monotonic() - began
                    if got is not None and time.monotonic() - began > got + 3:
                        break
                c.close()
                out[index] = got

            for r in range(rounds):
                out: dict[int, float | None] = {}
                threads = [threading.Thread(target=member, args=(i, out)) for i in range(members)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                seconds = {i: None if s is None else round(s, 1) for i, s in sorted(out.items())}
                print(f"round {r}: seconds to an assignment per member {seconds}", flush=True)
        finally:
            stack.down()


if __name__ == "__main__":
    main(sys.argv[1:])
