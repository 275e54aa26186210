"""Secrets out of what is printed: passwords in URLs, secret-looking client properties.

Settings keep credentials as :class:`pydantic.SecretStr`; what remains are URLs that
carry a password (``redis://:pw@host``) and free-form client properties
(``PIPELINE_KAFKA_EXTRA__SASL_OAUTHBEARER_CLIENT_SECRET``). Everything that prints
settings, logs a URL or puts one in an error message goes through here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["MASK", "is_secret_key", "mask_mapping", "mask_url", "mask_urls_in"]

MASK = "***"

# librdkafka properties whose value is a credential (ssl.key.pem is an inline key).
_SECRET_KEY = re.compile(r"password|secret|jaas|token|\.pem$|oauthbearer\.config", re.I)
# scheme://[user]:password@ anywhere in a text (error messages that echo a URL)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s/]+)(@)", re.I)


def mask_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``; the user name stays."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return mask_urls_in(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def mask_urls_in(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it masked."""
    return _URL_PASSWORD.sub(rf"\g<1>{MASK}\g<3>", text)


def is_secret_key(key: str) -> bool:
    """Whether a client property named ``key`` holds a credential."""
    return bool(_SECRET_KEY.search(key))


def mask_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` with credentials masked (by key name) and URL passwords masked."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if is_secret_key(key):
            out[key] = MASK
        elif isinstance(value, str):
            out[key] = mask_url(value) if "://" in value else value
        else:
            out[key] = value
    return out
