"""``StragglerMonitor``: who straggled, how long each rank waited, and what waiting for all would have cost.

Per optimizer step and rank it records

* ``compute_s`` -- forward+backward wall time, injected delays included (the strategy's measurement
  under ``"codedreduce"``; under other strategies the callback's own, from ``on_train_batch_start`` to
  the backward's last parameter gradient -- so under ``"ddp"`` without the all-reduce wait that DDP
  completes inside the backward -- plus what a :class:`StragglerInjector` slept);
* ``step_s`` -- wall time since this rank's previous optimizer step ended;
* ``injected_s`` -- seconds a :class:`StragglerInjector` slept on this rank in this step;
* ``skipped`` -- 1 when the rank was lagging and applied an already-reduced result without computing;
* ``wait_s`` -- how long this rank's message waited for its children after its own gradient was ready;
* ``used`` / ``dropped`` -- children whose messages were decoded, and children whose messages had not
  arrived when this rank sent (the stragglers it did not wait for). A child whose message was there in
  time but was not needed (a redundant copy) is in neither list. With fractional-repetition codes the
  slower of two healthy replicas is dropped too whenever its twin was faster: the parent did not need
  it, so a persistent straggler shows up as the rank dropped far more often than the others;
* ``late`` -- dropped children whose message did arrive later (their arrival time is known);
* ``saved_s`` -- time saved against waiting for all children: last arrival of a dropped child minus the
  send time. A dropped child that had not arrived when the step's record was final (it usually skipped
  the step altogether) counts from the send time to that moment, and ``saved_is_lower_bound`` is 1;
* ``dead`` -- peers this rank found dead (tolerated) at this step.

Every rank writes ``<dir>/rank<r>.csv`` (flushed every row, so a rank that dies loses nothing it had
written) where ``<dir>`` is ``dirpath`` or ``<trainer.log_dir>/stragglers``. Rank 0 also sends scalars
(``straggler/wait_s``, ``straggler/saved_s``, ``straggler/compute_s``, ``straggler/dropped`` ...) to every
Lightning logger. At the end of ``fit`` rank 0 waits a bounded time for the other ranks' files -- no
collective, so a dead rank cannot hang it -- merges what exists into ``<dir>/stragglers.csv``, prints a
summary table (per rank: straggle count = times its parent dropped it, waits, time saved; under
``stragglers="auto"`` also every plan switch and why, saved to ``<dir>/plan_decisions.json``) and writes it to
``<dir>/summary.txt``. :func:`plot_stragglers` draws a PNG from the merged (or any rank's) CSV.

Rows are written a few steps behind training: a step's record in the reduce engine is final only once
later steps have been decoded.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Sequence

from ._clock import GradClock
from .report import (COLUMNS, DECISIONS_FILE, _fmt, _ids, _num, _parse_ids, format_summary, merge_csv, plot_stragglers,
                     read_rows, summarize)

try:
    from pytorch_lightning.callbacks import Callback
except ImportError:  # pragma: no cover
    from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)




class StragglerMonitor(Callback):
    """Per-step, per-rank straggler accounting to Lightning loggers, CSV files and a summary table.

    Args:
        dirpath: where the CSV files go (default ``<trainer.log_dir>/stragglers``; resolving the default
            broadcasts once from rank 0 during ``setup``).
        log_metrics: send rank 0's per-step scalars to the trainer's loggers.
        summary: print the end-of-fit summary table on rank 0.
        plot: also draw ``<dir>/stragglers.png`` at the end of fit (rank 0; needs matplotlib).
        merge_timeout: at most this many seconds rank 0 waits at the end of fit for other ranks' files.
        stale_s: a rank whose file has not changed for this long counts as gone (dead) while waiting.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, *, log_metrics: bool = True, summary: bool = True,
                 plot: bool = False, merge_timeout: float = 60.0, stale_s: float = 10.0) -> None:
        if merge_timeout < 0 or stale_s <= 0:
            raise ValueError(f"merge_timeout must be >= 0 and stale_s > 0, got {merge_timeout} and {stale_s}")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.log_metrics, self.print_summary, self.plot = log_metrics, summary, plot
        self.merge_timeout, self.stale_s = float(merge_timeout), float(stale_s)
        self.csv_path: str | None = None
        self.merged_path: str | None = None
        self.summary: list[dict] = []  # rank 0, after fit: one dict per rank (see summarize)
        self.summary_text: str = ""
        self._fits = 0
        self._file = None
        self._writer = None
        self._clock = GradClock()
        self._reset()

    def _reset(self) -> None:
        self._rank, self._world = 0, 1
        self._plan = None
        self._reducer = None
        self._records_seen = 0
        self._pending: dict[int, dict] = {}  # step -> the strategy's (or our) step record, not yet written
        self._stats: dict = {}  # step -> StepStats popped from the reducer, not yet written
        self._dead_seen: set[int] = set()
        self._new_dead: dict[int, list[int]] = {}  # step -> peers first seen dead then
        self._batch_t0: float | None = None
        self._compute_acc = 0.0
        self._backwards = 0
        self._last_global_step = 0
        self._last_step_end: float | None = None
        self._last_emitted = -1
        self._clock_offset = time.time() - time.monotonic()  # monotonic -> unix seconds on this host

    # ---------------------------------------------------------------- set-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()
        self._rank, self._world = int(trainer.global_rank), int(trainer.world_size)
        directory = self.dirpath
        if directory is None:  # every rank runs setup, so the broadcast inside log_dir cannot hang here
            directory = os.path.join(trainer.log_dir or trainer.default_root_dir, "stragglers")
        self._dir = directory
        os.makedirs(directory, exist_ok=True)
        self.csv_path = os.path.join(directory, f"rank{self._rank}.csv")
        self.merged_path = os.path.join(directory, "stragglers.csv")
        done = os.path.join(directory, f"rank{self._rank}.done")
        if os.path.exists(done):
            os.remove(done)
        mode = "w" if self._fits == 0 else "a"  # a second fit with the same callback appends
        self._fits += 1
        self._file = open(self.csv_path, mode, newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        if mode == "w" or self._file.tell() == 0:
            self._writer.writeheader()
            self._file.flush()

    def on_train_start(self, trainer, pl_module) -> None:
        strategy = trainer.strategy
        self._plan = getattr(strategy, "plan", None)
        records = getattr(strategy, "step_records", None)
        self._records_seen = len(records) if records is not None else 0
        self._last_global_step = int(trainer.global_step)
        self._last_step_end = time.monotonic()
        if records is None:  # no strategy measurement: time the backward's compute ourselves
            self._clock.attach(pl_module)

    # ---------------------------------------------------------------- per step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_t0 = time.monotonic()

    def on_after_backward(self, trainer, pl_module) -> None:
        compute = self._clock.since(self._batch_t0, time.monotonic())
        if compute is not None:
            self._compute_acc += compute
            self._backwards += 1
        self._batch_t0 = time.monotonic()  # a further backward in this step counts from here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._writer is None:
            return
        now = time.monotonic()
        strategy = trainer.strategy
        records = getattr(strategy, "step_records", None)
        stepped = int(trainer.global_step) > self._last_global_step
        step_s = None
        if stepped:
            step_s = now - self._last_step_end if self._last_step_end is not None else None
            self._last_step_end = now
        if records is not None:
            if len(records) < self._records_seen:  # the strategy started a new list
                self._records_seen = 0
            for rec in records[self._records_seen:]:
                self._add_record(dict(rec), now, step_s, trainer)
            self._records_seen = len(records)
        elif stepped:
            self._add_record({"step": int(trainer.global_step) - 1,
                              "compute_s": self._compute_acc if self._backwards else None,
                              "skipped": False}, now, step_s, trainer, own_measure=True)
        if stepped:
            self._last_global_step = int(trainer.global_step)
            self._compute_acc, self._backwards = 0.0, 0
        reducer = getattr(strategy, "reducer", None)
        if reducer is not None and reducer is not self._reducer:
            self._collect()  # stragglers="auto" switched the plan: the old reducer's finished steps first
            self._reducer = reducer
        self._collect()
        self._emit(trainer, final=False)

    def _add_record(self, rec: dict, now: float, step_s: float | None, trainer, own_measure: bool = False) -> None:
        step = int(rec["step"])
        injected = 0.0
        for cb in trainer.callbacks:
            table = getattr(cb, "injected", None)
            if isinstance(table, dict) and step in table:
                injected += table.pop(step)
        compute = rec.get("compute_s")
        if own_measure and compute is not None:
            compute += injected  # our clock stops at the last gradient, before the injector's sleep
        self._pending[step] = {"step": step, "compute_s": compute, "skipped": bool(rec.get("skipped")),
                               "time_s": now + self._clock_offset, "step_s": step_s, "injected_s": injected,
                               "plan": getattr(trainer.strategy, "plan", None) or self._plan}  # "auto" may switch

    def _collect(self) -> None:
        reducer = self._reducer
        if reducer is None:
            return
        finished = getattr(reducer, "finished_stats", None)
        while finished:
            try:
                stat = finished.popleft()
            except IndexError:
                break
            self._stats[stat.step] = stat
        dead = dict(getattr(reducer, "dead", {}) or {})
        plan = getattr(reducer, "plan", None)
        for peer in sorted(set(dead) - self._dead_seen):
            self._dead_seen.add(peer)
            # attributed to the newest step this rank reported (rows are written a few steps later)
            at = max(self._pending) if self._pending else self._last_emitted + 1
            self._new_dead.setdefault(at, []).append(peer)
            tolerated = plan is None or plan.survives(dead)
            log.warning("rank %d: peer rank %d died (%s); %s", self._rank, peer, dead[peer],
                        "CodedReduce tolerated it and goes on" if tolerated else
                        "the plan cannot do without it: training stops (resume from the last checkpoint)")

    def _peek_unfinished(self) -> None:
        """At the end, the engine's last steps are not final yet: read them (racy, but only counters)."""
        reducer = self._reducer
        every_step = getattr(reducer, "stats", None) if reducer is not None else None  # the engine's public API
        if every_step is None:
            return
        for _ in range(5):
            try:
                items = every_step()
                break
            except RuntimeError:  # changed size while the protocol thread ran
                time.sleep(0.01)
        else:
            return
        for stat in items:
            if stat.step not in self._stats and getattr(stat, "result", None) is not None:
                self._stats[stat.step] = stat

    def _emit(self, trainer, final: bool) -> None:
        has_engine = self._reducer is not None and getattr(self._reducer, "tracks_steps", True)
        now = time.monotonic()
        for step in sorted(self._pending):
            stat = self._stats.get(step)
            if has_engine and stat is None and not final and not any(s > step for s in self._stats):
                break  # its engine record is not final yet (it comes in step order)
            if has_engine and stat is not None and not final and step + 1 not in self._stats:
                break  # wait for the next step's record: it bounds when this one became final
            rec = self._pending.pop(step)
            row = self._row(rec, stat, self._stats.get(step + 1), now)
            self._stats.pop(step, None)
            self._writer.writerow(row)
            if self._rank == 0 and self.log_metrics:
                self._log(trainer, row)
            self._last_emitted = step
        for step in [s for s in self._stats if s <= self._last_emitted]:
            del self._stats[step]  # engine records of steps this rank never reported (bounded memory)
        self._file.flush()

    def _row(self, rec: dict, stat, next_stat, now: float) -> dict:
        rank = self._rank
        plan = rec.get("plan") or self._plan
        parent = plan.parent(rank) if plan is not None else None
        children = list(plan.children(rank)) if plan is not None else []
        row = {"rank": rank, "step": rec["step"], "time_s": _fmt(rec["time_s"], 4), "parent": "" if parent is None else parent,
               "compute_s": _fmt(rec["compute_s"]), "step_s": _fmt(rec["step_s"]),
               "injected_s": _fmt(rec["injected_s"]), "skipped": int(rec["skipped"]), "wait_s": "",
               "children": _ids(children), "used": "", "dropped": "", "late": "", "saved_s": "",
               "saved_is_lower_bound": 0, "dead": ""}
        dead = [p for st in [st for st in self._new_dead if st <= rec["step"]] for p in self._new_dead.pop(st)]
        row["dead"] = _ids(dead)
        if stat is None:
            return row
        if stat.local_ready is not None and stat.sent is not None:
            row["wait_s"] = _fmt(stat.waited)
        row["used"] = _ids(stat.used)
        if stat.sent is None or not children:  # skipped (the result came first), or a leaf: nothing dropped
            return row
        arrivals = dict(stat.arrivals)
        dropped = [c for c in children if c not in stat.used and not (c in arrivals and arrivals[c] <= stat.sent)]
        late = [c for c in dropped if c in arrivals]
        never = [c for c in dropped if c not in arrivals]
        saved = 0.0
        if late:
            saved = max(arrivals[c] for c in late) - stat.sent
        bound = False
        if never:
            # not arrived when the record became final: that happened once the next step was decoded
            final_at = now
            if next_stat is not None:
                times = [t for t in (next_stat.sent, next_stat.result) if t is not None]
                if times:
                    final_at = min(times)
            final_at = max(final_at, stat.result or stat.sent)
            saved = max(saved, final_at - stat.sent)
            bound = True
        row.update(dropped=_ids(dropped), late=_ids(late), saved_s=_fmt(max(0.0, saved)) if dropped else _fmt(0.0),
                   saved_is_lower_bound=int(bound))
        return row

    def _log(self, trainer, row: dict) -> None:
        metrics = {}
        for key in ("compute_s", "step_s", "wait_s", "saved_s", "injected_s"):
            value = _num(row[key])
            if value is not None:
                metrics[f"straggler/{key}"] = value
        metrics["straggler/skipped"] = float(row["skipped"])
        if row["children"]:
            metrics["straggler/dropped"] = float(len(_parse_ids(row["dropped"])))
            metrics["straggler/used"] = float(len(_parse_ids(row["used"])))
        metrics["straggler/dead"] = float(len(self._dead_seen))
        for logger in trainer.loggers:
            try:
                logger.log_metrics(metrics, step=int(row["step"]))
            except Exception as err:  # a logger problem must not stop training
                log.warning("StragglerMonitor could not log to %s: %s", type(logger).__name__, err)

    # ---------------------------------------------------------------- end of fit
    def _finish_rank(self, trainer, status: str) -> None:
        if self._writer is None:
            return
        try:
            self._collect()
            self._peek_unfinished()
            self._emit(trainer, final=True)
        finally:
            self._file.close()
            self._file, self._writer = None, None
            with open(os.path.join(self._dir, f"rank{self._rank}.done"), "w") as f:
                f.write(status + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        self._clock.detach()
        self._finish_rank(trainer, "ok")

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._rank == 0 and self.csv_path is not None:
            # the strategy's agreement at the end of training may name a death that no step row saw
            dead = sorted(getattr(trainer.strategy, "known_dead", ()))
            self._merge_and_report(self.merge_timeout, failed=False, dead=dead,
                                   decisions=getattr(trainer.strategy, "plan_decisions", ()))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._clock.detach()
        try:
            self._finish_rank(trainer, f"failed: {type(exception).__name__}: {exception}".replace("\n", " "))
        except Exception as err:  # pragma: no cover - never mask the original error
            log.warning("StragglerMonitor could not finish rank %d's file: %s", self._rank, err)
        if self._rank == 0 and self.csv_path is not None:
            try:
                self._merge_and_report(min(self.merge_timeout, 2 * self.stale_s), failed=True)
            except Exception as err:  # pragma: no cover
                log.warning("StragglerMonitor could not merge the straggler files: %s", err)

    def _wait_for_ranks(self, timeout: float) -> list[int]:
        """Bounded wait for the other ranks' ``.done`` markers; returns the ranks that never finished."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            missing = [r for r in range(self._world) if not os.path.exists(os.path.join(self._dir, f"rank{r}.done"))]
            now = time.monotonic()
            if not missing or now >= deadline:
                return missing

            def stale(r: int) -> bool:
                try:
                    age = time.time() - os.path.getmtime(os.path.join(self._dir, f"rank{r}.csv"))
                except OSError:
                    age = now - start
                return age > self.stale_s

            if all(stale(r) for r in missing):
                return missing
            time.sleep(0.1)

    def _merge_and_report(self, timeout: float, failed: bool, dead: Sequence[int] = (),
                          decisions: Sequence[dict] = ()) -> None:
        missing = self._wait_for_ranks(timeout)
        paths = [os.path.join(self._dir, f"rank{r}.csv") for r in range(self._world)]
        merge_csv([p for p in paths if os.path.exists(p)], self.merged_path)
        rows = read_rows(self.merged_path)
        self.summary = summarize(rows, world_size=self._world)
        note = []
        if missing:
            note.append(f"ranks {missing} did not finish (dead or still running): their rows may be incomplete")
        if failed:
            note.append("the fit stopped with an error")
        try:
            shown = os.path.relpath(self.merged_path)
        except ValueError:  # another drive
            shown = self.merged_path
        if shown.startswith(os.pardir):
            shown = self.merged_path
        self.summary_text = format_summary(self.summary, title=f"straggler summary ({shown})", notes=note, dead=dead,
                                           decisions=decisions)
        with open(os.path.join(self._dir, DECISIONS_FILE), "w") as f:
            json.dump(list(decisions), f, indent=1)
        with open(os.path.join(self._dir, "summary.txt"), "w") as f:
            f.write(self.summary_text + "\n")
        if self.print_summary:
            print(self.summary_text, flush=True)
        if self.plot:
            try:
                plot_stragglers(self.merged_path, os.path.join(self._dir, "stragglers.png"))
            except Exception as err:
                log.warning("StragglerMonitor could not draw the plot: %s", err)


# -------------------------------------------------------------------- files, summary, plot
