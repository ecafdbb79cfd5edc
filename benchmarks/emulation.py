"""Emulated compute and traffic counters, shared by every training loop of the benchmark.

``bench_worker.py`` (the harness's own loops) and ``hvd_script.py`` (a Horovod-API script) must inject
stragglers and pad compute in exactly the same way, or their step times would not be comparable. Both
therefore go through :class:`EmulatedCompute`: per step a rank waits out its emulated compute time (its
share of the batch at the workload's speed, plus the straggler model's delay), shortened by the running
mean of the real forward/backward time that follows, so that the real compute overlaps the pad.
"""
from __future__ import annotations

import time
from pathlib import Path

from lightning_codedreduce.sim import Stragglers


def net_bytes() -> tuple[int, int]:
    """(received, sent) bytes of this process's network namespace, loopback excluded (0 on loopback runs)."""
    rx = tx = 0
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return 0, 0
    for line in lines:
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            continue
        values = fields.split()
        rx, tx = rx + int(values[0]), tx + int(values[8])
    return rx, tx


def sleep_until(t: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``t`` (in slices, so a long pad stays interruptible)."""
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


class EmulatedCompute:
    """One rank's emulated compute: ``wait`` before a step's real forward/backward, ``ran`` after it.

    ``base_s`` is the rank's compute time per step at its normal share; the straggler model's delays are
    multiples of it (heavy stalls: of wall-clock time, see ``Stragglers``).
    """

    def __init__(self, stragglers: Stragglers, rank: int, base_s: float) -> None:
        self.stragglers, self.rank, self.base_s = stragglers, rank, base_s
        self._ema: float | None = None  # running mean of the real compute per step

    def wait(self, step: int, base_s: float | None = None) -> dict:
        """Sleep until this step's emulated compute would end, less the real compute still to come; returns
        the step record's ``start``, ``target_end`` and ``stall``. ``base_s``: this step's compute time when
        the share changed (a slow rank is slow per sample: a smaller share, a shorter delay)."""
        base = self.base_s if base_s is None else base_s
        start = time.monotonic()
        _, stall = self.stragglers.finish(self.rank, step, start)
        if self.stragglers.scales_with_compute(step) and self.base_s > 0:
            stall *= base / self.base_s
        end = start + base + stall
        sleep_until(end - (self._ema or 0.0))
        return {"start": start, "target_end": end, "stall": stall}

    def ran(self, rec: dict, real_s: float, c1: float) -> None:
        """Record the step's real compute (``real_s`` seconds, ended at ``c1``) and update the running mean."""
        self._ema = real_s if self._ema is None else 0.7 * self._ema + 0.3 * real_s
        rec.update(real=real_s, c1=c1)
