"""The client address: the TCP peer, or X-Forwarded-For only as far as trusted proxies vouch."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_gateway.client_address import (
    address_in,
    client_address,
    forwarded_chain,
    forwarded_for,
    parse_networks,
    peer_address,
)


def scope(peer: str | None, *forwarded: str) -> dict[str, object]:
    return {
        "client": (peer, 40000) if peer is not None else None,
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    }


PROXIES = parse_networks("10.0.0.0/8, ::1")


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() -> None:
    assert client_address(scope("203.0.113.9", "198.51.100.1"), []) == "203.0.113.9"


def test_an_untrusted_peer_cannot_set_its_address_with_the_header() -> None:
    assert client_address(scope("203.0.113.9", "198.51.100.1"), PROXIES) == "203.0.113.9"


def test_a_trusted_proxy_forwards_the_client_address() -> None:
    assert client_address(scope("10.1.2.3", "198.51.100.1"), PROXIES) == "198.51.100.1"


def test_a_forged_left_end_is_not_believed_through_a_proxy_that_appends() -> None:
    # The client sent "X-Forwarded-For: 1.2.3.4"; the proxy appended the real client address.
    assert client_address(scope("10.1.2.3", "1.2.3.4, 198.51.100.1"), PROXIES) == "198.51.100.1"


def test_a_chain_of_trusted_proxies_is_walked_from_the_right() -> None:
    assert client_address(scope("10.0.0.1", "198.51.100.7, 10.0.0.2"), PROXIES) == "198.51.100.7"


def test_several_headers_are_one_list() -> None:
    headers = scope("10.0.0.1", "198.51.100.7", "10.0.0.2")
    assert forwarded_for(headers) == ["198.51.100.7", "10.0.0.2"]
    assert client_address(headers, PROXIES) == "198.51.100.7"


def test_a_garbled_hop_stops_the_walk_at_the_last_checked_address() -> None:
    assert client_address(scope("10.0.0.1", "<script>, 10.0.0.2"), PROXIES) == "10.0.0.2"
    assert client_address(scope("10.0.0.1", "garbage"), PROXIES) == "10.0.0.1"


def test_a_trusted_proxy_without_the_header_is_the_client() -> None:
    assert client_address(scope("10.0.0.1"), PROXIES) == "10.0.0.1"


def test_a_scope_without_a_peer_is_unknown() -> None:
    assert peer_address(scope(None)) == "unknown"
    assert client_address(scope(None, "198.51.100.1"), PROXIES) == "unknown"


def test_networks_parse_and_match() -> None:
    assert address_in("10.9.9.9", PROXIES)
    assert address_in("::1", PROXIES)
    assert not address_in("11.0.0.1", PROXIES)
    assert not address_in("not-an-ip", PROXIES)
    assert parse_networks(" , ") == []
    with pytest.raises(ValueError, match="'nope' is not an IP network"):
        parse_networks("10.0.0.0/8,nope")


# --- the chain forwarded upstream as X-Forwarded-For ------------------------------------------


def test_the_chain_is_the_peer_alone_unless_the_peer_is_trusted() -> None:
    assert forwarded_chain(scope("203.0.113.9", "198.51.100.1"), []) == ["203.0.113.9"]
    assert forwarded_chain(scope("203.0.113.9", "198.51.100.1"), PROXIES) == ["203.0.113.9"]
    assert forwarded_chain(scope(None, "198.51.100.1"), PROXIES) == ["unknown"]


def test_behind_trusted_proxies_the_chain_keeps_what_they_vouch_for_and_appends_the_peer() -> None:
    assert forwarded_chain(scope("10.1.2.3", "198.51.100.1"), PROXIES) == [
        "198.51.100.1",
        "10.1.2.3",
    ]
    # A client's own left end is dropped: it starts at the client the proxies named.
    assert forwarded_chain(scope("10.0.0.1", "1.2.3.4, 198.51.100.7, 10.0.0.2"), PROXIES) == [
        "198.51.100.7",
        "10.0.0.2",
        "10.0.0.1",
    ]
    assert forwarded_chain(scope("10.0.0.1", "<script>, 10.0.0.2"), PROXIES) == [
        "10.0.0.2",
        "10.0.0.1",
    ]
    assert forwarded_chain(scope("10.0.0.1"), PROXIES) == ["10.0.0.1"]


_addresses = st.one_of(
    st.sampled_from(["10.0.0.1", "10.9.9.9", "::1", "198.51.100.7", "203.0.113.9", "1.2.3.4"]),
    st.ip_addresses().map(str),
    st.text(max_size=12),
)


@given(
    peer=st.one_of(st.none(), _addresses),
    hops=st.lists(_addresses, max_size=5),
    trusted=st.booleans(),
)
def test_the_chain_starts_with_the_client_address_and_ends_with_the_peer(
    peer: str | None, hops: list[str], trusted: bool
) -> None:
    request = scope(peer, *[hop.replace(",", "") for hop in hops])
    proxies = PROXIES if trusted else []
    chain = forwarded_chain(request, proxies)
    assert chain[0] == client_address(request, proxies)
    assert chain[-1] == peer_address(request)
    assert all("," not in hop for hop in chain[:-1])
