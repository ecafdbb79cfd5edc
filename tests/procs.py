"""Start several commands (ranks, launcher agents), watch them with a timeout, always clean up.

Like ``tests/mp.py`` but for arbitrary command lines and environments (torchrun agents, the variables
``srun`` sets, ``horovodrun``) and recording when each process exited.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightning_codedreduce._util import free_port  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# variables of other launchers that must not leak into a simulated one
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "NODE_RANK")
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "HOROVOD_", "OMPI_", "PMI_", "PMIX_", "LSB_", "JSM_")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class Group:
    returncodes: list[int]
    outputs: list[str]
    exit_times: list[float]  # time.time() when each process was seen to exit
    out_dir: Path
    actions_done: dict = field(default_factory=dict)

    def check(self, ranks=None) -> None:
        ranks = range(len(self.returncodes)) if ranks is None else ranks
        bad = [r for r in ranks if self.returncodes[r] != 0]
        assert not bad, "processes %s failed:\n%s" % (
            bad, "\n".join(f"--- {r} (rc {self.returncodes[r]})\n{self.outputs[r][-4000:]}" for r in bad))

    def result(self, name: str, rank: int) -> dict:
        path = self.out_dir / f"{name}.rank{rank}.json"
        assert path.exists(), f"no {path.name}; outputs:\n" + "\n".join(o[-3000:] for o in self.outputs)
        return json.loads(path.read_text())


def run_all(commands: list[tuple[list[str], dict]], out_dir: Path, timeout: float, actions=()) -> Group:
    """Run ``(argv, env)`` commands at once; ``actions`` are ``(condition(out_dir) -> bool, index, signal)``.

    Every process gets a session of its own; on timeout or error all of them (and their children) are killed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    exit_times: list[float | None] = [None] * len(commands)
    done: dict = {}
    try:
        for i, (argv, env) in enumerate(commands):
            log = open(out_dir / f"proc{i}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(argv, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        pending = list(actions)
        deadline = time.monotonic() + timeout
        while True:
            for i, p in enumerate(procs):
                if exit_times[i] is None and p.poll() is not None:
                    exit_times[i] = time.time()
            if all(t is not None for t in exit_times):
                break
            if time.monotonic() > deadline:
                outs = []
                for log in logs:
                    log.seek(0)
                    outs.append(log.read()[-3000:])
                raise TimeoutError(f"{[c[0][:4] for c in commands]} did not finish in {timeout} s:\n" + "\n".join(outs))
            for action in list(pending):
                condition, index, sig = action
                if condition(out_dir):
                    pending.remove(action)
                    done[index] = time.time()
                    if procs[index].poll() is None:
                        os.kill(procs[index].pid, sig)
            time.sleep(0.05)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
        return Group([p.returncode for p in procs], outputs, exit_times, out_dir, done)
    finally:
        running = [p for p in procs if p.poll() is None]
        for p in running:  # a launcher stops its workers (sessions of their own) on SIGTERM
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for p in running:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the session: whatever is left of it
            except (ProcessLookupError, PermissionError):
                pass
            if p.poll() is None:
                p.wait(10)
        for log in logs:
            log.close()
