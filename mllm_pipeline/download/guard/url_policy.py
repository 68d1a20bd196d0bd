"""Which URLs may be fetched: URL lists are untrusted input.

By default only ``http``/``https`` URLs are fetched, and a host is refused when it is a cloud metadata name
(:data:`METADATA_NAMES`) or when any address it resolves to is a cloud metadata endpoint (:data:`METADATA_ADDRESSES`)
or lies in a range of :data:`SPECIAL_RANGES`: the IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890)
entries that are not globally reachable, plus multicast, IPv4 240/4 and the IPv6 space IANA has not allocated for
unicast (the IPv6 Address Space registry). Each refusal names the range, its registry name and RFC. The most specific
range names an address (``2001::1`` is Teredo, not "IETF protocol assignments").

IPv6 forms that embed an IPv4 address (IPv4-mapped, IPv4-compatible, IPv4-translated, NAT64 ``64:ff9b::/96`` and
``64:ff9b:1::/48``, 6to4 ``2002::/16``, Teredo ``2001::/32`` with its server and its bit-inverted client address)
have the embedded address checked against the IPv4 table first, so ``2002:a9fe:a9fe::1`` is refused as
169.254.169.254. When the embedded address passes, IPv4-mapped and the NAT64 well-known prefix are admitted (a
connection to them reaches that IPv4 address); the other embedding forms are refused by their own range name.

A range is admitted only when named in ``allow`` (the ``name`` column of :data:`SPECIAL_RANGES`).
``allow_loopback`` adds ``loopback`` (127.0.0.0/8 and ::1) for local mirrors and tests; ``allow_private`` adds
``private-use`` (RFC 1918) and ``unique-local`` (fc00::/7). Nothing admits ``link-local`` (169.254.0.0/16,
fe80::/10) or a metadata endpoint (by address or by name). The same check runs again on every redirect target (see
the downloaders), so a public URL cannot bounce a fetch to an internal address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import urlsplit

REFUSED_SCHEME = "refused_scheme"
REFUSED_ADDRESS = "refused_address"
UNRESOLVABLE = "unresolvable_host"
MALFORMED = "malformed_url"


class Range(NamedTuple):
    network: str
    name: str  # what a refusal and ``UrlPolicy.allow`` call it
    registry: str  # the registry's own name for it
    source: str  # the RFC (or registry) that defines it
    embeds: str | None = None  # how an IPv6 range carries an IPv4 address (see _embedded)


_V4 = "IANA IPv4 special-purpose"
_V6 = "IANA IPv6 special-purpose"
_V6SPACE = "IANA IPv6 address space"

#: Refused ranges: the non-globally-reachable entries of the IANA IPv4 / IPv6 Special-Purpose Address Registries,
#: multicast, and the reserved / unallocated space. A few registry entries are marked globally reachable
#: (192.0.0.9, 192.0.0.10, 64:ff9b::/96, anycast blocks inside 2001::/23); of those only the NAT64 prefix is
#: admitted (when the address it embeds is), the others are refused with the block around them.
SPECIAL_RANGES: tuple[Range, ...] = (
    # -- IPv4 (RFC 6890 and successors) ------------------------------------------------------------------------
    Range("0.0.0.0/8", "this-network", f'{_V4} "This network"', "RFC 791 §3.2"),
    Range("10.0.0.0/8", "private-use", f'{_V4} "Private-Use"', "RFC 1918"),
    Range("100.64.0.0/10", "shared-address-space", f'{_V4} "Shared Address Space"', "RFC 6598"),
    Range("127.0.0.0/8", "loopback", f'{_V4} "Loopback"', "RFC 1122 §3.2.1.3"),
    Range("169.254.0.0/16", "link-local", f'{_V4} "Link Local"', "RFC 3927"),
    Range("172.16.0.0/12", "private-use", f'{_V4} "Private-Use"', "RFC 1918"),
    Range("192.0.0.0/24", "ietf-protocol-assignments", f'{_V4} "IETF Protocol Assignments"', "RFC 6890"),
    Range("192.0.2.0/24", "documentation", f'{_V4} "Documentation (TEST-NET-1)"', "RFC 5737"),
    Range("192.88.99.0/24", "6to4-relay-anycast", f'{_V4} "Deprecated (6to4 Relay Anycast)"', "RFC 7526"),
    Range("192.168.0.0/16", "private-use", f'{_V4} "Private-Use"', "RFC 1918"),
    Range("198.18.0.0/15", "benchmarking", f'{_V4} "Benchmarking"', "RFC 2544"),
    Range("198.51.100.0/24", "documentation", f'{_V4} "Documentation (TEST-NET-2)"', "RFC 5737"),
    Range("203.0.113.0/24", "documentation", f'{_V4} "Documentation (TEST-NET-3)"', "RFC 5737"),
    Range("224.0.0.0/4", "multicast", 'IANA IPv4 multicast "Multicast"', "RFC 5771"),
    Range("240.0.0.0/4", "reserved", f'{_V4} "Reserved"', "RFC 1112 §4"),
    Range("255.255.255.255/32", "limited-broadcast", f'{_V4} "Limited Broadcast"', "RFC 919 §7, RFC 8190"),
    # -- IPv6 (RFC 6890 and successors) ------------------------------------------------------------------------
    Range("::/128", "unspecified", f'{_V6} "Unspecified Address"', "RFC 4291"),
    Range("::1/128", "loopback", f'{_V6} "Loopback Address"', "RFC 4291"),
    Range("::/96", "ipv4-compatible", f'{_V6SPACE} "IPv4-compatible (deprecated)"', "RFC 4291 §2.5.5.1", "last32"),
    Range("::ffff:0:0/96", "ipv4-mapped", f'{_V6} "IPv4-mapped Address"', "RFC 4291", "last32"),
    Range("::ffff:0:0:0/96", "ipv4-translated", 'SIIT "IPv4-translated Address"', "RFC 2765", "last32"),
    Range("64:ff9b::/96", "nat64", f'{_V6} "IPv4-IPv6 Translat."', "RFC 6052", "last32"),
    Range("64:ff9b:1::/48", "nat64-local", f'{_V6} "IPv4-IPv6 Translat." (local-use)', "RFC 8215", "rfc6052"),
    Range("100::/64", "discard-only", f'{_V6} "Discard-Only Address Block"', "RFC 6666"),
    Range("2001::/23", "ietf-protocol-assignments", f'{_V6} "IETF Protocol Assignments"', "RFC 2928"),
    Range("2001::/32", "teredo", f'{_V6} "TEREDO"', "RFC 4380, RFC 8190", "teredo"),
    Range("2001:2::/48", "benchmarking", f'{_V6} "Benchmarking"', "RFC 5180"),
    Range("2001:10::/28", "orchid", f'{_V6} "Deprecated (previously ORCHID)"', "RFC 4843"),
    Range("2001:db8::/32", "documentation", f'{_V6} "Documentation"', "RFC 3849"),
    Range("2002::/16", "6to4", f'{_V6} "6to4"', "RFC 3056", "6to4"),
    Range("3fff::/20", "documentation", f'{_V6} "Documentation"', "RFC 9637"),
    Range("5f00::/16", "segment-routing", f'{_V6} "Segment Routing (SRv6) SIDs"', "RFC 9602"),
    Range("fc00::/7", "unique-local", f'{_V6} "Unique-Local"', "RFC 4193, RFC 8190"),
    Range("fe80::/10", "link-local", f'{_V6} "Link-Local Unicast"', "RFC 4291"),
    Range("fec0::/10", "site-local", f'{_V6SPACE} "Site-Local (deprecated)"', "RFC 3879"),
    Range("ff00::/8", "multicast", f'{_V6SPACE} "Multicast"', "RFC 4291"),
    # the IPv6 space outside 2000::/3 that IANA has not allocated for unicast ("Reserved by IETF")
    *(Range(n, "reserved", f'{_V6SPACE} "Reserved by IETF"', "RFC 4291") for n in (
        "::/8", "100::/8", "200::/7", "400::/6", "800::/5", "1000::/4", "4000::/3", "6000::/3", "8000::/3",
        "a000::/3", "c000::/3", "e000::/4", "f000::/5", "f800::/6", "fe00::/9")),
)

#: Cloud metadata / platform endpoints by address: never admitted, whatever range they are in.
METADATA_ADDRESSES: dict[str, str] = {
    "169.254.169.254": "AWS, GCP, Azure, Oracle, OpenStack, DigitalOcean ... instance metadata",
    "169.254.170.2": "AWS ECS task metadata / credentials",
    "169.254.170.23": "AWS EKS Pod Identity credentials",
    "fd00:ec2::254": "AWS instance metadata (IPv6)",
    "fd00:ec2::23": "AWS EKS Pod Identity credentials (IPv6)",
    "100.100.100.200": "Alibaba Cloud instance metadata",
    "192.0.0.192": "Oracle Cloud instance metadata (legacy)",
    "168.63.129.16": "Azure WireServer / platform endpoint",
}

#: Cloud metadata host names (and their subdomains): refused before resolving, never admitted.
METADATA_NAMES: dict[str, str] = {
    "metadata.google.internal": "GCP instance metadata",
    "metadata.goog": "GCP instance metadata",
    "metadata": "GCP instance metadata (short name)",
    "instance-data": "AWS instance metadata",
    "instance-data.ec2.internal": "AWS instance metadata",
    "metadata.tencentyun.com": "Tencent Cloud instance metadata",
}

#: names ``UrlPolicy.allow`` may not hold: nothing admits them
NEVER_ALLOWED = frozenset({"link-local"})

_METADATA_IPS = {ipaddress.ip_address(a): why for a, why in METADATA_ADDRESSES.items()}
_ALLOWABLE = frozenset(r.name for r in SPECIAL_RANGES) - NEVER_ALLOWED
# the ranges as {version: ((prefixlen, {network int: Range}), ...)}, longest prefix first
_TABLE: dict[int, tuple[tuple[int, dict[int, Range]], ...]] = {}
for _version in (4, 6):
    _by_len: dict[int, dict[int, Range]] = {}
    for _r in SPECIAL_RANGES:
        _net = ipaddress.ip_network(_r.network)
        if _net.version == _version:
            _by_len.setdefault(_net.prefixlen, {})[int(_net.network_address)] = _r
    _TABLE[_version] = tuple(sorted(_by_len.items(), reverse=True))


def special_range(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Range | None:
    """The most specific range of :data:`SPECIAL_RANGES` that holds ``ip``, or None (a global address)."""
    bits = 32 if ip.version == 4 else 128
    value = int(ip)
    for length, nets in _TABLE[ip.version]:
        hit = nets.get(value >> (bits - length) << (bits - length))
        if hit is not None:
            return hit
    return None


def _embedded(ip: ipaddress.IPv6Address, how: str) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address of an embedding range carries, each with what it is."""
    value = int(ip)
    if how == "last32":
        return [("embeds", ipaddress.IPv4Address(value & 0xFFFFFFFF))]
    if how == "6to4":
        return [("embeds", ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF))]
    if how == "teredo":  # 2001:0:SERVER(32):flags:port:~CLIENT(32)
        return [("teredo server", ipaddress.IPv4Address((value >> 64) & 0xFFFFFFFF)),
                ("teredo client", ipaddress.IPv4Address(~value & 0xFFFFFFFF))]
    # RFC 6052 §2.2 inside the /48 local-use prefix: the operator picks a /48, /56, /64 or /96 layout, which the
    # address does not tell. Every layout it fits is read (the /48-/64 ones need bits 64..71, the "u" octet, zero),
    # and all must pass.
    b = value.to_bytes(16, "big")
    layouts = ((48, b[6:8] + b[9:11]), (56, b[7:8] + b[9:12]), (64, b[9:13])) if b[8] == 0 else ()
    return [(f"embeds (as /{n})", ipaddress.IPv4Address(bytes(q))) for n, q in (*layouts, (96, b[12:16]))]


def _describe(r: Range) -> str:
    return f"{r.name} {r.network} ({r.registry}, {r.source})"


@dataclasses.dataclass(frozen=True)
class UrlPolicy:
    allowed_schemes: tuple[str, ...] = ("http", "https")
    allow_loopback: bool = False
    allow_private: bool = False
    # range names (the ``name`` column of SPECIAL_RANGES) admitted besides those the two flags add
    allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(sorted(set(self.allow))))
        bad = [n for n in self.allow if n not in _ALLOWABLE]
        if bad:
            raise ValueError(f"UrlPolicy.allow: {', '.join(bad)} cannot be allowed (allowed names: "
                             f"{', '.join(sorted(_ALLOWABLE))}; never: {', '.join(sorted(NEVER_ALLOWED))})")

    @property
    def allowed_ranges(self) -> frozenset[str]:
        """The range names this policy admits."""
        return _allowed(self.allow, self.allow_loopback, self.allow_private)

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
        why = host_refusal(host)
        if why:  # before resolving: a metadata name is not even looked up
            return f"{REFUSED_ADDRESS}: {host} ({why})"
        try:
            addresses = _resolve(host, port or (443 if parts.scheme == "https" else 80))
        except OSError as e:
            return f"{UNRESOLVABLE}: {host} ({e.strerror or e})"
        return self.addresses_refusal(host, addresses)

    def addresses_refusal(self, host: str, addresses) -> str | None:
        """None if ``host`` and every address it resolved to may be connected to, else why not (the first refused)."""
        why = host_refusal(host)
        if why:
            return f"{REFUSED_ADDRESS}: {host} ({why})"
        for addr in addresses:
            why = self.address_refusal(addr)
            if why:
                return f"{REFUSED_ADDRESS}: {host} resolves to {addr} ({why})"
        return None

    def address_refusal(self, addr: str) -> str | None:
        """Why an IP address may not be connected to (naming the range), or None."""
        return _address_refusal(addr, self.allowed_ranges)


def host_refusal(host: str) -> str | None:
    """Why a host name is refused whatever it resolves to (a cloud metadata name or a subdomain of one), or None."""
    name = host.strip().rstrip(".").lower()
    for known, why in METADATA_NAMES.items():
        if name == known or ("." in known and name.endswith("." + known)):
            return f"cloud metadata name {known}: {why}"
    return None


@lru_cache(maxsize=64)
def _allowed(allow: tuple[str, ...], loopback: bool, private: bool) -> frozenset[str]:
    names = set(allow)
    if loopback:
        names.add("loopback")
    if private:
        names |= {"private-use", "unique-local"}
    return frozenset(names - NEVER_ALLOWED)


@lru_cache(maxsize=65536)
def _address_refusal(addr: str, allowed: frozenset[str]) -> str | None:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return f"not an IP address: {addr!r}"
    return _ip_refusal(ip, allowed)


def _ip_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed: frozenset[str]) -> str | None:
    r = special_range(ip)
    where = f"; {_describe(r)}" if r is not None else ""
    if ip in _METADATA_IPS:  # never admitted
        return f"cloud metadata endpoint {ip}: {_METADATA_IPS[ip]}{where}"
    if r is None:
        return None
    if r.embeds is not None:
        for what, v4 in _embedded(ip, r.embeds):
            why = _ip_refusal(v4, allowed)
            if why:
                return f"{_describe(r)} {what} {v4}: {why}"
        if r.name in ("ipv4-mapped", "nat64"):  # a connection to it reaches that (admitted) IPv4 address
            return None
    return None if r.name in allowed else _describe(r)


@lru_cache(maxsize=4096)
def _resolve(host: str, port: int) -> tuple[str, ...]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return tuple(sorted({info[4][0] for info in infos}))
