"""Secrets in URLs never reach run metadata, logs or status tables: the one scrubber for them.

A URL list is untrusted, and some of its URLs carry credentials: a user and password (``https://user:pass@host/x``)
or a signature in the query (``?X-Amz-Signature=...``, ``?token=...``, ``?sig=...``). The URL itself is data (the
raw shards' ``url`` column and the ``url`` field of a media shard's per-sample JSON keep it exactly, since that is
what is fetched), but everything written *about* a run — Dagster metadata and logs, the ``detail`` column of a
media shard's status table, the raw stage's preview — goes through :func:`redact_text` (free text) or
:func:`redact_url` (one URL) first. Both keep the scheme, host, port, path and the names of the query parameters,
so a failure stays readable: ``https://***@host/x.jpg?X-Amz-Signature=***&width=200``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

MASK = "***"

#: Query (or fragment) parameter names whose value is a secret: a name containing any of these words (case
#: ignored). ``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``X-Goog-Signature``, Azure SAS
#: ``sig``, CloudFront ``Signature`` / ``Policy`` / ``Key-Pair-Id``, ``token``, ``access_token``, ``api_key``,
#: ``password`` ... all match.
SECRET_PARAM = re.compile(r"sig|token|secret|passw|pwd|credential|auth|key|session|policy|cookie", re.IGNORECASE)

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>(){}|\\^`]+")
# ``user:password@host`` without a scheme: what urllib and the guards call a URL's host when it has user information
_USERINFO = re.compile(r"(?<![\w.%+\-*])[^\s/@:'\"<>*]+:[^\s/@'\"<>]+@(?=[\w\[])")


def _params(text: str) -> str:
    parts = []
    for item in text.split("&"):
        name, eq, value = item.partition("=")
        if eq and value and SECRET_PARAM.search(name):
            item = f"{name}={MASK}"
        elif eq and "://" in unquote(value):  # a URL inside a parameter (a redirect target) may carry its own secrets
            inner = unquote(value)
            clean = redact_text(inner)
            if clean != inner:
                item = f"{name}={quote(clean, safe=':/*@')}"
        parts.append(item)
    return "&".join(parts)


def redact_url(url: Any) -> Any:
    """``url`` without its secrets: the user information (``user:pass@``) and the values of secret-named query and
    fragment parameters become ``***``. Anything that is not a string is returned as it is."""
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: mask everything after the scheme, to be safe
        return url.split("://", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = _params(parts.query) if parts.query else parts.query
    fragment = _params(parts.fragment) if "=" in parts.fragment else parts.fragment
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url  # nothing secret: the URL exactly as it was
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: Any) -> Any:
    """``text`` with every URL in it passed through :func:`redact_url` (a downloader's message, a log line, a table
    cell), and any ``user:password@host`` outside a URL masked too (a downloader names the host it could not resolve
    that way). Anything that is not a string is returned as it is."""
    if not isinstance(text, str) or ("://" not in text and "@" not in text):
        return text
    return _USERINFO.sub(MASK + "@", _URL.sub(lambda m: redact_url(m.group(0)), text))


class RedactingLog:
    """A logger whose messages pass through :func:`redact_text` (wraps Dagster's ``context.log`` or a
    ``logging.Logger``); every other attribute is the wrapped logger's."""

    def __init__(self, log: Any):
        self._log = log

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._log, name)
        if name in ("debug", "info", "warning", "error", "exception", "critical"):
            return lambda msg, *a, **kw: method(redact_text(msg), *a, **kw)
        return method


def redacting(log: Any) -> Any:
    """``log`` as a :class:`RedactingLog` (once: an already redacting log is returned as it is)."""
    return log if isinstance(log, RedactingLog) else RedactingLog(log)
