"""Run a worker script as W real processes over gloo (free port, timeout, signals, guaranteed cleanup).

A thin layer over ``tests/procs.py``: one ``tests/<script>`` per rank with the variables torchrun sets.
"""
from __future__ import annotations

import json
from pathlib import Path

from procs import PY, ROOT, Group, clean_env, free_port, run_all

__all__ = ["ROOT", "Run", "free_port", "launch"]


class Run(Group):
    """A ``Group`` whose ranks write ``rank<r>.json``."""

    def result(self, rank: int) -> dict:  # type: ignore[override]
        return json.loads((self.out_dir / f"rank{rank}.json").read_text())


def launch(script: str, world_size: int, args: list[str], out_dir: Path, timeout: float = 120.0,
           actions=(), env: dict | None = None) -> Run:
    """Start ``world_size`` ranks of ``tests/<script>``; ``actions`` are ``(condition(out_dir) -> bool, rank,
    signal)`` triples, each signal sent once when its condition first holds."""
    port = str(free_port())
    commands = [([PY, str(ROOT / "tests" / script), *args, "--out", str(out_dir)],
                 clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world_size), RANK=str(rank),
                           LOCAL_RANK=str(rank), **(env or {})))
                for rank in range(world_size)]
    group = run_all(commands, out_dir, timeout, actions)
    return Run(group.returncodes, group.outputs, group.exit_times, out_dir, group.actions_done)
