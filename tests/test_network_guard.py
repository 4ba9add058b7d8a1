"""The autouse network guard of conftest.py: loopback works, anything else is refused."""

from __future__ import annotations

import socket

import pytest


def test_network_guard_blocks_all_but_loopback() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname(), timeout=5):
            pass  # loopback works: other tests run local fake servers
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # TEST-NET-1 (RFC 5737): the guard refuses before a packet could leave
        with pytest.raises(RuntimeError, match="may not connect"):
            sock.connect(("192.0.2.1", 443))
        with pytest.raises(RuntimeError, match="may not connect"):
            sock.connect_ex(("example.invalid", 80))
