"""Stand in for ``horovodrun``'s rendezvous server where the harness places the ranks itself.

Inside network namespaces ``horovodrun`` cannot start ranks, so the harness sets, per rank, exactly the
variables it would (``HOROVOD_RANK``, ``HOROVOD_SIZE``, ..., ``HOROVOD_GLOO_RENDEZVOUS_ADDR``) except the
rendezvous port: no server runs yet. :func:`serve_if_needed` makes rank 0 host Horovod's own
``RendezvousServer`` (one "host" per rank, as ``-H h0:1,h1:1,...`` would) and publish its port in a file
that the other ranks wait for. Under ``horovodrun`` it does nothing.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

_SERVER = None  # rank 0's server, kept alive for the life of the process


def serve_if_needed(port_file: Path, timeout: float = 120.0) -> None:
    """Set ``HOROVOD_GLOO_RENDEZVOUS_PORT`` (rank 0 starts the server); call before ``hvd.init()``."""
    global _SERVER
    if "HOROVOD_GLOO_RENDEZVOUS_PORT" in os.environ or "HOROVOD_RANK" not in os.environ:
        return  # horovodrun set it up (or this is not a Horovod launch at all)
    if int(os.environ["HOROVOD_RANK"]) == 0:
        from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
        from horovod.runner.http.http_server import RendezvousServer

        size = int(os.environ["HOROVOD_SIZE"])
        _SERVER = RendezvousServer(0)
        port = _SERVER.start()
        _SERVER.init(get_host_assignments(parse_hosts(",".join(f"h{i}:1" for i in range(size))), size))
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.rename(port_file)
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Horovod's rendezvous port was not published by rank 0 in {port_file} "
                               f"within {timeout:g} s (see rank 0's log)")
        time.sleep(0.05)
    os.environ["HOROVOD_GLOO_RENDEZVOUS_PORT"] = port_file.read_text().strip()
