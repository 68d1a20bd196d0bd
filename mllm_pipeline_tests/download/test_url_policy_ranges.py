"""The URL policy's address table: every IANA special-purpose range, the IPv6 forms that embed an IPv4 address and
the cloud metadata endpoints are refused with the range named; public addresses are admitted. No test connects
anywhere: addresses are checked at the policy (an IP literal URL resolves without a resolver round trip)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from mllm_pipeline.download.guard.url_policy import (
    METADATA_ADDRESSES,
    METADATA_NAMES,
    SPECIAL_RANGES,
    UrlPolicy,
    host_refusal,
)

DEFAULT = UrlPolicy()
TRANSPARENT = ("ipv4-mapped", "nat64")  # admitted when the IPv4 address they carry is


def _most_specific(ip):
    """The range naming ``ip``, found by brute force (independent of the module's prefix-length index)."""
    holding = [r for r in SPECIAL_RANGES if ip in ipaddress.ip_network(r.network)]
    return max(holding, key=lambda r: ipaddress.ip_network(r.network).prefixlen, default=None)


def _samples():
    for r in SPECIAL_RANGES:
        net = ipaddress.ip_network(r.network)
        for where, ip in (("first", net[0]), ("middle", net[net.num_addresses // 2]), ("last", net[-1])):
            yield pytest.param(str(ip), id=f"{r.network}-{where}")


@pytest.mark.parametrize("addr", list(dict.fromkeys(_samples())))
def test_each_range_first_middle_last_is_refused_and_named(addr):
    ip = ipaddress.ip_address(addr)
    r = _most_specific(ip)
    why = DEFAULT.address_refusal(addr)
    if r.name in TRANSPARENT:
        v4 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        inner = DEFAULT.address_refusal(str(v4))
        assert (why is None) == (inner is None), (addr, why, inner)
        if why:
            assert why.startswith(f"{r.name} {r.network} (") and f"embeds {v4}: {inner}" in why
        return
    assert why is not None, addr
    assert f"{r.name} {r.network} (" in why and r.source in why, why
    if addr in METADATA_ADDRESSES:
        assert why.startswith(f"cloud metadata endpoint {addr}")
    # the URL carries the same reason, with the address
    host = f"[{addr}]" if ip.version == 6 else addr
    got = DEFAULT.refusal(f"http://{host}/x.jpg")
    assert got.startswith(f"refused_address: {addr} resolves to ") and got.endswith(f" ({why})"), got


@pytest.mark.parametrize(
    "addr,fragments",
    [
        # IPv4 ranges the old flags missed
        ("100.64.0.0", ["shared-address-space 100.64.0.0/10", "RFC 6598"]),
        ("100.127.255.255", ["shared-address-space 100.64.0.0/10"]),
        ("100.100.100.200", ["cloud metadata endpoint 100.100.100.200", "Alibaba", "shared-address-space"]),
        ("192.0.0.192", ["cloud metadata endpoint 192.0.0.192", "Oracle", "ietf-protocol-assignments 192.0.0.0/24"]),
        ("192.0.0.9", ["ietf-protocol-assignments 192.0.0.0/24"]),
        ("192.88.99.1", ["6to4-relay-anycast 192.88.99.0/24", "RFC 7526"]),
        ("198.19.255.255", ["benchmarking 198.18.0.0/15"]),
        ("169.254.169.254", ["cloud metadata endpoint 169.254.169.254", "link-local 169.254.0.0/16", "RFC 3927"]),
        ("169.254.170.2", ["cloud metadata endpoint 169.254.170.2", "ECS", "link-local"]),
        ("168.63.129.16", ["cloud metadata endpoint 168.63.129.16", "Azure"]),
        ("255.255.255.255", ["limited-broadcast 255.255.255.255/32"]),
        ("0.1.2.3", ["this-network 0.0.0.0/8"]),
        ("239.255.255.250", ["multicast 224.0.0.0/4"]),
        ("10.0.0.1", ["private-use 10.0.0.0/8", "RFC 1918"]),
        # IPv6 ranges
        ("::", ["unspecified ::/128"]),
        ("::1", ["loopback ::1/128"]),
        ("fd00:ec2::254", ["cloud metadata endpoint fd00:ec2::254", "AWS", "unique-local fc00::/7"]),
        ("fe80::1%eth0", ["link-local fe80::/10"]),
        ("fec0::1", ["site-local fec0::/10"]),
        ("ff02::1", ["multicast ff00::/8"]),
        ("100::1", ["discard-only 100::/64", "RFC 6666"]),
        ("2001:2::1", ["benchmarking 2001:2::/48"]),
        ("2001:3::1", ["ietf-protocol-assignments 2001::/23"]),
        ("2001:1ff:ffff::1", ["ietf-protocol-assignments 2001::/23"]),
        ("2001:10::1", ["orchid 2001:10::/28"]),
        ("2001:db8::1", ["documentation 2001:db8::/32", "RFC 3849"]),
        ("3fff:fff::1", ["documentation 3fff::/20"]),
        ("5f00::1", ["segment-routing 5f00::/16"]),
        ("4000::1", ["reserved 4000::/3"]),
        # IPv6 forms that embed an IPv4 address: the embedded one is checked first and named
        ("::ffff:169.254.169.254", ["ipv4-mapped ::ffff:0:0/96", "embeds 169.254.169.254",
                                    "link-local 169.254.0.0/16"]),
        ("::ffff:a64:0101", ["ipv4-mapped", "embeds 10.100.1.1", "private-use 10.0.0.0/8"]),
        ("::ffff:100.100.100.200", ["ipv4-mapped", "embeds 100.100.100.200", "Alibaba"]),
        ("::169.254.169.254", ["ipv4-compatible ::/96", "embeds 169.254.169.254", "link-local"]),
        ("::8.8.8.8", ["ipv4-compatible ::/96", "RFC 4291"]),  # deprecated form, refused by its own name
        ("::ffff:0:127.0.0.1", ["ipv4-translated ::ffff:0:0:0/96", "embeds 127.0.0.1", "loopback 127.0.0.0/8"]),
        ("2002:a9fe:a9fe::1", ["6to4 2002::/16", "embeds 169.254.169.254", "link-local 169.254.0.0/16"]),
        ("2002:6464:64c8::", ["6to4 2002::/16", "embeds 100.100.100.200", "Alibaba"]),
        ("2002:c000:00c0:1::1", ["6to4 2002::/16", "embeds 192.0.0.192", "Oracle"]),
        ("2002:7f00:1::", ["6to4 2002::/16", "embeds 127.0.0.1", "loopback"]),
        ("2002:808:808::1", ["6to4 2002::/16", "RFC 3056"]),  # public inside: refused as 6to4
        ("64:ff9b::a9fe:a9fe", ["nat64 64:ff9b::/96", "embeds 169.254.169.254", "link-local"]),
        ("64:ff9b::10.1.2.3", ["nat64 64:ff9b::/96", "embeds 10.1.2.3", "private-use"]),
        # the local-use NAT64 prefix: every RFC 6052 layout the address fits is read (the others read 8.x: public)
        ("64:ff9b:1:a00:0:100::", ["nat64-local 64:ff9b:1::/48", "embeds (as /48) 10.0.0.1", "private-use"]),
        ("64:ff9b:1:80a:0:1::", ["nat64-local", "embeds (as /56) 10.0.0.1"]),
        ("64:ff9b:1:808:a:0:100:0", ["nat64-local", "embeds (as /64) 10.0.0.1"]),
        ("64:ff9b:1:808:808:808:a00:1", ["nat64-local", "embeds (as /96) 10.0.0.1"]),
        ("64:ff9b:1:808:808:808:a9fe:a9fe", ["nat64-local", "embeds (as /96) 169.254.169.254", "link-local"]),
        ("64:ff9b:1::a9fe:a9fe", ["nat64-local", "embeds (as /48) 0.0.0.0", "this-network"]),  # fits all layouts
        ("64:ff9b:1:808:808:808:808:808", ["nat64-local 64:ff9b:1::/48", "RFC 8215"]),  # public inside
        # Teredo 2001:0:SERVER:flags:port:~CLIENT (RFC 4380 §4's example, client 192.0.2.45)
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", ["teredo 2001::/32", "teredo client 192.0.2.45", "documentation"]),
        ("2001:0:a9fe:a9fe::ffff:ffff", ["teredo 2001::/32", "teredo server 169.254.169.254", "link-local"]),
        ("2001:0:808:808::5601:fefe", ["teredo 2001::/32", "teredo client 169.254.1.1", "link-local"]),
        ("2001:0:808:808::f7f7:f7f7", ["teredo 2001::/32", "RFC 4380"]),  # both ends public: refused as Teredo
    ],
)
def test_refusal_names_the_range(addr, fragments):
    why = DEFAULT.address_refusal(addr)
    assert why is not None, addr
    for f in fragments:
        assert f in why, (f, why)


@pytest.mark.parametrize("host", [*METADATA_NAMES, "METADATA.Google.Internal.", "x.metadata.google.internal",
                                  "metadata.goog.", "instance-data.ec2.internal"])
def test_metadata_names_are_refused_before_resolving(host, monkeypatch):
    import mllm_pipeline.download.guard.url_policy as url_policy

    def no_dns(*_):
        raise AssertionError("a metadata name was resolved")

    monkeypatch.setattr(url_policy, "_resolve", no_dns)
    for policy in (DEFAULT, UrlPolicy(allow_loopback=True, allow_private=True)):
        why = policy.refusal(f"http://{host}/computeMetadata/v1/")
        assert why and why.startswith(f"refused_address: {host.lower()} (cloud metadata name"), why
        # the guards pass the host with what it resolved to: the name alone refuses, whatever the answer
        assert "cloud metadata name" in policy.addresses_refusal(host, ["8.8.8.8"])


@pytest.mark.parametrize("host", ["metadata.example.com", "notmetadata.goog", "metadata.google.internal.example.org"])
def test_names_merely_like_metadata_are_not_refused_by_name(host):
    assert host_refusal(host) is None


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.0",
                                  "192.0.1.1", "198.17.255.255", "198.20.0.0", "223.255.255.255",
                                  "2606:4700:4700::1111", "2001:4860:4860::8888", "2a00:1450:4001:80b::200e",
                                  "2001:200::1", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "3fff:1000::1"])
def test_public_addresses_are_admitted(addr):
    assert DEFAULT.address_refusal(addr) is None
    assert DEFAULT.addresses_refusal("example.org", [addr]) is None
    host = f"[{addr}]" if ":" in addr else addr
    assert DEFAULT.refusal(f"https://{host}/a.jpg") is None


def test_allowances_by_name():
    loop = UrlPolicy(allow_loopback=True)
    for addr in ("127.0.0.1", "127.255.255.255", "::1", "::ffff:127.0.0.1"):
        assert loop.address_refusal(addr) is None, addr
    for addr, name in (("2002:7f00:1::", "6to4"), ("::127.0.0.1", "ipv4-compatible"), ("169.254.169.254", "link-local"),
                       ("10.0.0.1", "private-use"), ("0.0.0.0", "this-network"), ("100.64.0.1", "shared-address")):
        assert name in loop.address_refusal(addr), addr

    private = UrlPolicy(allow_private=True)
    assert private.address_refusal("10.0.0.1") is None and private.address_refusal("fd12:3456::1") is None
    assert "cloud metadata endpoint" in private.address_refusal("fd00:ec2::254")
    assert "loopback" in private.address_refusal("127.0.0.1")

    named = UrlPolicy(allow=("6to4", "shared-address-space", "teredo", "nat64-local"))
    assert named.address_refusal("64:ff9b:1:808:808:808:808:808") is None
    assert "embeds (as /96) 10.0.0.1" in named.address_refusal("64:ff9b:1:808:808:808:a00:1")
    assert named.address_refusal("2002:808:808::1") is None and named.address_refusal("100.64.0.1") is None
    assert named.address_refusal("2001:0:808:808::f7f7:f7f7") is None
    assert "link-local" in named.address_refusal("2002:a9fe:a9fe::1")  # the embedded address still counts
    assert "private-use" in named.address_refusal("2002:a00:1::")
    assert "cloud metadata endpoint" in named.address_refusal("100.100.100.200")  # never, even in an allowed range
    assert "teredo server 169.254.169.254" in named.address_refusal("2001:0:a9fe:a9fe::ffff:ffff")
    assert set(named.allowed_ranges) == {"6to4", "shared-address-space", "teredo", "nat64-local"}

    for bad in (("link-local",), ("no-such-range",)):
        with pytest.raises(ValueError, match="cannot be allowed"):
            UrlPolicy(allow=bad)


def test_table_covers_what_python_calls_non_global():
    """Cross-check with ``ipaddress`` (whose flags come from the same registries): every address it calls
    non-global is refused. (IPv4-mapped / NAT64 addresses are judged by the IPv4 address they carry instead.)"""
    rng = random.Random(26)
    v4 = [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(20000)]
    v6 = [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(5000)]
    for r in SPECIAL_RANGES:  # random addresses inside each range too (the random ones rarely land in small ones)
        net = ipaddress.ip_network(r.network)
        base = int(net.network_address)
        cls = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
        (v4 if net.version == 4 else v6).extend(cls(base + rng.randrange(net.num_addresses)) for _ in range(50))
    missed = [str(ip) for ip in v4 + v6
              if not ip.is_global and DEFAULT.address_refusal(str(ip)) is None
              and getattr(_most_specific(ip), "name", None) not in TRANSPARENT]
    assert not missed, missed[:20]


def test_table_is_documented():
    for r in SPECIAL_RANGES:
        assert r.name and r.registry.startswith(("IANA", "SIIT")) and r.source.startswith("RFC"), r
        ipaddress.ip_network(r.network)  # strict: no host bits
    networks = [r.network for r in SPECIAL_RANGES]
    assert len(networks) == len(set(networks))
    for n in ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
              "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
              "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32", "::/128", "::1/128",
              "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001::/32",
              "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8"):
        assert n in networks, n
