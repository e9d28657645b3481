"""Address and CIDR matching for ``exempt_ips`` and ``trusted_proxies``: parsed once, at config load."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(name: str, entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or CIDR networks (``exempt_ips``, ``trusted_proxies``); ValueError names the bad ones."""
    nets, bad = [], []
    for e in entries:
        try:
            nets.append(ipaddress.ip_network(e.strip(), strict=False))
        except ValueError:
            bad.append(e)
    if bad:
        raise ValueError(f"{name}: not an IP address or CIDR network: {bad} (e.g. '127.0.0.1', '10.0.0.0/8')")
    return tuple(nets)


def in_networks(ip: str, nets: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:  # e.g. Starlette's TestClient reports "testclient"
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # '::ffff:10.1.2.3' from a dual-stack socket is 10.1.2.3
    return any(addr in net for net in nets)


def address_group(ip: str, ipv6_prefix: int = 64) -> str:
    """What a per-address limit counts under: an IPv4 address itself (also when written IPv4-mapped,
    ``::ffff:10.1.2.3``), an IPv6 address's ``/ipv6_prefix`` network (a client usually holds a whole
    /64 and can rotate addresses within it at will), anything else (not an address) as given."""
    if not 0 <= ipv6_prefix <= 128:
        raise ValueError(f"ipv6_prefix must be between 0 and 128, got {ipv6_prefix}")
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))
    return str(addr)


def is_loopback(ip: str) -> bool:
    """``ip`` is a loopback address (127.0.0.0/8, ::1, or IPv4-mapped loopback); a name is not."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port (``[::1]:8000`` -> ``::1``), lowercased."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h
