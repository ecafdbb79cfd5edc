"""Small helpers with one job each, shared by the package, its tests, scripts and benchmarks."""
from __future__ import annotations

import socket


def free_port(low: int | None = None, high: int | None = None, *, host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host`` (in ``[low, high)`` when given; ``host=""``: every interface)."""
    if low is None:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    for port in range(low, high):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")
