"""Who is on the other end: the client address of an HTTP or WebSocket scope.

The peer of the TCP connection is the client unless that peer is a trusted proxy
(``GATEWAY__TRUSTED_PROXIES``); only then is ``X-Forwarded-For`` believed, read from the right
(the hop nearest to us first) and skipping every further trusted proxy, so a client cannot put
an address of its choosing at the left end of the header and be believed. Sans-IO: a scope in,
a string out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

UNKNOWN_ADDRESS = "unknown"


def parse_networks(text: str) -> list[Network]:
    """Comma-separated IP networks (``10.0.0.0/8, ::1``); raises ``ValueError`` naming a bad one."""
    networks: list[Network] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"'{item}' is not an IP network") from None
    return networks


def address_in(address: str, networks: Iterable[Network]) -> bool:
    """Whether ``address`` (an IP literal) lies in one of ``networks``; False if not an IP."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def peer_address(scope: dict[str, Any]) -> str:
    """The TCP peer's address as the server reported it, or ``"unknown"``."""
    client = scope.get("client")
    if client and isinstance(client[0], str) and client[0]:
        return client[0]
    return UNKNOWN_ADDRESS


def forwarded_for(scope: dict[str, Any]) -> list[str]:
    """Every address in the request's ``X-Forwarded-For`` headers, left to right."""
    hops: list[str] = []
    for name, value in scope.get("headers") or []:
        if name.lower() == b"x-forwarded-for":
            hops.extend(part.strip() for part in value.decode("latin-1").split(",") if part.strip())
    return hops


def client_address(scope: dict[str, Any], trusted_proxies: Sequence[Network]) -> str:
    """The client's address: the peer, or what trusted proxies in front of us forwarded.

    Walks ``X-Forwarded-For`` from the right while each hop is a trusted proxy; the first
    untrusted (or unparsable) hop is the client. With no trusted proxies configured the
    header is ignored altogether.
    """
    peer = peer_address(scope)
    if not trusted_proxies or not address_in(peer, trusted_proxies):
        return peer
    address = peer
    for hop in reversed(forwarded_for(scope)):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address  # a garbled hop: stop at the last address we could check
        address = hop
        if not address_in(hop, trusted_proxies):
            return hop
    return address


def forwarded_chain(scope: dict[str, Any], trusted_proxies: Sequence[Network]) -> list[str]:
    """The addresses the gateway can vouch for, client first, its TCP peer last.

    What goes upstream as ``X-Forwarded-For``. Without a trusted peer it is just the peer;
    behind trusted proxies it is their ``X-Forwarded-For`` walked from the right exactly as
    :func:`client_address` walks it, up to and including the client, with the peer appended.
    Whatever a client wrote further left is dropped, so even a runtime that naively reads the
    leftmost entry gets the address :func:`client_address` chose (always ``chain[0]``).
    """
    peer = peer_address(scope)
    if not trusted_proxies or not address_in(peer, trusted_proxies):
        return [peer]
    chain = [peer]
    for hop in reversed(forwarded_for(scope)):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # a garbled hop: stop at the last address we could check
        chain.append(hop)
        if not address_in(hop, trusted_proxies):
            break
    chain.reverse()
    return chain
