"""`mnistq submit | list | status | watch | cancel | download` against a live server."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.client.conftest import CLI, ROOT, Server, Trained, cli_env, run_cli
from tests.integration.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.mnist]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_submit_watch_trains_exits_zero_and_prints_the_final_accuracy(trained: Trained) -> None:
    job, result = trained.job, trained.result
    assert result.code == 0, result
    assert job.status == "succeeded" and job.test_accuracy is not None
    assert job.test_accuracy >= 0.93
    last = result.out.strip().splitlines()[-1]
    assert last == (
        f"succeeded after 1 epoch(s): test loss {job.test_loss:.4f}, "
        f"accuracy {job.test_accuracy:.2%}"
    )
    # The live bar: one per epoch, with loss, samples/s and the batch count reaching the end.
    assert "epoch 1/1" in result.err and "100/100" in result.err, result.err
    assert "img/s" in result.err and "loss " in result.err
    assert job.hyperparameters["optimizer"] == "adam" and job.name == "cli-trained"


def test_list_shows_the_job_in_a_table(server: Server, trained: Trained) -> None:
    result = server.cli("list", "--status", "succeeded")
    assert result.code == 0, result
    header, *rows = result.out.splitlines()
    assert header.split()[:5] == ["ID", "NAME", "STATUS", "PROGRESS", "ACCURACY"]
    row = next(r for r in rows if r.startswith(trained.job.id))
    assert row.split()[1:5] == [
        "cli-trained", "succeeded", "100%", f"{trained.job.test_accuracy:.2%}",
    ]  # fmt: skip


def test_status_prints_a_summary_or_the_raw_json(server: Server, trained: Trained) -> None:
    text = server.cli("status", trained.job.id)
    assert text.code == 0, text
    assert f"job       {trained.job.id} (cli-trained)" in text.out
    assert "status    succeeded" in text.out and "model.pth" in text.out
    raw = server.cli("status", trained.job.id, "--json")
    assert json.loads(raw.out) == server.api.job(trained.job.id)


def test_logs_prints_the_jobs_log_and_follow_ends_with_the_job(
    server: Server, trained: Trained
) -> None:
    printed = server.cli("logs", trained.job.id)
    assert printed.code == 0, printed
    lines = printed.out.splitlines()
    assert lines[0].startswith("claimed by worker ") and lines[1] == "training from scratch on cpu"
    assert lines[2].startswith("Test set: Avg. loss: ")  # the untrained net, before epoch 1
    assert "Train Epoch: 1 [0/60000 (0%)]\tLoss: " in printed.out
    assert lines[-1].startswith("succeeded: test loss ")
    text = server.api.http.get(f"{server.url}/api/v1/jobs/{trained.job.id}/logs.txt", timeout=10)
    assert printed.out == text.text
    # -f on a finished job: everything, then it returns (the stream ends).
    followed = server.cli("logs", "-f", trained.job.id, timeout=30)
    assert followed.code == 0 and followed.out == printed.out, followed


def test_download_fetches_every_artifact_and_each_sha256_matches(
    server: Server, trained: Trained, tmp_path: Path
) -> None:
    listing = {a["name"]: a for a in server.api.get(f"/jobs/{trained.job.id}/artifacts")["items"]}
    result = server.cli("download", trained.job.id, "-o", str(tmp_path / "all"))
    assert result.code == 0, result
    written = {str(Path(p).relative_to(tmp_path / "all")) for p in result.out.split()}
    assert written == set(listing) >= {"model.pth", "checkpoints/epoch-1.pt", "loss_curve.png"}
    for name, artifact in listing.items():
        assert sha256(tmp_path / "all" / name) == artifact["sha256"], name
    one = server.cli("download", trained.job.id, "model.pth", "-o", str(tmp_path / "one"))
    assert one.code == 0 and [p.name for p in (tmp_path / "one").iterdir()] == ["model.pth"]
    missing = server.cli("download", trained.job.id, "nope.bin", "-o", str(tmp_path / "x"))
    assert missing.code == 1 and "has no artifact 'nope.bin'" in missing.err


def test_watch_shows_why_a_job_waits_and_exits_non_zero_when_it_is_cancelled(
    server: Server,
) -> None:
    # No worker serves the gpu queue here, so a cuda job waits until it is cancelled.
    job_id = server.cli("submit", "--device", "cuda", "--n-epochs", "1").out.strip()
    env = cli_env(server.url, server.token)
    watch = subprocess.Popen(
        [*CLI, "watch", job_id, "--poll", "0.2"], env=env, cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        time.sleep(1.5)  # a few polls while queued
        cancelled = server.cli("cancel", job_id)
        out, err = watch.communicate(timeout=30)
    finally:
        watch.kill()
    assert cancelled.code == 0 and cancelled.out.strip() == f"{job_id} cancelled"
    assert watch.returncode == 4, (out, err)
    assert err.startswith("queued: no live worker serves the 'gpu' queue; start one with"), err
    assert out.strip().splitlines()[-1] == "cancelled"
    again = server.cli("cancel", job_id)
    assert again.code == 1 and "only queued or running jobs can be cancelled" in again.err


# Reaches NaN within the first log intervals (as in the integration tests).
DIVERGES = ["--learning-rate", "10", "--momentum", "0.99", "--weight-decay", "1"]


def test_watch_of_a_failed_job_prints_why_and_exits_non_zero(server: Server) -> None:
    result = server.cli("submit", "--n-epochs", "1", "--log-interval", "2", *DIVERGES, "--watch")
    assert result.code == 3, result
    assert result.out.strip().splitlines()[-1].startswith("failed: TrainingDiverged: ")


def test_a_down_server_is_a_one_line_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("list", url=url, token="mnq_x")
    assert result.code == 1
    assert result.err == f"Error: cannot reach the mnistq server at {url}\n"


def test_a_bad_token_is_a_one_line_error(server: Server) -> None:
    result = server.cli("list", token="mnq_not-a-real-token")
    assert result.code == 1
    assert result.err == (
        "Error: the token is unknown or revoked (give a token with --token or MNISTQ_TOKEN)\n"
    )


def test_an_unknown_job_is_a_one_line_error(server: Server) -> None:
    for command in ("status", "watch", "cancel", "download"):
        result = server.cli(command, "nosuchjob")
        assert (result.code, result.err) == (1, "Error: no job with id 'nosuchjob'\n"), command


def test_fields_the_server_refuses_are_listed(server: Server) -> None:
    result = server.cli("submit", "--resume-from", "nosuchjob:1", "--n-epochs", "2")
    assert result.code == 1
    assert result.err == "Error: invalid request: body.resume_from.job_id: no job with this id\n"
    local = server.cli("submit", "--n-epochs", "0")  # refused before anything is sent
    assert local.code == 2 and "--n-epochs: Input should be greater than or equal to 1" in local.err
