"""Pre-encoded Redis commands sent in one round trip on a pooled connection.

The hot paths of the PS front (a trainer's MGETs, a shard server's MSETs) build their
commands as byte matrices (:mod:`pipeline.ps.keys`) instead of letting redis-py encode
thousands of arguments one by one; this sends such bytes, followed by any ordinary
commands, and reads every reply. Single-node Redis only: a cluster client routes each
key itself and takes redis-py's pipeline instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["send"]


def send(pool: Any, raw: Sequence[bytes], commands: Sequence[tuple[Any, ...]] = ()) -> list[Any]:
    """Send ``raw`` (RESP bytes, one command each) then ``commands``; the replies in order.

    A connection that failed mid-way is disconnected, never reused with unread replies
    on it; an error reply is raised after every reply was read.
    """
    conn = pool.get_connection()
    try:
        packed = conn.pack_commands(commands) if commands else []
        conn.send_packed_command([b"".join(raw), *packed])
        replies = [conn.read_response() for _ in range(len(raw) + len(commands))]
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies
