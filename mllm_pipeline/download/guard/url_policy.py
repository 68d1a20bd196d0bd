"""Which URLs may be fetched: URL lists are untrusted input.

By default only ``http``/``https`` URLs are fetched, and a host is refused when any address it resolves to is
loopback, private, link-local (169.254.0.0/16 and fe80::/10, where cloud metadata services live), multicast,
reserved or unspecified. ``allow_loopback`` admits 127.0.0.0/8 and ::1 for local mirrors and tests; nothing
ever admits link-local. The same check runs again on every redirect target (see the downloaders), so a public
URL cannot bounce a fetch to an internal address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from functools import lru_cache
from urllib.parse import urlsplit

REFUSED_SCHEME = "refused_scheme"
REFUSED_ADDRESS = "refused_address"
UNRESOLVABLE = "unresolvable_host"
MALFORMED = "malformed_url"


@dataclasses.dataclass(frozen=True)
class UrlPolicy:
    allowed_schemes: tuple[str, ...] = ("http", "https")
    allow_loopback: bool = False
    allow_private: bool = False

    def refusal(self, url: str) -> str | None:
        """None if ``url`` may be fetched, else the reason it is refused (with the offending address)."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
            port = parts.port
        except ValueError as e:
            return f"{MALFORMED}: {e}"
        if parts.scheme.lower() not in self.allowed_schemes:
            return f"{REFUSED_SCHEME}: {parts.scheme or '(none)'} (allowed: {', '.join(self.allowed_schemes)})"
        if not host:
            return f"{MALFORMED}: no host"
        try:
            addresses = _resolve(host, port or (443 if parts.scheme == "https" else 80))
        except OSError as e:
            return f"{UNRESOLVABLE}: {host} ({e.strerror or e})"
        return self.addresses_refusal(host, addresses)

    def addresses_refusal(self, host: str, addresses) -> str | None:
        """None if every address ``host`` resolved to may be connected to, else why not (the first refused one)."""
        for addr in addresses:
            why = self.address_refusal(addr)
            if why:
                return f"{REFUSED_ADDRESS}: {host} resolves to {addr} ({why})"
        return None

    def address_refusal(self, addr: str) -> str | None:
        """Why an IP address may not be connected to, or None."""
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if ip.is_link_local:
            return "link-local"  # never allowed: cloud metadata lives here
        if ip.is_loopback:
            return None if self.allow_loopback else "loopback"
        if ip.is_multicast:
            return "multicast"
        if ip.is_unspecified:
            return "unspecified"
        if ip.is_reserved:
            return "reserved"
        if ip.is_private and not ip.is_global:
            return None if self.allow_private else "private"
        return None


@lru_cache(maxsize=4096)
def _resolve(host: str, port: int) -> tuple[str, ...]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return tuple(sorted({info[4][0] for info in infos}))
