"""Helpers of the two-process (gloo, CPU) tests."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for init_method="tcp://127.0.0.1:PORT"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
