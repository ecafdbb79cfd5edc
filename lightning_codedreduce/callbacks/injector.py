"""``StragglerInjector``: reproducible straggler delay models for experiments and tests.

A straggling rank sleeps in ``on_after_backward`` -- after its gradient is computed, before it is
handed to the reduce -- so the sleep delays exactly what a slow worker delays. A rank that lags
under ``strategy="codedreduce"`` and applies an already-reduced step without computing runs no
backward for that step (or one that computes no parameter gradient) and therefore does not sleep
either: it catches up, as a real slow worker would. Works under any strategy (``"ddp"`` too).

The paper model measures a rank's forward+backward compute from ``on_train_batch_start`` to the last
parameter gradient of the backward pass (a post-accumulate-grad hook), which under DDP excludes the
wait for the all-reduce that DDP completes inside the backward: a straggler is ``factor`` times slower
at computing under every strategy, not ``factor`` times slower at communicating.

Three models::

    StragglerInjector(delays={3: 0.2})                 # rank 3 sleeps 0.2 s in every step
    StragglerInjector.paper(ranks=[3], factor=3.0)     # rank 3 runs 3x slower than it measures itself
    StragglerInjector.random(p=0.1, shift=0.05, scale=0.1, seed=0)
        # every rank straggles with probability p per step, for shift + Exponential(scale) seconds;
        # the decision for (rank, step) comes from a generator seeded with (seed, rank, step),
        # so a run is reproducible whatever the timing and whichever ranks lag.

``delay(rank, step, measured_s)`` is the pure function behind the hooks (handy for planning an
experiment); ``injected`` maps step -> seconds slept on this rank (``StragglerMonitor`` reads it).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from ._clock import GradClock

try:
    from pytorch_lightning.callbacks import Callback
except ImportError:  # pragma: no cover - the unified package only
    from lightning.pytorch.callbacks import Callback

_MODELS = ("fixed", "paper", "random")


def _seconds(name: str, value: object) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return out


def _rank_set(ranks: Iterable[int] | None) -> frozenset[int] | None:
    if ranks is None:
        return None
    if isinstance(ranks, int):
        ranks = [ranks]
    out = frozenset(int(r) for r in ranks)
    if any(r < 0 for r in out):
        raise ValueError(f"ranks must be global ranks >= 0, got {sorted(out)}")
    return out


class StragglerInjector(Callback):
    """Makes chosen ranks slow, reproducibly. Use the constructors below; see the module docstring.

    Args:
        delays: ``{rank: seconds}`` -- that rank sleeps that long once per optimizer step.
        sleep: the sleep function (tests pass a recorder instead of ``time.sleep``).
    """

    def __init__(self, delays: Mapping[int, float] | None = None, *, sleep: Callable[[float], None] = time.sleep,
                 _model: str = "fixed", _ranks: Iterable[int] | None = None, factor: float = 3.0,
                 p: float = 0.0, shift: float = 0.0, scale: float = 0.0, seed: int = 0) -> None:
        if _model not in _MODELS:
            raise ValueError(f"unknown straggler model {_model!r}; use one of {_MODELS}")
        self.model = _model
        self.delays = {int(r): _seconds(f"delays[{r}]", s) for r, s in (delays or {}).items()}
        if any(r < 0 for r in self.delays):
            raise ValueError(f"delays keys must be global ranks >= 0, got {sorted(self.delays)}")
        self.ranks = _rank_set(_ranks)
        factor = float(factor)
        if not math.isfinite(factor) or factor < 1.0:
            raise ValueError(f"factor must be >= 1 (how many times slower a straggler runs), got {factor}")
        self.factor = factor
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.p = p
        self.shift = _seconds("shift", shift)
        self.scale = _seconds("scale", scale)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.sleep = sleep
        self.injected: dict[int, float] = {}  # step -> seconds slept on this rank
        self._t0: float | None = None
        self._slept_step: int | None = None
        self._clock = GradClock()

    # ---------------------------------------------------------------- constructors
    @classmethod
    def paper(cls, ranks: Iterable[int], factor: float = 3.0, **kwargs) -> "StragglerInjector":
        """The paper's model: ``ranks`` run ``factor`` times slower than they are.

        Each micro-batch such a rank sleeps ``(factor - 1)`` times its forward+backward wall time,
        measured from ``on_train_batch_start`` to the backward's last parameter gradient (to
        ``on_after_backward`` where parameter hooks are unavailable).
        """
        chosen = _rank_set(ranks)
        if not chosen:
            raise ValueError("StragglerInjector.paper needs at least one rank, e.g. ranks=[3]")
        return cls(_model="paper", _ranks=chosen, factor=factor, **kwargs)

    @classmethod
    def random(cls, p: float = 0.1, shift: float = 0.05, scale: float = 0.1, seed: int = 0,
               ranks: Iterable[int] | None = None, **kwargs) -> "StragglerInjector":
        """Each rank (of ``ranks``, default all) straggles with probability ``p`` per step, sleeping
        ``shift + Exponential(mean=scale)`` seconds; decisions are seeded by ``(seed, rank, step)``."""
        return cls(_model="random", _ranks=ranks, p=p, shift=shift, scale=scale, seed=seed, **kwargs)

    # ---------------------------------------------------------------- the model
    def delay(self, rank: int, step: int, measured_s: float = 0.0) -> float:
        """Seconds ``rank`` sleeps at ``step`` (``measured_s``: its forward+backward time, paper model)."""
        if self.model == "fixed":
            return self.delays.get(rank, 0.0)
        if self.ranks is not None and rank not in self.ranks:
            return 0.0
        if self.model == "paper":
            return (self.factor - 1.0) * max(0.0, measured_s)
        rng = np.random.default_rng([self.seed, int(rank), int(step)])
        if rng.random() >= self.p:
            return 0.0
        return self.shift + (float(rng.exponential(self.scale)) if self.scale > 0 else 0.0)

    def __repr__(self) -> str:
        if self.model == "fixed":
            return f"StragglerInjector(delays={self.delays})"
        if self.model == "paper":
            return f"StragglerInjector.paper(ranks={sorted(self.ranks or ())}, factor={self.factor})"
        ranks = "all" if self.ranks is None else sorted(self.ranks)
        return (f"StragglerInjector.random(p={self.p}, shift={self.shift}, scale={self.scale}, "
                f"seed={self.seed}, ranks={ranks})")

    # ---------------------------------------------------------------- hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0, self._slept_step = None, None

    def on_train_start(self, trainer, pl_module) -> None:
        self._clock.attach(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._clock.detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._clock.detach()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.monotonic()

    def on_after_backward(self, trainer, pl_module) -> None:
        rank, step = int(trainer.global_rank), int(trainer.global_step)
        now = time.monotonic()
        measured = self._clock.since(self._t0, now)
        if measured is None:
            seconds = 0.0  # this backward computed no parameter gradient (a step skipped while catching up)
        elif self.model == "paper":
            # every micro-batch (and every loss chunk) is slowed in proportion to its own compute
            seconds = self.delay(rank, step, measured)
        elif self._slept_step == step:
            seconds = 0.0  # once per optimizer step, however many backward passes it takes
        else:
            seconds = self.delay(rank, step)
            self._slept_step = step
        if seconds > 0:
            self.sleep(seconds)
            self.injected[step] = self.injected.get(step, 0.0) + seconds
            # bounded: the monitor pops what it reads; without one, keep the most recent steps only
            if len(self.injected) > 100_000:
                for old in sorted(self.injected)[:50_000]:
                    del self.injected[old]
        self._t0 = time.monotonic()  # a further backward in this step measures only its own compute
