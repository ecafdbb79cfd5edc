"""Start a group of processes, watch them against a deadline, always clean up.

The one process launcher of the tests, the benchmarks and the scripts. Every command runs in a session of
its own (so its process group holds whatever it starts, grandchildren included) with its output in a log
file. ``run`` starts a list of ``(argv, env)`` commands at once and waits for them; ``Launcher`` does the
same one ``start`` at a time. While waiting it can send signals when conditions hold (``Signal``: the fault
tests stop or kill a rank at a given step), records when each process exited and, when asked, stops the
others once one has failed. Whatever ends the wait -- every process done, a failure, the deadline, an
exception, Ctrl-C -- each group still running is continued and sent SIGTERM (a launcher such as torchrun
then stops the workers it started in sessions of their own), and after a grace period every group gets
SIGKILL: nothing a command started outlives the wait.

Exits are noticed without reaping the process (``waitid(WNOWAIT)``), so a group's id cannot be taken by an
unrelated process before the final SIGKILL reaches what is left of the group.

No torch here: the drivers import this before anything heavy.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = ["LaunchTimeout", "Launcher", "Result", "Sent", "Signal", "run"]


@dataclass(frozen=True)
class Signal:
    """Send ``sig`` to process ``index`` (the process, not its group), once, when ``when()`` first holds."""

    when: Callable[[], bool]
    index: int
    sig: int


@dataclass(frozen=True)
class Sent:
    """A ``Signal`` whose condition held: at ``time`` (``time.time()``); ``delivered`` is False when the
    process had already exited."""

    index: int
    sig: int
    time: float
    delivered: bool


@dataclass
class Result:
    argvs: list[list[str]]
    returncodes: list[int | None]  # None only in a LaunchTimeout's result for a process that never exited
    exit_times: list[float | None]  # time.time() when each process was seen to exit
    logs: list[Path]
    signals: list[Sent]
    stopped: list[int]  # still running when the launcher stopped them (deadline, failure or error)
    timed_out: bool = False

    def output(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace") if self.logs[i].exists() else ""

    @property
    def outputs(self) -> list[str]:
        return [self.output(i) for i in range(len(self.logs))]

    @property
    def failed(self) -> list[int]:
        """The processes that did not exit 0 (those stopped by the launcher included)."""
        return [i for i, rc in enumerate(self.returncodes) if rc != 0]

    def tails(self, indices: Iterable[int] | None = None, chars: int = 3000, errors_only: bool = False,
              most: int | None = None) -> str:
        """The last ``chars`` characters of the logs, each under a ``--- name (rc N)`` line; ``errors_only``:
        only logs that mention an error or a traceback; ``most``: at most that many logs."""
        parts = []
        for i in range(len(self.logs)) if indices is None else indices:
            text = self.output(i)
            if errors_only and "Error" not in text and "Traceback" not in text:
                continue
            state = "running" if self.returncodes[i] is None else f"rc {self.returncodes[i]}"
            parts.append(f"--- {self.logs[i].name} ({state})\n{text[-chars:]}")
        return "\n".join(parts[:most])


class LaunchTimeout(TimeoutError):
    """The processes did not finish in time; ``result`` is the state after they were stopped."""

    def __init__(self, message: str, result: Result):
        super().__init__(message)
        self.result = result


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM (``timeout``, a CI job's end) raises SystemExit in here, so ``finally`` cleans up rather than
    the process dying with its children left running; only in the main thread and where SIGTERM would
    simply have ended the process."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM wait until the block is done (cleanup is not cut short), then take effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if handler is not None}  # None: not Python's
    for sig in previous:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught:
            signal.raise_signal(sig)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Launcher:
    """Processes started one at a time (``start``), then watched together (``wait``) and always cleaned up
    (``close``, which ``wait`` and leaving a ``with`` block call). Single use."""

    def __init__(self, log_dir: Path | str, *, cwd: Path | str | None = None, label: str | None = None,
                 term_grace: float = 5.0, poll: float = 0.05):
        self.log_dir, self.cwd, self.label = Path(log_dir), cwd, label
        self.term_grace, self.poll = term_grace, poll
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[subprocess.Popen] = []
        self._argvs: list[list[str]] = []
        self._logs: list = []
        self._rcs: list[int | None] = []
        self._exit_times: list[float | None] = []
        self._sent: list[Sent] = []
        self._stopped: list[int] = []
        self._closed = False
        self._timed_out = False

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, argv: Sequence[str], env: dict | None = None, log_name: str | None = None) -> int:
        """Start ``argv`` in a session of its own, stdout and stderr to ``log_dir/log_name`` (default
        ``proc<i>.log``); returns its index."""
        if self._closed:
            raise RuntimeError("this Launcher has been closed")
        index = len(self._procs)
        log = open(self.log_dir / (log_name or f"proc{index}.log"), "w")
        self._logs.append(log)
        try:
            proc = subprocess.Popen(list(argv), cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self._logs.pop().close()
            raise
        self._procs.append(proc)
        self._argvs.append(list(argv))
        self._rcs.append(None)
        self._exit_times.append(None)
        return index

    def wait(self, timeout: float, *, actions: Iterable[Signal | tuple] = (), stop_on_failure: bool = False,
             failure_grace: float = 0.0, on_poll: Callable[[], None] | None = None) -> Result:
        """Wait until every process has exited, then clean up and return the result.

        ``actions``: ``Signal``s (or ``(when, index, sig)`` tuples), each sent once. ``stop_on_failure``: once
        a process exits non-zero, wait ``failure_grace`` seconds more (the others may report), then stop the
        rest. Raises ``LaunchTimeout`` (its message ends with the tails of the logs) when the processes are
        not done within ``timeout`` seconds. ``on_poll`` is called between polls (progress output).
        """
        pending = [a if isinstance(a, Signal) else Signal(*a) for a in actions]
        deadline = time.monotonic() + timeout
        with _sigterm_unwinds():
            try:
                self._watch(deadline, pending, stop_on_failure, failure_grace, on_poll)
            finally:
                self.close()
        result = self.result(timed_out=self._timed_out)
        if self._timed_out:
            label = self.label or str([argv[:4] for argv in self._argvs])
            raise LaunchTimeout(f"{label}: did not finish within {timeout:g} s:\n{result.tails()}", result)
        return result

    def _watch(self, deadline: float, pending: list[Signal], stop_on_failure: bool, failure_grace: float,
               on_poll: Callable[[], None] | None) -> None:
        failed_at = None
        while True:
            self._note_exits()
            if all(rc is not None for rc in self._rcs):
                break
            now = time.monotonic()
            if stop_on_failure and failed_at is None and any(rc not in (None, 0) for rc in self._rcs):
                failed_at = now
            if failed_at is not None and now - failed_at >= failure_grace:
                break
            if now > deadline:
                self._timed_out = True
                break
            for action in list(pending):
                if action.when():
                    pending.remove(action)
                    self._send(action)
            if on_poll is not None:
                on_poll()
            time.sleep(self.poll)

    def result(self, timed_out: bool = False) -> Result:
        for log in self._logs:
            if not log.closed:
                log.flush()
        return Result([list(a) for a in self._argvs], list(self._rcs), list(self._exit_times),
                      [Path(log.name) for log in self._logs], list(self._sent), list(self._stopped), timed_out)

    def close(self) -> None:
        """Stop what is still running (SIGCONT and SIGTERM to its group, SIGKILL after ``term_grace``), SIGKILL
        every group (what an exited process left behind), reap, close the logs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with _signals_deferred():
            self._close()

    def _close(self) -> None:
        try:
            self._note_exits()
            running = [i for i, rc in enumerate(self._rcs) if rc is None]
            self._stopped = running
            for i in running:
                _signal_group(self._procs[i].pid, signal.SIGCONT)
                _signal_group(self._procs[i].pid, signal.SIGTERM)
            grace_end = time.monotonic() + self.term_grace
            while any(self._rcs[i] is None for i in running) and time.monotonic() < grace_end:
                time.sleep(self.poll)
                self._note_exits()
            for proc in self._procs:  # exited leaders are not reaped yet: their group ids are still ours
                _signal_group(proc.pid, signal.SIGKILL)
            for i, proc in enumerate(self._procs):
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    continue
                if self._rcs[i] is None:
                    self._rcs[i], self._exit_times[i] = proc.returncode, time.time()
        finally:
            for log in self._logs:
                log.close()

    def _note_exits(self) -> None:
        """Record the processes that have exited since the last look, without reaping them."""
        for i, proc in enumerate(self._procs):
            if self._rcs[i] is not None:
                continue
            if proc.returncode is not None:  # reaped already (close)
                rc = proc.returncode
            else:
                try:
                    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:  # reaped elsewhere: Popen knows
                    if proc.poll() is None:
                        continue
                    rc = proc.returncode
                else:
                    if info is None or info.si_pid == 0:  # still running
                        continue
                    rc = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            self._rcs[i], self._exit_times[i] = rc, time.time()

    def _send(self, action: Signal) -> None:
        self._note_exits()
        alive = self._rcs[action.index] is None
        self._sent.append(Sent(action.index, action.sig, time.time(), alive))
        if alive:  # not reaped: the pid is still this process's, even if it has just exited
            try:
                os.kill(self._procs[action.index].pid, action.sig)
            except ProcessLookupError:
                pass


def run(commands: Sequence[tuple[Sequence[str], dict | None]], log_dir: Path | str, timeout: float, *,
        actions: Iterable[Signal | tuple] = (), stop_on_failure: bool = False, failure_grace: float = 0.0,
        cwd: Path | str | None = None, label: str | None = None, log_names: Sequence[str] | None = None,
        term_grace: float = 5.0, on_poll: Callable[[], None] | None = None) -> Result:
    """Start ``(argv, env)`` commands at once (logs ``log_dir/proc<i>.log`` or ``log_names``) and wait for
    them as ``Launcher.wait`` does; always cleaned up."""
    with Launcher(log_dir, cwd=cwd, label=label, term_grace=term_grace) as launcher:
        for i, (argv, env) in enumerate(commands):
            launcher.start(argv, env, log_names[i] if log_names else None)
        return launcher.wait(timeout, actions=actions, stop_on_failure=stop_on_failure, failure_grace=failure_grace,
                             on_poll=on_poll)
