"""Commit requests handed from the trainer thread to the consumer's reader thread.

A synchronous ``Consumer.commit`` from one thread while another is inside
``consume()`` never returns (measured with confluent-kafka 2.x: the reply is served by
the consuming thread's queue). So the trainer only *asks* for a commit here and the
reader thread, which owns the consumer, performs it between polls, while it waits for
queue room, and while a revocation hook runs. Requests are merged (max offset per
partition) and performed in order; a waiter learns what its request committed or why
it failed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pipeline.errors import PipelineError
from pipeline.train.batching import TopicPartition

__all__ = ["CommitChannel", "CommitTicket"]

Positions = dict[TopicPartition, int]


@dataclass
class CommitTicket:
    """One commit request: next offsets per partition; filled in when performed."""

    positions: Positions
    done: threading.Event = field(default_factory=threading.Event)
    committed: Positions = field(default_factory=dict)
    error: BaseException | None = None


class CommitChannel:
    """Thread-safe mailbox of commit requests, served by one thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tickets: list[CommitTicket] = []
        self._closed: str | None = None

    def request(self, positions: Mapping[TopicPartition, int]) -> CommitTicket:
        """Queue a request (raises PipelineError once the channel is closed)."""
        wanted = {(str(t), int(p)): int(off) for (t, p), off in positions.items()}
        bad = {tp: off for tp, off in wanted.items() if off < 0}
        if bad:
            raise ValueError(f"commit positions must be >= 0, got {bad}")
        ticket = CommitTicket(wanted)
        with self._lock:
            if self._closed is not None:
                raise PipelineError(f"cannot commit: {self._closed}")
            self._tickets.append(ticket)
        return ticket

    def pending(self) -> bool:
        with self._lock:
            return bool(self._tickets)

    def serve(self, perform: Callable[[Positions], Positions]) -> int:
        """Perform every queued request as one merged commit; return how many were served.

        ``perform(merged)`` commits and returns the positions it committed (it may
        leave some out: partitions no longer owned, positions not ahead of the last
        commit). Its exception is given to every request of the batch.
        """
        with self._lock:
            tickets, self._tickets = self._tickets, []
        if not tickets:
            return 0
        merged: Positions = {}
        for t in tickets:
            for tp, off in t.positions.items():
                merged[tp] = max(merged.get(tp, 0), off)
        try:
            done = perform(merged)
        except BaseException as exc:
            for t in tickets:
                t.error = exc
                t.done.set()
            raise
        for t in tickets:
            t.committed = {tp: done[tp] for tp in t.positions if tp in done}
            t.done.set()
        return len(tickets)

    def close(self, reason: str) -> None:
        """Refuse new requests and fail the queued ones with ``reason``."""
        with self._lock:
            self._closed = reason
            tickets, self._tickets = self._tickets, []
        for t in tickets:
            t.error = PipelineError(f"commit not performed: {reason}")
            t.done.set()
