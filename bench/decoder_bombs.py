"""Time to refusal of progressive-JPEG decoder bombs at /predict, and health meanwhile.

Prints, from one run against `mnistq api` (gunicorn, SQLite, over real HTTP):
  1. for a 0.5 MB and a ~1 MB bomb (4096x4096, thousands of scans): the status, error
     code and seconds until the answer, each of --repeat posts;
  2. the same bombs through the decoding child with the scan cap lifted: the seconds until
     its hard CPU limit stops it (what any bomb that slipped past the checks would cost);
  3. a normal 140x140 PNG digit: the seconds per prediction, for scale;
  4. /api/v1/health latency (p50, max, failures) polled every 50 ms while the bombs ran;
  5. with --unguarded: each bomb decoded in full by Pillow in this process, as /predict did
     before the checks (minutes on a busy machine).

    python bench/decoder_bombs.py [--repeat 3] [--unguarded]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.db import SESSIONS_KEY  # noqa: E402
from tests.api.bombs import scan_bomb  # noqa: E402
from tests.api.conftest import add_artifact, add_user, insert_job  # noqa: E402
from worker.training.image_decode import (  # noqa: E402
    DecodeLimits,
    ImageTooLarge,
    decode_isolated,
    jpeg_scans,
)

SIDE = 4096
BOMB_SIZES = {"0.5 MB": 500_000, "1 MB": 1_000_000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digit_png() -> bytes:
    image = Image.new("L", (140, 140), 0)
    ImageDraw.Draw(image).line([(30, 20), (30, 120), (110, 120)], fill=255, width=12)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def model_bytes() -> bytes:
    import torch

    from worker.training.nets import build_model

    buffer = io.BytesIO()
    torch.save(build_model("tutorial_cnn").state_dict(), buffer)
    return buffer.getvalue()


def prepare(tmp: Path) -> tuple[dict[str, str], str, str]:
    """A migrated SQLite database with a user and a succeeded job with a model: env, token, job."""
    from api import create_app
    from shared.config import Settings
    from shared.migrate import upgrade
    from shared.store import LocalStore

    env = {
        "MNISTQ_DATABASE_URL": f"sqlite:///{tmp / 'mnistq.db'}",
        "MNISTQ_VAR_DIR": str(tmp / "var"),
        "MNISTQ_ARTIFACT_DIR": str(tmp / "artifacts"),
        "MNISTQ_BROKER_URL": "filesystem://",
    }
    (tmp / "var" / "broker" / "queue").mkdir(parents=True)  # health: the broker is "up"
    upgrade(env["MNISTQ_DATABASE_URL"])
    settings = Settings(
        database_url=env["MNISTQ_DATABASE_URL"], var_dir=tmp / "var",
        artifact_dir=tmp / "artifacts",
    )  # fmt: skip
    sessions = create_app(settings, publish=lambda job, queue: None).extensions[SESSIONS_KEY]
    caller = add_user(sessions, "bench")
    job_id = insert_job(sessions, status="succeeded", n_epochs=1, owner_id=caller.id)
    add_artifact(sessions, LocalStore(settings.artifact_dir), job_id, "model.pth", model_bytes())
    return env, caller.token, job_id


def wait_until_up(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/api/v1/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("the API did not come up")


class HealthProbe(threading.Thread):
    """Polls health every 50 ms until stopped; keeps each latency (None for a failure)."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.seen: list[float | None] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                ok = requests.get(f"{self.base}/api/v1/health", timeout=5).status_code == 200
                self.seen.append(time.monotonic() - started if ok else None)
            except requests.RequestException:
                self.seen.append(None)
            time.sleep(0.05)


def post(base: str, token: str, job_id: str, data: bytes, media: str) -> tuple[int, str, float]:
    started = time.monotonic()
    response = requests.post(
        f"{base}/api/v1/jobs/{job_id}/predict", data=data, timeout=120,
        headers={"Authorization": f"Bearer {token}", "Content-Type": media},
    )  # fmt: skip
    body = response.json()
    return (
        response.status_code,
        str(body.get("error") or body.get("digit")),
        time.monotonic() - started,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--unguarded", action="store_true", help="also time a plain decode")
    args = parser.parse_args()
    bombs = {name: scan_bomb(SIDE, size=size) for name, size in BOMB_SIZES.items()}
    with tempfile.TemporaryDirectory() as folder:
        env, token, job_id = prepare(Path(folder))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mnistq"), "api", "--port", str(port)],
            env={**os.environ, **env}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_until_up(base)
            post(base, token, job_id, digit_png(), "image/png")  # torch loads in the API
            probe = HealthProbe(base)
            probe.start()
            print(f"1. bombs at /predict ({SIDE}x{SIDE} progressive JPEG, real HTTP)")
            for name, data in bombs.items():
                for _ in range(args.repeat):
                    status, code, seconds = post(base, token, job_id, data, "image/jpeg")
                    scans = jpeg_scans(data, 10**9)
                    print(f"   {name} ({len(data)} B, {scans} scans): {status} {code} "
                          f"in {seconds:.3f} s")  # fmt: skip
            probe.stop.set()
            probe.join()
            normal = [post(base, token, job_id, digit_png(), "image/png")[2] for _ in range(5)]
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("2. the same bombs with the scan cap lifted: the child's hard CPU limit")
    lifted = DecodeLimits(max_jpeg_scans=10**9)
    for name, data in bombs.items():
        started = time.monotonic()
        try:
            decode_isolated(data, lifted)
            outcome = "decoded (!)"
        except ImageTooLarge as exc:
            outcome = f"refused: {exc}"
        print(f"   {name}: {outcome} after {time.monotonic() - started:.2f} s")
    print(f"3. a 140x140 PNG digit: {statistics.median(normal):.3f} s per prediction (median of 5)")
    good = [s for s in probe.seen if s is not None]
    failed = len(probe.seen) - len(good)
    print(f"4. health during the bombs: {len(probe.seen)} probes, p50 "
          f"{statistics.median(good) * 1000:.1f} ms, max {max(good) * 1000:.1f} ms, "
          f"{failed} failed")  # fmt: skip
    if args.unguarded:
        print("5. the same bombs decoded in full in this process (no checks, no child)")
        for name, data in bombs.items():
            started = time.monotonic()
            Image.open(io.BytesIO(data)).load()
            print(f"   {name}: {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
