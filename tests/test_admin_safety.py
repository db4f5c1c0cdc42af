"""No request can kill the node: the admin API, the internal-address check, metric labels."""

from __future__ import annotations

import pytest

from mcc.origins import is_internal_address


@pytest.mark.parametrize(
    ("address", "internal"),
    [
        # regressions: these three were taken for global addresses
        ("2002::1", True),  # 6to4
        ("2002:a00:1::1", True),  # 6to4 wrapping 10.0.0.1
        ("100.64.0.1", True),  # shared address space (carrier-grade NAT)
        ("100.127.255.254", True),
        ("fec0::1", True),  # site-local
        # IPv4 wrapped in IPv6 is judged by the IPv4 address
        ("::ffff:10.0.0.1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:8.8.8.8", False),
        ("64:ff9b::a00:1", True),  # NAT64 of 10.0.0.1
        ("64:ff9b::808:808", False),  # NAT64 of 8.8.8.8
        # the usual suspects
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),  # cloud metadata
        ("0.0.0.0", True),
        ("224.0.0.1", True),  # multicast
        ("240.0.0.1", True),  # reserved
        ("198.18.0.1", True),  # benchmarking
        ("192.0.2.1", True),  # documentation
        ("::1", True),
        ("::", True),
        ("fc00::1", True),  # unique-local
        ("fe80::1%eth0", True),  # link-local with a zone
        ("ff02::1", True),  # multicast
        ("2001:db8::1", True),  # documentation
        ("2001::1", True),  # Teredo
        ("::10.0.0.1", True),  # IPv4-compatible (deprecated)
        ("not an address", True),
        # global
        ("8.8.8.8", False),
        ("1.1.1.1", False),
        ("2606:4700:4700::1111", False),
        ("2001:4860:4860::8888", False),
    ],
)
def test_is_internal_address(address: str, internal: bool) -> None:
    assert is_internal_address(address) is internal
