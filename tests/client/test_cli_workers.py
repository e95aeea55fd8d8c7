"""`mnistq workers | queues | priority` and `submit --priority` against a live server."""

from __future__ import annotations

import time

import pytest

from tests.client.conftest import Server

pytestmark = [pytest.mark.integration]


def test_workers_and_queues_print_tables_of_the_live_system(server: Server) -> None:
    assert server.worker.popen is not None
    pid = f" {server.worker.popen.pid} "
    deadline = time.monotonic() + 60  # the worker registers once it is ready
    while pid not in (workers := server.cli("workers")).out and time.monotonic() < deadline:
        time.sleep(0.5)
    assert workers.code == 0, workers
    header, *rows = workers.out.splitlines()
    assert header.split()[:5] == ["ID", "HOST", "PID", "QUEUES", "SLOTS"]
    mine = next(r for r in rows if pid in r)
    assert mine.split()[3:5] == ["cpu", "1"] and mine.split()[-1] == "live"
    queues = server.cli("queues")
    assert queues.code == 0, queues
    assert queues.out.splitlines()[0].split() == ["QUEUE", "QUEUED", "RUNNING", "OLDEST", "WAIT",
                                                  "LIVE", "WORKERS"]  # fmt: skip
    cpu = next(line for line in queues.out.splitlines() if line.startswith("cpu "))
    assert cpu.split()[-1] == "1"


def test_submit_with_a_priority_then_change_it_while_it_waits(server: Server) -> None:
    # A cuda job waits on the gpu queue, which no worker of this stack serves.
    submitted = server.cli("submit", "--device", "cuda", "--priority", "40")
    assert submitted.code == 0, submitted
    job_id = submitted.out.strip()
    assert server.client.get(job_id).priority == 40
    changed = server.cli("priority", job_id, "-5")
    assert changed.code == 0, changed
    assert changed.out.startswith(f"{job_id}: priority -5")
    assert server.client.get(job_id).priority == -5
    refused = server.cli("priority", job_id, "101")
    assert refused.code == 2 and "101" in refused.err
    server.client.cancel(job_id)
    finished = server.cli("priority", job_id, "1")
    assert finished.code == 1 and "only a queued job" in finished.err, finished


def test_draining_needs_an_id_and_an_unknown_one_is_an_error(server: Server) -> None:
    missing = server.cli("workers", "drain")
    assert missing.code == 2 and "needs the worker's ID" in missing.err
    unknown = server.cli("workers", "drain", "0" * 32)
    assert unknown.code == 1 and "no worker with id" in unknown.err, unknown
