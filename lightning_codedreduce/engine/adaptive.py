"""``stragglers="auto"`` for plain PyTorch loops: a :class:`CodedReducer` whose plan follows
:class:`~lightning_codedreduce.adapt.PlanAdvisor`'s decisions.

Call order, every step ``t``, on every rank::

    reducer.begin(t)                       # a decided switch takes effect here (collective: waits for all)
    plan = reducer.plan                    # allocate step t's global batch by it: plan.shards(rank, B)
    if reducer.ready(t):                   # catching up: the others reduced t without us
        g = reducer.result(t)
    else:
        ...forward/backward on plan.shards(rank, B)...
        g = reducer.reduce(t, local)
    reducer.end(t, compute_s, samples)     # notes; every ``every`` steps a decision round (waits for nobody)

Every ``every`` steps each rank sends its notes to rank 0 and rank 0 announces any switch with a result
(``adapt.PlanSchedule.exchange``): it takes effect at a step every rank learns before it begins it, so
only the switch itself (opening the new reducer) waits for every rank. Over gloo's ring (balanced
layout, s=0) a collective carries the round instead, and the switch takes effect at ``t + 1``. The
global batch is the caller's and never changes, so the training is the same whatever the plan.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..adapt import Candidate, PlanAdvisor, PlanSchedule
from ..plan import CodedReducePlan
from .reducer import CodedReducer


class AdaptiveReducer:
    """Args:
        plan: the first plan (its ``stragglers`` and ``speeds`` are the advisor's current candidate).
        advisor: predicts and decides (its world size, layout and global batch are the caller's).
        open_reducer: ``(plan, start_step) -> CodedReducer``, called collectively at the first step and at
            every switch (e.g. with a private gloo group each time, as the strategy does).
        every: steps between decision rounds.
        start_step: the first step number.
    """

    def __init__(self, plan: CodedReducePlan, advisor: PlanAdvisor,
                 open_reducer: Callable[[CodedReducePlan, int], CodedReducer], *, every: int = 50, start_step: int = 0):
        self.plan = plan
        self.schedule = PlanSchedule(advisor, Candidate(plan.stragglers, plan.speeds, plan.layout), every)
        self._open = open_reducer
        self.reducer: CodedReducer = open_reducer(plan, start_step)

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return self.schedule.decisions

    # ------------------------------------------------------------------ the CodedReducer calls a loop needs
    def ready(self, step: int) -> bool:
        return self.reducer.ready(step)

    def result(self, step: int) -> torch.Tensor:
        return self.reducer.result(step)

    def reduce(self, step: int, local, **kwargs):
        return self.reducer.reduce(step, local, **kwargs)

    def close(self) -> None:
        self.reducer.close()

    def wait_for_peers(self, timeout: float) -> list[int]:
        return self.reducer.wait_for_peers(timeout)

    # ------------------------------------------------------------------ adapting
    def begin(self, step: int) -> None:
        """Before ``step``: when a switch takes effect here, close the reducer and open one for the new plan."""
        plan = self.schedule.due(step)
        if plan is None:
            return
        old = self.reducer
        old.close()
        old.wait_for_peers(old.timeout)  # a peer still catching up gets the old plan's last results first
        self.plan, self.reducer = plan, self._open(plan, step)
        self.schedule.reset_announcements()

    def end(self, step: int, compute_s: Optional[float] = None, samples: int = 0) -> None:
        """After ``step``: note this rank's seconds per sample (``compute_s`` None: it did not compute the step);
        every ``every`` steps, a decision round."""
        gather = lambda obj: self.reducer.all_gather_object(obj)[0]  # noqa: E731 - {rank: obj} of the live ranks
        self.schedule.after(step, compute_s, samples, self.reducer, gather,
                            when=lambda found: {"effective_step": step + 1})
