"""The process launcher (``lightning_codedreduce._procs``): deadlines, cleanup of whole sessions, stopping on
failure, signal actions."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_codedreduce._procs import LaunchTimeout, Launcher, Signal, run

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]

# a grandchild that ignores SIGTERM (only the final SIGKILL of the group ends it), its pid in gc.pid
GRANDCHILD = "(trap '' TERM; exec sleep 1000) & echo $! > gc.pid"


def _state(pid: int) -> str | None:
    """The process's state letter (``Z`` zombie, ``T`` stopped), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _eventually_dead(pid: int, within: float = 20.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if _state(pid) in (None, "Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_timeout_kills_the_whole_group_and_reports_the_logs(tmp_path):
    with pytest.raises(LaunchTimeout) as err:
        run([(_sh(f"{GRANDCHILD}; echo started-and-sleeping; wait"), None)], tmp_path, timeout=5, cwd=tmp_path,
            label="sleeper", term_grace=0.5)
    assert "sleeper: did not finish within 5 s" in str(err.value)
    assert "started-and-sleeping" in str(err.value)  # the tail of its log
    res = err.value.result
    assert res.timed_out and res.stopped == [0]
    assert res.returncodes[0] == -signal.SIGTERM  # the leader got the SIGTERM
    assert _eventually_dead(int((tmp_path / "gc.pid").read_text()))  # the grandchild the SIGKILL


def test_leftovers_of_a_finished_process_are_killed(tmp_path):
    res = run([(_sh(GRANDCHILD), None)], tmp_path, timeout=60, cwd=tmp_path)
    assert res.returncodes == [0] and res.stopped == [] and not res.timed_out
    assert _eventually_dead(int((tmp_path / "gc.pid").read_text()))


def test_a_failure_stops_the_others_when_asked(tmp_path):
    t0 = time.time()
    res = run([(_sh("echo boom; exit 3"), None), (["sleep", "1000"], None)], tmp_path, timeout=100,
              stop_on_failure=True, log_names=["bad.log", "sleeper.log"])
    assert res.returncodes == [3, -signal.SIGTERM] and res.stopped == [1] and res.failed == [0, 1]
    assert t0 <= res.exit_times[0] <= res.exit_times[1]
    assert res.output(0) == "boom\n" and "--- bad.log (rc 3)\nboom" in res.tails(errors_only=False)
    assert res.tails(errors_only=True) == ""  # neither log mentions an error


def test_without_stop_on_failure_the_others_run_on(tmp_path):
    with pytest.raises(LaunchTimeout) as err:
        run([(_sh("exit 3"), None), (["sleep", "1000"], None)], tmp_path, timeout=3, term_grace=0.5)
    assert err.value.result.returncodes == [3, -signal.SIGTERM]


def test_signal_actions_are_delivered_once_and_recorded(tmp_path):
    calls = []

    def always():
        calls.append(1)
        return True

    pid_file = tmp_path / "p1.pid"

    def stopped():  # process 1 has been stopped by the first action
        return pid_file.exists() and _state(int(pid_file.read_text())) == "T"

    with Launcher(tmp_path, cwd=tmp_path) as launcher:
        launcher.start(["sleep", "1000"], None, "killed.log")
        launcher.start(_sh("echo $$ > p1.tmp && mv p1.tmp p1.pid && exec sleep 1000"), None)
        res = launcher.wait(100, actions=[Signal(always, 0, signal.SIGKILL),
                                          (lambda: pid_file.exists(), 1, signal.SIGSTOP),
                                          Signal(stopped, 1, signal.SIGKILL)])
    assert res.returncodes == [-signal.SIGKILL, -signal.SIGKILL] and res.stopped == []
    assert len(calls) == 1  # a condition that held is not asked again
    assert [(s.index, s.sig, s.delivered) for s in res.signals] == [
        (0, signal.SIGKILL, True), (1, signal.SIGSTOP, True), (1, signal.SIGKILL, True)]
    assert res.signals[1].time <= res.signals[2].time


def test_a_stopped_process_is_continued_and_terminated_at_cleanup(tmp_path):
    with pytest.raises(LaunchTimeout) as err:
        run([(["sleep", "1000"], None)], tmp_path, timeout=3, actions=[(lambda: True, 0, signal.SIGSTOP)])
    assert err.value.result.returncodes == [-signal.SIGTERM]  # SIGTERM took effect: it was continued first


def test_signal_to_an_exited_process_is_recorded_not_delivered(tmp_path):
    def exited():  # process 0 has touched its file and had half a second to exit; then process 1 may end
        if not (tmp_path / "exited").exists():
            return False
        time.sleep(0.5)
        (tmp_path / "fired").touch()
        return True

    res = run([(_sh("touch exited"), None), (_sh("while [ ! -e fired ]; do sleep 0.05; done"), None)], tmp_path,
              timeout=100, cwd=tmp_path, actions=[Signal(exited, 0, signal.SIGKILL)])
    assert res.returncodes == [0, 0]
    assert [(s.index, s.delivered) for s in res.signals] == [(0, False)]


def test_sigterm_to_the_waiting_process_still_cleans_up(tmp_path):
    """``timeout`` or a CI job sends the driver SIGTERM: it exits 143, after stopping what it started."""
    driver = ("from lightning_codedreduce._procs import run\n"
              f"run([(['sh', '-c', {GRANDCHILD + '; echo $$ > leader.pid; wait'!r}], None)], 'inner', timeout=60, "
              "term_grace=0.5)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = run([([sys.executable, "-c", driver], env)], tmp_path, timeout=100, cwd=tmp_path,
              actions=[Signal(lambda: (tmp_path / "leader.pid").exists(), 0, signal.SIGTERM)])
    assert res.returncodes == [128 + signal.SIGTERM], res.output(0)
    assert _eventually_dead(int((tmp_path / "leader.pid").read_text()))
    assert _eventually_dead(int((tmp_path / "gc.pid").read_text()))


def test_no_torch_at_import():
    code = "import sys, lightning_codedreduce._procs; sys.exit(int('torch' in sys.modules))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
