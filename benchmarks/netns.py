"""An emulated cluster network on one machine: one network namespace per host, a bridge, ``tbf`` limits.

Layout (nothing is added to the machine's own namespace)::

    <prefix>-sw   namespace holding the bridge ``br0`` (the "switch")
    <prefix>-h<i> namespace of host i: interface ``eth0`` with 198.18.x.y/15, loopback up

Each host is a veth pair ``eth0`` (host side) <-> ``v<i>`` (switch side). Both ends get a ``tbf``
qdisc at ``rate``, so every host has a full-duplex link of that rate (upload limited on ``eth0``,
download limited on ``v<i>``), like a NIC on a non-blocking switch. ``netem`` is not available in
this kernel, so no delay is added: latency is the kernel path plus the software stack.

Addresses come from 198.18.0.0/15 (reserved for benchmarking, RFC 2544) and exist only inside these
namespaces. ``EmulatedNetwork`` is a context manager; ``teardown()`` is idempotent and also runs on
SIGINT/SIGTERM and at interpreter exit. Namespaces left behind by a killed harness (their owner pid
is part of the prefix) are removed by ``remove_stale()``.
"""
from __future__ import annotations

import atexit
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

NET = ipaddress.ip_network("198.18.0.0/15")
PREFIX_BASE = "crbench"
IFACE = "eth0"
NETNS_ETC = Path("/etc/netns")  # ip netns exec bind-mounts per-namespace files from here


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def host_address(i: int) -> str:
    """Address of host ``i`` (198.18.0.1, 198.18.0.2, ...; never .0 or .255 of a /24)."""
    block, off = divmod(i, 250)
    return str(NET.network_address + block * 256 + 1 + off)


def parse_rate(rate: str) -> float:
    """``"1gbit"``, ``"100mbit"``, ``"500kbit"`` -> bits per second."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?)bit\s*", rate.lower())
    if not m:
        raise ValueError(f"rate must look like 1gbit, 100mbit or 500kbit, got {rate!r}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def probe() -> tuple[bool, str]:
    """Whether namespaces, veth, bridges and tbf work here; ``(False, why)`` if not."""
    if os.geteuid() != 0:
        return False, "not root (network namespaces need CAP_NET_ADMIN)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False, "the ip/tc tools (iproute2) are missing"
    net = EmulatedNetwork(2, rate="100mbit", prefix=f"{PREFIX_BASE}{os.getpid()}p")
    try:
        net.setup()
        return True, "ok"
    except Exception as err:  # noqa: BLE001 - any failure means: fall back to loopback
        return False, str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    finally:
        net.teardown()


def remove_stale() -> list[str]:
    """Delete namespaces of earlier harness runs whose process is gone."""
    out = _ip("netns", "list", check=False).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX_BASE}(\d+)[a-z]?-(sw|h\d+)", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _ip("netns", "del", name, check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
            removed.append(name)
    return removed


class EmulatedNetwork:
    """``hosts`` namespaces on a bridge, each link limited to ``rate`` in both directions."""

    def __init__(self, hosts: int, rate: str = "1gbit", prefix: str | None = None):
        if hosts < 1 or hosts > 2000:
            raise ValueError(f"hosts must be in 1..2000, got {hosts}")
        self.hosts = hosts
        self.rate = rate
        self.rate_bps = parse_rate(rate)
        self.prefix = prefix or f"{PREFIX_BASE}{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.names = [f"{self.prefix}-h{i}" for i in range(hosts)]
        self.iface = IFACE
        self._created: list[str] = []
        self._etc_dirs: list[Path] = []
        self._lock = threading.RLock()  # the signal handler may tear down while setup holds it
        self._old_handlers: dict[int, object] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "EmulatedNetwork":
        self._install_handlers()
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def address(self, i: int) -> str:
        return host_address(i)

    def exec_prefix(self, i: int) -> list[str]:
        """Command prefix that runs a program inside host ``i``'s namespace."""
        return ["ip", "netns", "exec", self.names[i]]

    def _tbf(self, ns: str, dev: str) -> None:
        rate_bytes = self.rate_bps / 8
        burst = int(max(32 * 1024, rate_bytes * 0.001))  # >= 1 ms of traffic: precise rate, GSO-sized packets pass
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                        "rate", f"{int(self.rate_bps)}bit", "burst", str(burst), "latency", "100ms"],
                       check=True, capture_output=True, text=True)

    def setup(self) -> None:
        remove_stale()
        with self._lock:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            _ip("-n", self.switch, "link", "set", "lo", "up")
            for i, ns in enumerate(self.names):
                self._add_ns(ns)
                _ip("link", "add", f"v{i}", "netns", self.switch, "type", "veth", "peer", "name", IFACE, "netns", ns)
                _ip("-n", self.switch, "link", "set", f"v{i}", "master", "br0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{host_address(i)}/{NET.prefixlen}", "dev", IFACE)
                _ip("-n", ns, "link", "set", IFACE, "up")
                self._tbf(ns, IFACE)  # upload
                self._tbf(self.switch, f"v{i}")  # download
                self._hosts_file(i, ns)

    def _hosts_file(self, i: int, ns: str) -> None:
        """``ip netns exec`` mounts /etc/netns/<ns>/hosts over /etc/hosts: inside host i the machine's
        hostname resolves to host i's own address. gloo devices created without an interface (Horovod
        0.28 does that for its process-set contexts) then bind to the namespace's link, not loopback."""
        d = NETNS_ETC / ns
        d.mkdir(parents=True, exist_ok=True)
        self._etc_dirs.append(d)
        (d / "hosts").write_text(f"127.0.0.1 localhost\n{host_address(i)} {socket.gethostname()} h{i}\n")

    def _add_ns(self, name: str) -> None:
        try:
            _ip("netns", "add", name)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"ip netns add {name} failed: {err.stderr.strip()}") from None
        self._created.append(name)

    def teardown(self) -> None:
        """Delete every namespace this object created (their veths and qdiscs go with them)."""
        with self._lock:
            for name in reversed(self._created):
                _ip("netns", "del", name, check=False)
            self._created.clear()
            for d in self._etc_dirs:
                shutil.rmtree(d, ignore_errors=True)
            self._etc_dirs.clear()
            try:
                NETNS_ETC.rmdir()  # only if empty (ours were the only ones)
            except OSError:
                pass
        self._restore_handlers()

    # ------------------------------------------------------------------ signals
    def _install_handlers(self) -> None:
        atexit.register(self.teardown)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            old = signal.getsignal(sig)
            self._old_handlers[sig] = old

            def handler(signum, frame, _old=old):
                self.teardown()
                if callable(_old):
                    _old(signum, frame)
                raise KeyboardInterrupt(f"signal {signum}")

            signal.signal(sig, handler)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
