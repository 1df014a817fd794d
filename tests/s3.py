"""An S3 endpoint for the tests: moto's server on the loopback address, in its own process (a real HTTP S3 that
boto3 reaches through AWS_ENDPOINT_URL, like MinIO or R2 in production)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from loraswap.bench.launch import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAFLEETTESTKEY0001",
    "AWS_SECRET_ACCESS_KEY": "fleet-secret-do-not-print-9f8e7d",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a process needs to reach this S3 (boto3 reads it)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def start(self) -> None:
        """(Re)start the server on the same port: moto keeps its objects in memory, so a restart is empty."""
        self.proc = _spawn(self.port)


def _spawn(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("moto's S3 server did not start within 60 s")


@contextmanager
def moto_s3(bucket: str | None = None) -> Iterator[S3]:
    """moto's S3 server, with `bucket` made in it; the process environment points boto3 at it while the context is
    open."""
    port = free_port()
    s3 = S3(_spawn(port), port)
    saved = {k: os.environ.get(k) for k in s3.env()}
    os.environ.update(s3.env())
    try:
        if bucket:
            make_bucket(bucket)
        yield s3
    finally:
        s3.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_bucket(name: str) -> None:
    import boto3

    boto3.session.Session().client("s3").create_bucket(Bucket=name)
