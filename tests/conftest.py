"""Shared fixtures. Services a test needs are started by its fixtures on 127.0.0.1 and stopped by PID."""

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port_factory():
    return free_port
