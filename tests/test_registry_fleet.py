"""Two real `loraswap serve` processes on one registry (moto's S3 server on the loopback address, the tiny base):
what one is given the other serves within the listing interval; deletes, races, tampered objects, an outage and a
publisher killed mid-push."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import adapter_archive, random_lora_adapter
from s3 import CREDENTIALS, S3, make_bucket

from loraswap.adapters.base import resolve_base
from loraswap.adapters.manifest import WEIGHTS_FILE
from loraswap.adapters.registry import Registry, fetch, publish
from loraswap.bench.launch import launch, stop

BUCKET = "fleet"
REGISTRY = f"s3://{BUCKET}/prod"
POLL = 0.5
BOUND = 15.0
"""Seconds a test waits for a replica to follow: the listing interval plus slack for two shared CPU cores."""
QUESTION = "What are the symptoms of carditis ?"


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def ask(self, model: str) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=120)

    def upload(self, name: str, archive: bytes, overwrite: bool = False) -> httpx.Response:
        files = {"file": ("a.tar.gz", archive, "application/gzip")}
        data = {"name": name, "overwrite": "true" if overwrite else "false"}
        return httpx.post(f"{self.url}/v1/adapters", data=data, files=files, timeout=120)


@pytest.fixture(scope="module")
def fleet(s3: S3, lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Replica, Replica]]:
    started: list[Replica] = []
    try:
        for tag in ("a", "b"):
            root = tmp_path_factory.mktemp(f"replica-{tag}")
            env = {
                **s3.env(),
                "LORASWAP_REGISTRY": REGISTRY,
                "LORASWAP_REGISTRY_CACHE_DIR": str(root / "cache"),
                "LORASWAP_REGISTRY_POLL_SECONDS": str(POLL),
                "LORASWAP_REGISTRY_TIMEOUT": "2",
            }
            log = root / "server.log"
            with log.open("wb") as out:
                proc, url = launch(
                    str(lively_base), root / "store", quant="none", max_batch_size=4, env=env, log=out, timeout=180
                )
            started.append(Replica(proc, url, log))
        yield started[0], started[1]
    finally:
        for r in started:
            stop(r.proc)


@pytest.fixture(scope="module")
def archives(lively_base: Path) -> dict[int, bytes]:
    return {seed: adapter_archive(lively_base, seed) for seed in (11, 12, 13)}


def eventually(check: Callable[[], bool], bound: float = BOUND) -> float:
    """Seconds until `check()` holds (fails the test after `bound`)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < bound, f"not seen within {bound} s"
        time.sleep(0.1)
    return time.monotonic() - start


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_upload_on_one_is_served_by_the_other(fleet: tuple[Replica, Replica], archives: dict[int, bytes]) -> None:
    a, b = fleet
    assert a.upload("shared", archives[11]).status_code == 201
    first = answer(a.ask("shared"))  # the replica that published serves it at once
    eventually(lambda: b.ask("shared").status_code == 200)
    assert answer(b.ask("shared")) == first
    assert answer(a.ask("base")) != first  # the adapter changes the answer
    ids = [m["id"] for m in httpx.get(f"{b.url}/v1/models").json()["data"]]
    assert "shared" in ids


def test_overwrite_on_one_is_followed_by_the_other(fleet: tuple[Replica, Replica], archives: dict[int, bytes]) -> None:
    a, b = fleet
    assert a.upload("versioned", archives[11]).status_code == 201
    old = answer(a.ask("versioned"))
    eventually(lambda: b.ask("versioned").status_code == 200)
    assert b.upload("versioned", archives[12], overwrite=True).status_code == 201
    new = answer(b.ask("versioned"))
    assert new != old
    eventually(lambda: answer(a.ask("versioned")) == new)


def test_delete_on_one_is_404_on_both(fleet: tuple[Replica, Replica], archives: dict[int, bytes]) -> None:
    a, b = fleet
    assert a.upload("doomed", archives[13]).status_code == 201
    eventually(lambda: b.ask("doomed").status_code == 200)
    assert httpx.delete(f"{b.url}/v1/adapters/doomed").status_code == 204
    assert b.ask("doomed").status_code == 404
    eventually(lambda: a.ask("doomed").status_code == 404)
    assert httpx.delete(f"{a.url}/v1/adapters/doomed").status_code == 404


def test_a_request_running_when_its_adapter_is_deleted_finishes(
    fleet: tuple[Replica, Replica], archives: dict[int, bytes]
) -> None:
    a, b = fleet
    assert a.upload("leaving", archives[12]).status_code == 201
    eventually(lambda: b.ask("leaving").status_code == 200)
    body = {"model": "leaving", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 48}
    body |= {"stream": True, "ignore_eos": True}
    chunks: list[str] = []
    with httpx.stream("POST", f"{b.url}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                chunks.append(line)
                if len(chunks) == 3:
                    assert httpx.delete(f"{a.url}/v1/adapters/leaving").status_code == 204
                    eventually(lambda: b.ask("leaving").status_code == 404)  # B follows while the stream runs
    assert chunks[-1] == "data: [DONE]" and '"finish_reason": "length"' in chunks[-2]


def test_six_concurrent_uploads_of_one_name_one_201(fleet: tuple[Replica, Replica], archives: dict[int, bytes]) -> None:
    def go(i: int) -> int:
        return fleet[i % 2].upload("contested", archives[11 + i % 3]).status_code

    with ThreadPoolExecutor(6) as ex:
        codes = sorted(ex.map(go, range(6)))
    assert codes == [201, 409, 409, 409, 409, 409]
    for r in fleet:
        eventually(lambda r=r: r.ask("contested").status_code == 200)  # type: ignore[misc]


def test_a_tampered_adapter_is_refused_not_served(
    fleet: tuple[Replica, Replica], lively_base: Path, s3: S3, tmp_path: Path
) -> None:
    b = fleet[1]
    ref = resolve_base(str(lively_base))
    registry = Registry(REGISTRY)
    src = random_lora_adapter(lively_base, tmp_path, "tamper-src", seed=21)
    record = publish(registry, src, "tampered", ref, max_rank=64)
    key = registry._blob_key(record.files[WEIGHTS_FILE]["sha256"])
    data = bytearray(registry.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x55
    registry.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))

    def refused() -> bool:
        r = b.ask("tampered")
        return r.status_code == 502 and r.json()["error"]["code"] == "adapter_refused"

    eventually(refused)
    assert "does not match" in b.ask("tampered").json()["error"]["message"]
    assert "tampered" not in [m["id"] for m in httpx.get(f"{b.url}/v1/models").json()["data"]]


def test_outage_cached_answer_uncached_503_then_recovery(
    fleet: tuple[Replica, Replica], archives: dict[int, bytes], lively_base: Path, s3: S3
) -> None:
    a, b = fleet
    assert a.upload("warm", archives[12]).status_code == 201
    assert a.upload("cold", archives[13]).status_code == 201
    eventually(lambda: b.ask("warm").status_code == 200)  # B has "warm" cached, never asked for "cold"
    eventually(lambda: "cold" in [m["id"] for m in httpx.get(f"{b.url}/v1/models").json()["data"]])
    s3.stop()
    try:
        time.sleep(3 * POLL)
        assert b.ask("warm").status_code == 200
        r = b.ask("cold")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "registry_unavailable" and r.json()["error"]["type"] == "server_error"
        assert b.upload("during", archives[11]).status_code == 503
        assert b.ask("symptoms-not-anywhere").status_code == 503  # unknown here and cannot be checked
    finally:
        s3.start()  # moto starts empty: a new bucket, and a publish to it
        make_bucket(BUCKET)
    assert a.upload("after", archives[11]).status_code == 201
    eventually(lambda: b.ask("after").status_code == 200)
    eventually(lambda: b.ask("warm").status_code == 404)  # the new registry does not hold it: gone everywhere


def test_kill_9_during_publishes_leaves_absent_or_complete(
    fleet: tuple[Replica, Replica], lively_base: Path, s3: S3, tmp_path: Path
) -> None:
    src = random_lora_adapter(lively_base, tmp_path / "src", "src", seed=31)
    script = (
        "import sys; from pathlib import Path\n"
        "from loraswap.adapters.base import resolve_base\n"
        "from loraswap.adapters.registry import Registry, publish\n"
        f"ref = resolve_base({str(lively_base)!r}); reg = Registry({REGISTRY!r})\n"
        "print('ready', flush=True)\n"
        "for i in range(1000):\n"
        f"    publish(reg, Path({str(src)!r}), f'killed-{{i}}', ref, 64)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env={**os.environ, **s3.env()}, start_new_session=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    registry = Registry(REGISTRY)
    eventually(lambda: len([n for n in registry.list() if n.startswith("killed-")]) >= 3, bound=60)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    names = [n for n in registry.list() if n.startswith("killed-")]
    ref = resolve_base(str(lively_base))
    for name in names:  # every published name is complete: it pulls and validates
        dest = tmp_path / name
        dest.mkdir()
        fetch(registry, registry.record(name), dest, ref, 64)
    last = max(int(n.split("-")[1]) for n in names)
    b = fleet[1]
    eventually(lambda: b.ask(f"killed-{last}").status_code == 200)
    assert b.ask(f"killed-{last + 1}").status_code == 404


def test_logs_hold_no_credentials(fleet: tuple[Replica, Replica]) -> None:
    for r in fleet:
        text = r.log.read_text(errors="replace")
        assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in text and CREDENTIALS["AWS_ACCESS_KEY_ID"] not in text
