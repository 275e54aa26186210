"""Optional bearer-token auth for the HTTP listeners (``pipeline serve``, the trainer's
Prometheus exporter).

With a token configured, a request must carry ``Authorization: Bearer <token>``;
anything else is answered 401 with ``WWW-Authenticate: Bearer``. The comparison is
constant-time (:func:`hmac.compare_digest`), so response timing does not reveal how
much of a guess was right. Without a token every request passes, which is why the
listeners bind 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import hmac

__all__ = ["AUTH_HEADER", "CHALLENGE", "authorized"]

AUTH_HEADER = "Authorization"
#: The ``WWW-Authenticate`` value of a 401 answer (RFC 6750).
CHALLENGE = 'Bearer realm="pipeline"'


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header value grants access (always, without a token)."""
    if token is None:
        return True
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        # still one comparison, so a missing header costs what a wrong token costs
        hmac.compare_digest(token.encode(), b"")
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
