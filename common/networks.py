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
