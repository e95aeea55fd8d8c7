"""Each job in a fresh process, forked from a pool child that stays warm for the next one.

A worker's pool child is a template. Once, as it starts, it imports torch and the engine,
maps MNIST and compiles the claim's statements; it never starts torch's thread pool or CUDA,
so a fork of it is sound. Ahead of each job it forks a job process, which builds what the job
needs (torch's threads, each model's kernels, CUDA where there is a GPU) while it waits, takes
the one job its pool child hands it (claimed by the child already, for this process), runs
it and exits. So a job pays no imports and no data, and nothing of one job (memory, threads,
CUDA state) reaches the next; the pool child, which never trains, serves job after job.

A job process dies with its pool child (``PR_SET_PDEATHSIG``), as a job run in the child
itself did, and a signal the child should pass on (the worker's hand-back) is forwarded to
the job process that runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from worker.pool import wait_until_warm, warm_up_in_background

logger = logging.getLogger(__name__)

# The outcome of a job whose process died before it said how the job ended.
DIED = "died"

_PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass
class JobProcess:
    """A forked job process, seen from its pool child: its pid and its two pipe ends."""

    pid: int
    job_ids: int  # write end: the job goes there, once
    outcome: int  # read end: the outcome comes back, then end of file
    _status: int | None = field(default=None, init=False)  # once reaped

    def exited(self) -> bool:
        """True once the process has exited (it is reaped then)."""
        if self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._status = status
        return self._status is not None

    def hand_over(self, job: str) -> bool:
        """Give the process its job; False if it is gone (it died while it waited)."""
        try:
            os.write(self.job_ids, f"{job}\n".encode())
            return True
        except BrokenPipeError:
            return False
        finally:
            os.close(self.job_ids)

    def wait(self) -> str:
        """Block until the process exits; the outcome it reported, or how it died."""
        with os.fdopen(self.outcome, "rb") as reply:
            said = reply.read().decode(errors="replace").strip()
        if self._status is None:
            _, self._status = os.waitpid(self.pid, 0)
        status = self._status
        if said:
            return said
        if os.WIFSIGNALED(status):
            return f"{DIED}: {signal.Signals(os.WTERMSIG(status)).name}"
        return f"{DIED}: exit status {os.waitstatus_to_exitcode(status)}"

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)


class JobProcesses:
    """The job processes of one pool child: one forked ahead, one running at most.

    ``started`` runs first in each job process (connections, its handler of ``hand_back``);
    ``prepare`` is its warm-up, given a check that turns true once its job has arrived (see
    ``worker.pool.warm_up_in_background``); ``run`` runs a job (a line of text the pool child
    hands over) and returns its outcome. ``hand_back`` is the signal ``forward`` passes on: a
    job process receives it only once ``started`` has run (until then it is held back, not
    lost).
    """

    def __init__(
        self,
        started: Callable[[], None],
        prepare: Callable[[Callable[[], bool]], None],
        run: Callable[[str], str],
        hand_back: signal.Signals = signal.SIGUSR2,
    ) -> None:
        self._started, self._prepare, self._run = started, prepare, run
        self._hand_back = hand_back
        self._next: JobProcess | None = None
        self._running: JobProcess | None = None
        self._handing_back = False  # forwarded once: every later job gets it too

    @property
    def ahead(self) -> int | None:
        """The pid of the process forked for the next job, if there is one."""
        return self._next.pid if self._next is not None else None

    def fork_ahead(self) -> None:
        """Fork the process of the next job now, so that it warms up before the job comes.

        Only from the thread that runs tasks, while no other thread of this process runs:
        the job process dies with the thread that forked it.
        """
        if self._next is None and not self._handing_back:
            self._next = self._fork()

    def ready(self) -> int:
        """The pid of the process that will run the next job: the one forked ahead, or a new
        one if there is none or it died while it waited."""
        if self._next is not None and self._next.exited():
            os.close(self._next.job_ids)
            self._next.wait()
            self._next = None
        if self._next is None:
            self._next = self._fork()
        return self._next.pid

    def run(self, job: str, *, then_fork_ahead: bool = True) -> str:
        """Run ``job`` (one line: what the job process's ``run`` is given) in the process
        ``ready`` names, or in a new one if that one has died since."""
        self.ready()
        process, self._next = self._next, None
        assert process is not None
        if not process.hand_over(job):  # died just now
            process.wait()
            process = self._fork()
            process.hand_over(job)
        self._running = process
        if self._handing_back:  # asked before this process was running
            process.signal(self._hand_back)
        try:
            return process.wait()
        finally:
            self._running = None
            if then_fork_ahead:
                self.fork_ahead()

    def close(self) -> None:
        """As the pool child exits: end the process forked ahead and wait until it is gone,
        so that nothing of the worker outlives it (its death signal alone is asynchronous)."""
        process, self._next = self._next, None
        if process is not None:
            os.close(process.job_ids)
            process.signal(signal.SIGKILL)
            process.wait()

    def forward(self) -> None:
        """Pass the hand-back on to the job process that runs, and to any that runs later
        (the worker is going away: no process is forked ahead any more)."""
        self._handing_back = True
        if self._running is not None:
            self._running.signal(self._hand_back)

    def _fork(self) -> JobProcess:
        job_ids_r, job_ids_w = os.pipe()
        outcome_r, outcome_w = os.pipe()
        parent = os.getpid()
        # Held back in the new process until its handler is in place (the mask is inherited).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {self._hand_back})
        # The new process gets the template's objects frozen: its collector never walks
        # them, which would copy every page they lie on (a full collection in a job process
        # took 375 ms of a tiny job's 2 s here). The pool child thaws its own at once, so its
        # garbage is still collected.
        gc.freeze()
        try:
            pid = os.fork()
        finally:
            if os.getpid() == parent:
                gc.unfreeze()
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid == 0:
            os.close(job_ids_w)
            os.close(outcome_r)
            self._serve(parent, mask, job_ids_r, outcome_w)
        os.close(job_ids_r)
        os.close(outcome_w)
        return JobProcess(pid, job_ids_w, outcome_r)

    def _serve(
        self, parent: int, mask: set[int | signal.Signals], job_ids: int, outcome: int
    ) -> NoReturn:
        """The job process: warm up, wait for the job, run it, report, exit."""
        code = 1
        try:
            _die_with(parent)
            self._next = self._running = None  # this process forks nothing
            self._started()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            warm_up_in_background(self._prepare)
            with os.fdopen(job_ids, "rb") as incoming:
                job = incoming.readline().decode().strip()
            if job:  # end of file: the pool child is gone or has no job after all
                wait_until_warm()
                said = self._run(job)
                os.write(outcome, said.encode())
            code = 0
        except BaseException:
            logger.exception("job process %d failed", os.getpid())
        finally:
            logging.shutdown()  # flush what was logged; os._exit skips it
            os._exit(code)


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)
