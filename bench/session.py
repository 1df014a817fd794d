"""A server to measure, for the bench and the soak: started here or attached to, with synthetic adapters on it.

A `Session` (a context manager) holds a temporary folder for the synthetic adapters and the server's log.
`synthesise` writes rank-8 LoRAs with random weights in the base's real shapes; `start` launches
`loraswap serve` on the base (or takes the server at the URL given); `upload` sends an adapter through
POST /v1/adapters and remembers it. On leaving, a server started here is stopped (SIGTERM: running
requests drain), and on a server attached to every adapter the session uploaded (or `owns`) is deleted,
so it is left as it was found.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

import httpx

from loraswap.bench.load import auth_headers

if TYPE_CHECKING:
    from loraswap.adapters.base import BaseRef


def say(msg: str) -> None:
    """A progress line on stderr (stdout holds the result only)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Session:
    def __init__(self, base: str, url: str | None = None, admin_key: str | None = None, label: str = "") -> None:
        """`label` starts every progress line of this session (e.g. 'soak: ')."""
        self.base = base
        self.url = url
        self.admin_key = admin_key
        self.label = label
        self.ref: BaseRef
        """The base, resolved (on entering)."""
        self.work: Path
        """This session's temporary folder (on entering)."""
        self.proc: subprocess.Popen[bytes] | None = None
        """The server started here; None when attached to one (resources are measured only when it is set)."""
        self._owned: list[str] = []
        self._admin: httpx.Client | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Session:
        from loraswap.adapters.base import resolve_base

        self.ref = resolve_base(self.base)
        self.work = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="loraswap-bench-")))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        with self._stack:  # the log and the temporary folder go last
            if self._admin is not None:
                self._admin.close()
            if self.proc is not None:
                from loraswap.bench.launch import stop

                stop(self.proc, graceful=True)
            elif self.url is not None:  # leave a server we did not start as we found it
                with httpx.Client(base_url=self.url, timeout=30, headers=auth_headers(self.admin_key)) as client:
                    for name in self._owned:
                        with contextlib.suppress(httpx.HTTPError):
                            client.delete(f"/v1/adapters/{name}")

    def synthesise(self, names: list[str]) -> dict[str, Path]:
        """A rank-8 LoRA with random weights per name (seeded by its position), in this session's folder."""
        from loraswap.bench.synth import synth_lora

        say(f"{self.label}synthesising {len(names)} rank-8 adapters for {self.ref.base_id}")
        return {n: synth_lora(self.ref, self.work / "synth" / n, seed=i + 1) for i, n in enumerate(names)}

    def start(self, quant: str, max_batch_size: int, env: dict[str, str], double_quant: bool = True) -> str:
        """The URL to measure: the server given, or `loraswap serve` started here on the base with `env` added to
        its environment (its output goes to a log whose tail is shown if it fails to start)."""
        if self.url is None:
            from loraswap.bench.launch import launch_with_log

            say(f"{self.label}starting the server on {self.base} ({quant}), batch {max_batch_size}")
            log: IO[bytes] = self._stack.enter_context(open(self.work / "server.log", "wb"))  # noqa: SIM115
            self.proc, self.url = launch_with_log(
                self.base, self.work / "store", quant, max_batch_size, env, log, double_quant=double_quant
            )
        self._admin = httpx.Client(base_url=self.url, timeout=120, headers=auth_headers(self.admin_key))
        return self.url

    @property
    def admin(self) -> httpx.Client:
        """A client with the admin key, for uploads (after `start`)."""
        if self._admin is None:
            raise RuntimeError("the session has no server yet: call start() first")
        return self._admin

    def owns(self, names: list[str]) -> None:
        """Adapters made on the server by other means, to delete at the end as well."""
        self._owned += [n for n in names if n not in self._owned]

    def upload(self, name: str, folder: Path) -> None:
        """Upload the adapter in `folder` as `name` (replacing one of that name) through POST /v1/adapters."""
        from loraswap.bench.synth import archive

        self.owns([name])
        r = self.admin.post(
            "/v1/adapters",
            data={"name": name, "overwrite": "true"},
            files={"file": (f"{name}.tar.gz", archive(folder), "application/gzip")},
        )
        if r.status_code != 201:
            raise RuntimeError(f"upload of {name} failed: HTTP {r.status_code} {r.text[:300]}")
