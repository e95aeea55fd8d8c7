"""Job processes: each job in a fresh fork of a warm pool child (worker.job_process)."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from worker.job_process import JobProcesses

# Set by "the template" before it forks: a job process sees it without loading it again.
LOADED: dict[str, int] = {}


def _nothing() -> None:
    pass


def _no_warm_up(_job_waiting: Callable[[], bool]) -> None:
    pass


def _pid_and_template(job_id: str) -> str:
    return f"{job_id} ran in {os.getpid()} with {LOADED.get('template', 0)}"


def _gone(pid: int, timeout: float = 5) -> bool:
    """True once ``pid`` has exited (a zombie counts: only its parent can reap it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def test_each_job_runs_in_a_fresh_fork_that_has_what_the_template_loaded() -> None:
    LOADED["template"] = os.getpid()
    processes = JobProcesses(_nothing, _no_warm_up, _pid_and_template)
    processes.fork_ahead()
    try:
        first = processes.run("a").split()
        second = processes.run("b").split()
    finally:
        processes.close()
    assert first[:2] == ["a", "ran"] and second[:2] == ["b", "ran"]
    assert int(first[-1]) == int(second[-1]) == os.getpid()  # what the template had loaded
    ran_in = {int(first[3]), int(second[3])}
    assert len(ran_in) == 2 and os.getpid() not in ran_in  # a process of its own each


def _frozen_count(job_id: str) -> str:
    return f"{job_id} {gc.get_freeze_count()}"


def test_a_job_process_gets_the_templates_objects_frozen_and_the_template_keeps_its_own() -> None:
    # Frozen, the job process's collector never walks (and so never copies) the pages of
    # what the template loaded; the template's own garbage is still collected.
    before = gc.get_freeze_count()
    processes = JobProcesses(_nothing, _no_warm_up, _frozen_count)
    processes.fork_ahead()
    try:
        said = processes.run("a").split()
    finally:
        processes.close()
    assert said[0] == "a"
    assert int(said[1]) >= len(gc.get_objects()) // 2  # nearly all of this process's objects
    assert gc.get_freeze_count() == before == 0


def test_the_warm_up_runs_before_the_job_and_is_told_when_the_job_has_arrived(
    tmp_path: Path,
) -> None:
    marks = tmp_path / "marks"

    def warm_up(job_waiting: Callable[[], bool]) -> None:
        # Forked ahead with no job yet: the warm-up runs to its end, unhurried.
        time.sleep(0.3)
        marks.write_text(f"waiting={job_waiting()}")

    def job(job_id: str) -> str:
        return f"{job_id} after {marks.read_text()}"

    processes = JobProcesses(_nothing, warm_up, job)
    processes.fork_ahead()
    time.sleep(1)  # the job comes after the warm-up is over
    try:
        assert processes.run("a", then_fork_ahead=False) == "a after waiting=False"
        # Forked when the job is already there: the warm-up is told so at once.
        assert processes.run("b", then_fork_ahead=False) == "b after waiting=True"
    finally:
        processes.close()


# Set in a job process by the hand-back signal, as the worker's SHUTDOWN is.
HANDED_BACK = threading.Event()


def _listen_for_hand_back() -> None:
    signal.signal(signal.SIGUSR2, lambda *_: HANDED_BACK.set())


def _wait_for_hand_back(job_id: str) -> str:
    Path(job_id).write_text("running")
    return "handed back" if HANDED_BACK.wait(10) else "never told"


def test_a_forwarded_signal_reaches_the_running_job_and_every_later_one(
    tmp_path: Path,
) -> None:
    processes = JobProcesses(_listen_for_hand_back, _no_warm_up, _wait_for_hand_back)
    first, second = tmp_path / "first", tmp_path / "second"
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(processes.run(str(first))))
    runner.start()
    deadline = time.monotonic() + 10
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    processes.forward()
    runner.join(10)
    assert outcome == ["handed back"]
    # The worker is going away: no process is forked ahead, and a job that still comes is
    # told as soon as its process listens (the signal waits for that, it is not lost).
    assert processes.ahead is None
    assert processes.run(str(second)) == "handed back"
    assert processes.ahead is None
    assert not HANDED_BACK.is_set()  # only the job processes were told


def test_a_job_process_killed_mid_job_is_reported_as_died(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    def hang(job_id: str) -> str:
        pid_file.write_text(str(os.getpid()))
        time.sleep(60)
        return "finished"

    processes = JobProcesses(_nothing, _no_warm_up, hang)
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(processes.run("a")))
    runner.start()
    deadline = time.monotonic() + 10
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    runner.join(10)
    processes.close()
    assert outcome == ["died: SIGKILL"]


def test_ready_names_the_process_forked_ahead_and_that_process_runs_the_job() -> None:
    processes = JobProcesses(_nothing, _no_warm_up, _pid_and_template)
    try:
        named = processes.ready()  # forks one when none is ahead
        assert processes.ready() == named == processes.ahead  # and keeps it until it runs
        ran_in = int(processes.run("a").split()[3])
        assert ran_in == named  # the pid a claim records is the trainer's
        assert processes.ahead not in (None, named)  # the next job's, forked after it
    finally:
        processes.close()


def test_a_process_forked_ahead_that_died_while_waiting_is_replaced(tmp_path: Path) -> None:
    processes = JobProcesses(_nothing, _no_warm_up, _pid_and_template)
    processes.fork_ahead()
    ahead = processes.ahead
    assert ahead is not None
    os.kill(ahead, signal.SIGKILL)
    assert _gone(ahead)
    replacement = processes.ready()
    assert replacement != ahead
    ran_in = int(processes.run("a", then_fork_ahead=False).split()[3])
    assert ran_in == replacement
    processes.close()


def test_close_ends_the_process_forked_ahead_and_reaps_it() -> None:
    processes = JobProcesses(_nothing, _no_warm_up, _pid_and_template)
    processes.fork_ahead()
    ahead = processes.ahead
    assert ahead is not None
    processes.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(ahead, os.WNOHANG)  # already reaped: not a child any more
    assert _gone(ahead, timeout=0.1)


def test_a_job_process_dies_with_the_process_that_forked_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "job-process"
    template = os.fork()
    if template == 0:  # the pool child: forks a job process ahead, says its pid, waits
        try:
            processes = JobProcesses(_nothing, _no_warm_up, _pid_and_template)
            processes.fork_ahead()
            pid_file.write_text(str(processes.ahead))
            time.sleep(60)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 10
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    job_process = int(pid_file.read_text())
    assert not _gone(job_process, timeout=0.2)
    os.kill(template, signal.SIGKILL)
    os.waitpid(template, 0)
    assert _gone(job_process)
