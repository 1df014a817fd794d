"""Start `loraswap serve` as a child process on a free port, wait until it is healthy, stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    base: str,
    adapters_dir: Path,
    quant: str = "nf4",
    max_batch_size: int = 16,
    env: dict[str, str] | None = None,
    log: IO[bytes] | int | None = subprocess.DEVNULL,
    timeout: float = 300,
    double_quant: bool = True,
) -> tuple[subprocess.Popen[bytes], str]:
    """The server on 127.0.0.1, in its own process group; returns (process, base URL) once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "loraswap.main", "serve", "--base", base, "--port", str(port)]
    cmd += ["--max-batch-size", str(max_batch_size), "--quant", quant]
    cmd += [] if double_quant or quant not in ("nf4", "fp4") else ["--no-double-quant"]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "LORASWAP_ADAPTERS_DIR": str(adapters_dir), **(env or {})},
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, timeout)
    return proc, url


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float, name: str = "the server") -> None:
    """Return once `url`/health answers 200; raise if `proc` exits first, or stop it and raise after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before it was ready")
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{name} was not healthy within {timeout:.0f} s")


def log_tail(log: IO[bytes], chars: int = 3000) -> str:
    """The last `chars` characters a process wrote to `log`, a file."""
    log.flush()
    return Path(log.name).read_text(errors="replace")[-chars:]


def launch_with_log(
    base: str,
    adapters_dir: Path,
    quant: str,
    max_batch_size: int,
    env: dict[str, str],
    log: IO[bytes],
    timeout: float = 600,
    double_quant: bool = True,
) -> tuple[subprocess.Popen[bytes], str]:
    """`launch` with the server's output going to `log`, a file; a start that fails raises with its last lines."""
    try:
        return launch(
            base, adapters_dir, quant, max_batch_size, env, log=log, timeout=timeout, double_quant=double_quant
        )
    except RuntimeError as e:
        raise RuntimeError(f"{e}; the server's last output:\n{log_tail(log)}") from None


def stop(proc: subprocess.Popen[bytes], graceful: bool = False) -> None:
    """Stop the server and every process it started (SIGTERM drains running requests first)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM if graceful and proc.poll() is None else signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
