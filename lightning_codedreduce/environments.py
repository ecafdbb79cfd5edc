"""Cluster environments for launchers Lightning does not detect itself: ``horovodrun``.

``horovodrun -np 4 -H localhost:4 --gloo python train.py`` starts the processes and sets
``HOROVOD_RANK``, ``HOROVOD_SIZE``, ``HOROVOD_LOCAL_RANK``, ``HOROVOD_LOCAL_SIZE``, ``HOROVOD_CROSS_RANK``,
``HOROVOD_CROSS_SIZE`` and ``HOROVOD_HOSTNAME`` in each, plus the address of the launcher's rendezvous
server (``HOROVOD_GLOO_RENDEZVOUS_ADDR``/``_PORT``, an HTTP key-value store). ``torch.distributed``
needs ``MASTER_ADDR``/``MASTER_PORT`` instead: the host of rank 0 and a free port there. They are taken
from the environment when set (``horovodrun -x MASTER_ADDR=... -x MASTER_PORT=...`` or exported
before a local run); otherwise rank 0 chooses a free port on its own host and publishes
``<host>:<port>`` in horovodrun's key-value store (scope ``lightning_codedreduce``), and the other
ranks read it there. Rank 0's host is its ``HOROVOD_HOSTNAME`` (the name given to ``-H``), or the
rendezvous address when that name is ``localhost`` and the job spans several hosts (rank 0 then runs
on the launcher's machine).

``CodedReduceStrategy`` selects this environment by itself when the ``HOROVOD_*`` variables are
present (and torchrun's are not). Elastic Horovod (``--min-np``/``--max-np``) is not supported.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from ._util import free_port

log = logging.getLogger(__name__)

HOROVOD_VARS = ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK")
KV_SCOPE = "lightning_codedreduce"
KV_KEY = "main_address"
_MAIN_CACHE: dict[tuple[str, str], tuple[str, int]] = {}  # (rendezvous addr, port) -> (MASTER_ADDR, MASTER_PORT)


def is_horovodrun() -> bool:
    """Whether ``horovodrun`` started this process (and ``torchrun`` did not)."""
    return all(v in os.environ for v in HOROVOD_VARS) and "TORCHELASTIC_RUN_ID" not in os.environ


def _int_env(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"{name} is not set: this process was not started by horovodrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"{name}={value!r} is not an integer") from None


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "") or host.startswith("127.") or host == "::1"


class _HorovodRunMixin:
    """The behaviour of :class:`HorovodRunEnvironment`, independent of the Lightning namespace."""

    #: seconds the ranks other than 0 wait for rank 0's address in the rendezvous store
    rendezvous_timeout: float = float(os.environ.get("CODEDREDUCE_HOROVOD_RENDEZVOUS_TIMEOUT", 300))

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return self._main()[0]

    @property
    def main_port(self) -> int:
        return self._main()[1]

    @staticmethod
    def detect() -> bool:
        return is_horovodrun()

    def world_size(self) -> int:
        return _int_env("HOROVOD_SIZE")

    def set_world_size(self, size: int) -> None:
        log.debug("HorovodRunEnvironment.set_world_size was called, but horovodrun decides the world size. Ignored.")

    def global_rank(self) -> int:
        return _int_env("HOROVOD_RANK")

    def set_global_rank(self, rank: int) -> None:
        log.debug("HorovodRunEnvironment.set_global_rank was called, but horovodrun decides the rank. Ignored.")

    def local_rank(self) -> int:
        return _int_env("HOROVOD_LOCAL_RANK")

    def node_rank(self) -> int:
        return _int_env("HOROVOD_CROSS_RANK", 0)

    def local_world_size(self) -> int:
        """Processes on this host (``HOROVOD_LOCAL_SIZE``)."""
        return _int_env("HOROVOD_LOCAL_SIZE", self.world_size())

    def num_nodes(self) -> int:
        """Hosts (``HOROVOD_CROSS_SIZE``)."""
        return _int_env("HOROVOD_CROSS_SIZE", 1)

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        size, local, nodes = self.world_size(), self.local_world_size(), self.num_nodes()
        if local * nodes != size:
            raise ValueError(
                f"horovodrun placed {size} processes unevenly on {nodes} hosts ({local} on this one); Lightning needs "
                f"the same number on every host, e.g. horovodrun -np {local * nodes} -H host1:{local},host2:{local}")
        if num_devices != local or num_nodes != nodes:
            raise ValueError(
                f"horovodrun started {size} processes ({local} per host on {nodes} host(s)) but the Trainer was "
                f"configured with devices={num_devices} and num_nodes={num_nodes}; set Trainer(devices={local}, "
                f"num_nodes={nodes}), or leave devices and num_nodes at their defaults to take horovodrun's layout")

    # ------------------------------------------------------------------ MASTER_ADDR / MASTER_PORT
    def _main(self) -> tuple[str, int]:
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        addr = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR")
        port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
        if not addr or not port:
            raise RuntimeError(
                "horovodrun without its gloo rendezvous server (HOROVOD_GLOO_RENDEZVOUS_ADDR/PORT are not set, e.g. "
                "horovodrun --mpi): set MASTER_ADDR to the host of rank 0 and MASTER_PORT to a free port there, e.g. "
                "horovodrun -x MASTER_ADDR=host1 -x MASTER_PORT=29500 ..., or use horovodrun --gloo")
        key = (addr, port)
        if key not in _MAIN_CACHE:
            _MAIN_CACHE[key] = self._publish(addr, port) if self.global_rank() == 0 else self._lookup(addr, port)
        return _MAIN_CACHE[key]

    def _url(self, addr: str, port: str) -> str:
        host = f"[{addr}]" if ":" in addr else addr
        return f"http://{host}:{port}/{KV_SCOPE}/{KV_KEY}"

    def _publish(self, addr: str, port: str) -> tuple[str, int]:
        host = os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()
        if _is_loopback(host):
            host = addr if self.num_nodes() > 1 else "127.0.0.1"
        main = (host, free_port(host=""))
        request = urllib.request.Request(self._url(addr, port), data=f"{main[0]}:{main[1]}".encode(), method="PUT")
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status != 200:
                raise RuntimeError(f"horovodrun's rendezvous server at {addr}:{port} refused the main address "
                                   f"(HTTP {response.status})")
        log.debug(f"published MASTER_ADDR={main[0]} MASTER_PORT={main[1]} at {addr}:{port}")
        return main

    def _lookup(self, addr: str, port: str) -> tuple[str, int]:
        deadline = time.monotonic() + self.rendezvous_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self._url(addr, port), timeout=10) as response:
                    host, _, main_port = response.read().decode().rpartition(":")
                    return host, int(main_port)
            except urllib.error.HTTPError as err:  # 404: rank 0 has not published yet
                last = err
            except (urllib.error.URLError, OSError, ValueError) as err:
                last = err
            time.sleep(0.1)
        raise RuntimeError(f"rank {self.global_rank()} did not get the address of rank 0 from horovodrun's rendezvous "
                           f"server at {addr}:{port} within {self.rendezvous_timeout:.0f} s ({last}); set MASTER_ADDR and "
                           "MASTER_PORT instead")

    def __repr__(self) -> str:
        return (f"HorovodRunEnvironment(rank={os.environ.get('HOROVOD_RANK')}, size={os.environ.get('HOROVOD_SIZE')}, "
                f"local_rank={os.environ.get('HOROVOD_LOCAL_RANK')})")


# one class per Lightning namespace (pytorch_lightning uses lightning_fabric's ClusterEnvironment,
# lightning.pytorch uses lightning.fabric's); created on first use so importing this module imports neither
_FABRIC = {"pytorch_lightning": "lightning_fabric", "lightning.pytorch": "lightning.fabric"}
_CLASSES: dict[str, type] = {}


def horovod_environment_class(namespace: str = "pytorch_lightning") -> type:
    """:class:`HorovodRunEnvironment` for ``pytorch_lightning`` or for ``lightning.pytorch``."""
    if namespace not in _FABRIC:
        raise ValueError(f"unknown Lightning namespace {namespace!r}; use one of {sorted(_FABRIC)}")
    if namespace not in _CLASSES:
        base = importlib.import_module(f"{_FABRIC[namespace]}.plugins.environments").ClusterEnvironment
        cls = type("HorovodRunEnvironment", (_HorovodRunMixin, base),
                   {"__module__": __name__, "__doc__": __doc__})
        cls.__qualname__ = "HorovodRunEnvironment" if namespace == "pytorch_lightning" else "LightningHorovodRunEnvironment"
        _CLASSES[namespace] = cls
    return _CLASSES[namespace]


def __getattr__(name: str):
    if name == "HorovodRunEnvironment":
        return horovod_environment_class("pytorch_lightning")
    if name == "LightningHorovodRunEnvironment":
        return horovod_environment_class("lightning.pytorch")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------- plain scripts (no Lightning)
@dataclass(frozen=True)
class LaunchInfo:
    """Who started this process and where it sits, read from the launcher's variables."""

    launcher: str  # "horovodrun", "torchrun", "mpirun" or "single" (no launcher: one process)
    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int  # this host's index among the hosts
    cross_size: int  # hosts

    def main_address(self) -> tuple[str, int]:
        """``(MASTER_ADDR, MASTER_PORT)`` for ``torch.distributed``: the environment's, else the launcher's way of
        agreeing on one (horovodrun's rendezvous store, or an MPI broadcast from rank 0)."""
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        if self.launcher == "horovodrun":
            hvd = _HorovodRunMixin()
            return hvd.main_address, hvd.main_port
        if self.launcher == "mpirun":
            return _mpi_main_address(self.rank, self.cross_size)
        if self.launcher == "single":
            return "127.0.0.1", free_port()
        raise RuntimeError("torchrun did not set MASTER_ADDR/MASTER_PORT; start the script with torchrun, horovodrun "
                           "or mpirun, or set them")


_MPI_RANK_VARS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                   "OMPI_COMM_WORLD_LOCAL_SIZE"), ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"))


def launch_info() -> LaunchInfo:
    """This process's place in the job, from torchrun's, horovodrun's or mpirun's (Open MPI, MPICH) variables."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (and anything that sets its variables)
        rank, size = _int_env("RANK"), _int_env("WORLD_SIZE")
        local_rank = _int_env("LOCAL_RANK", 0)
        local_size = _int_env("LOCAL_WORLD_SIZE", size)
        return LaunchInfo("torchrun", rank, size, local_rank, local_size, _int_env("GROUP_RANK", rank // local_size),
                          max(1, size // local_size))
    if is_horovodrun():
        hvd = _HorovodRunMixin()  # the Lightning environment's reading of horovodrun's variables
        return LaunchInfo("horovodrun", hvd.global_rank(), hvd.world_size(), hvd.local_rank(), hvd.local_world_size(),
                          hvd.node_rank(), hvd.num_nodes())
    for rank_var, size_var, local_var, local_size_var in _MPI_RANK_VARS:
        if rank_var in os.environ and size_var in os.environ:
            rank, size = _int_env(rank_var), _int_env(size_var)
            local_size = _int_env(local_size_var, size)
            return LaunchInfo("mpirun", rank, size, _int_env(local_var, rank % local_size), local_size,
                              rank // local_size, max(1, size // local_size))
    return LaunchInfo("single", 0, 1, 0, 1, 0, 1)


def _mpi_main_address(rank: int, hosts: int) -> tuple[str, int]:
    """Rank 0's host and a free port there, broadcast over MPI (as Lightning's MPIEnvironment does)."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("mpirun started this process but MASTER_ADDR/MASTER_PORT are not set and mpi4py is not "
                           "installed; pass them (mpirun -x MASTER_ADDR=host1 -x MASTER_PORT=29500 ...) or "
                           "pip install mpi4py") from None
    main = (socket.gethostname() if hosts > 1 else "127.0.0.1", free_port(host="")) if rank == 0 else None
    return MPI.COMM_WORLD.bcast(main, root=0)
