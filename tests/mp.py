"""Run a worker script as W real processes over gloo: free port, timeout, signals, guaranteed cleanup."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    returncodes: list[int]
    outputs: list[str]
    out_dir: Path

    def result(self, rank: int) -> dict:
        return json.loads((self.out_dir / f"rank{rank}.json").read_text())

    def check(self) -> None:
        bad = [r for r, rc in enumerate(self.returncodes) if rc != 0]
        assert not bad, "ranks %s failed:\n%s" % (bad, "\n".join(f"--- rank {r}\n{self.outputs[r][-3000:]}" for r in bad))


def launch(script: str, world_size: int, args: list[str], out_dir: Path, timeout: float = 120.0,
           actions=(), env: dict | None = None) -> Run:
    """Start ``world_size`` ranks of ``tests/<script>``; ``actions`` are ``(when_s, rank, signal)``
    tuples sent while the ranks run (``when_s`` may be a callable of the out_dir returning bool)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    try:
        for rank in range(world_size):
            log = open(out_dir / f"rank{rank}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / script), *args, "--out", str(out_dir)],
                                          env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        start = time.monotonic()
        pending = sorted(actions, key=lambda a: a[0] if not callable(a[0]) else 0)
        deadline = start + timeout
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{script} with {world_size} ranks did not finish in {timeout} s")
            for action in list(pending):
                when, rank, sig = action
                due = when(out_dir) if callable(when) else now - start >= when
                if due:
                    pending.remove(action)
                    if procs[rank].poll() is None:
                        os.kill(procs[rank].pid, sig)
            time.sleep(0.05)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
        return Run([p.returncode for p in procs], outputs, out_dir)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        for log in logs:
            log.close()
