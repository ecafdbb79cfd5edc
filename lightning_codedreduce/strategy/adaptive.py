"""``stragglers="auto"``: the plan chosen from measurements while training, switched at agreed steps.

Call order, every optimizer step (the :class:`~.aggregation.GradientAggregator` calls both):

1. ``before_reduce(step)``: when a decided switch takes effect at ``step``, the strategy's ``reopen``
   closes the reducer and opens one for the new plan (every rank does this at the same step; opening is
   collective). The sampler already allocates this step by the new plan (step 3).
2. the step is computed (or skipped while catching up) and reduced;
3. ``after_reduce(step, record)``: the rank notes its seconds per sample. Every ``every`` steps each rank sends
   its notes to rank 0 without waiting, and rank 0 asks the :class:`~lightning_codedreduce.adapt.PlanAdvisor`
   and announces its decision with a result (``PlanSchedule.exchange``), effective far enough past that
   result that every rank learns it before its loader prefetches the step; every rank takes announced
   decisions in after every step and tells its sampler at once (the reducer is switched at that step:
   step 1). Over gloo's ring (balanced layout, s=0) two gathers carry the notes and the decision instead,
   and the switch takes effect at the first step beyond the loader's prefetch (or the next epoch).

The global batch never changes, so the training run is the one every fixed plan would give.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..adapt import Candidate, PlanAdvisor, PlanSchedule
from ..plan import CodedReducePlan
from ._common import FitContext, WarnOnce, log
from .data import TrainLoader


class PlanSwitcher:
    """``stragglers="auto"`` in the strategy: the :class:`~lightning_codedreduce.adapt.PlanSchedule` of one fit, and
    where a decided switch takes effect (beyond the loader's prefetch: the sampler is told at once).

    ``start`` hands it, for one fit, the advisor, the strategy's ``reopen(plan, start_step)`` that replaces
    the reducer (collectively) and ``gather`` over the reduce tree (``{rank: obj}`` of the live ranks).
    ``every``: optimizer steps between decisions (each costs two gathers that wait for every rank).
    """

    def __init__(self, every: int, loader: TrainLoader, warn: WarnOnce) -> None:
        self.every = every
        self._loader = loader
        self._warn = warn
        self._schedule: Optional[PlanSchedule] = None  # while a fit with stragglers="auto" trains
        self._reopen: Optional[Callable[[CodedReducePlan, int], None]] = None
        self._gather: Optional[Callable[[Any], dict[int, Any]]] = None
        self._fit: Optional[FitContext] = None
        self.decisions: list[dict[str, Any]] = []  # what was decided, when and why (StragglerMonitor shows them)

    def start(self, fit: FitContext, advisor: PlanAdvisor, current: Candidate,
              reopen: Callable[[CodedReducePlan, int], None], gather: Callable[[Any], dict[int, Any]]) -> None:
        self._fit, self._reopen, self._gather = fit, reopen, gather
        self._schedule = PlanSchedule(advisor, current, self.every)
        self.decisions = self._schedule.decisions

    @property
    def active(self) -> bool:
        """Whether this fit chooses its plan (``stragglers="auto"``)."""
        return self._schedule is not None

    def use(self, fit: FitContext) -> None:
        """The plan changed: the same fit with the new reducer."""
        self._fit = fit
        self._schedule.reset_announcements()

    def stop(self) -> None:
        self._schedule = self._fit = self._reopen = self._gather = None

    # ------------------------------------------------------------------ per step
    def before_reduce(self, step: int) -> None:
        plan = self._schedule.due(step) if self._schedule is not None else None
        if plan is not None:
            self._reopen(plan, step)
            log.info(f"[rank {self._fit.rank}] CodedReduce: plan {self._schedule.current.label} from step {step}")

    def after_reduce(self, step: int, compute_s: Optional[float], samples: int) -> None:
        if self._schedule is None:
            return
        accumulate = self._fit.trainer.accumulate_grad_batches

        def where(effective: int) -> dict[str, int]:  # announced: effective past this rank's prefetch
            epoch, batch = self._loader.position_after(effective - step, accumulate)
            return {"epoch": epoch, "batch": batch}

        for decision in self._schedule.after(step, compute_s, samples, self._fit.reducer, self._gather,
                                             lead=self._lead(), when=lambda found: self._switch_point(step),
                                             where=where):
            self._announce(decision)

    def _lead(self) -> int:
        """Steps past rank 0's result frontier for an announced switch. A rank learns of it at the latest after the
        frontier step, having drawn at most ``prefetched_batches`` more batches: one step, plus the steps those cover."""
        accumulate = max(1, self._fit.trainer.accumulate_grad_batches)
        return 1 + -(-self._loader.prefetched_batches // accumulate)

    def _switch_point(self, step: int) -> dict[str, int]:
        """Where a switch decided after ``step`` takes effect: beyond what the loader may have prefetched."""
        epoch, batch, ahead = self._loader.switch_point(self._fit.trainer.accumulate_grad_batches,
                                                        self._loader.prefetched_batches + 1)
        return {"epoch": epoch, "batch": batch, "effective_step": step + ahead}

    def _announce(self, decision: dict[str, Any]) -> None:
        candidate: Candidate = decision["candidate"]
        plan = self._schedule.advisor.plan(candidate)
        self._loader.sampler.switch_plan(decision["epoch"], decision["batch"], plan)
        if self._fit.rank != 0:
            return
        self._warn.info(f"auto_{decision['step']}", f"CodedReduce (stragglers='auto'): from step "
                        f"{decision['effective_step']} plan {candidate.label}: {decision['reason']}")
        for logger in getattr(self._fit.trainer, "loggers", []):
            logger.log_metrics({"codedreduce/stragglers": candidate.stragglers,
                                "codedreduce/predicted_gain": decision["gain"],
                                "codedreduce/redundancy": plan.redundancy}, step=decision["step"])
