"""Start several commands (ranks, launcher agents), watch them with a timeout, always clean up.

The test-side face of the package's one process launcher (``lightning_codedreduce._procs``): arbitrary
command lines and environments (torchrun agents, the variables ``srun`` sets, ``horovodrun``), an
environment without other launchers' variables, and the results the ranks write.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lightning_codedreduce._procs import Signal, run
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

    Every process gets a session of its own; on timeout (``TimeoutError`` with the tails of the logs) or
    error all of them (and their children) are stopped.
    """
    signals = [Signal(functools.partial(condition, out_dir), index, sig) for condition, index, sig in actions]
    res = run(commands, out_dir, timeout, actions=signals, cwd=ROOT)
    return Group(res.returncodes, res.outputs, res.exit_times, out_dir, {s.index: s.time for s in res.signals})


MPI_BIN = ROOT / ".venv-mpi" / "bin"


def mpi_launcher() -> tuple[str, str]:
    """mpirun and a Python with mpi4py: ``make mpi`` (Open MPI and mpi4py from PyPI in .venv-mpi, seconds)."""
    if not (MPI_BIN.parent / ".installed").exists():
        proc = subprocess.run(["make", "mpi"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip("`make mpi` (Open MPI and mpi4py from PyPI into .venv-mpi) failed, so mpirun cannot be "
                        f"tested here: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return str(MPI_BIN / "mpirun"), str(MPI_BIN / "python")


def mpirun_env(**extra: str) -> dict:
    """``clean_env`` plus what Open MPI needs to run as root (containers)."""
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}
    return clean_env(**root, **extra)


def horovodrun_exe() -> str:
    """``horovodrun`` of the project's venv (``make test`` builds and installs Horovod first)."""
    venv_bin = Path(sys.executable).parent
    exe = shutil.which("horovodrun", path=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        pytest.skip("horovodrun is not installed (pip install horovod; benchmarks/horovod/build_wheel.sh builds "
                    "0.28.1 for this torch); see README, Launchers")
    if importlib.util.find_spec("horovod") is None:
        pytest.skip("horovodrun is on PATH but the horovod package is not importable by this Python")
    return exe
