"""`loraswap serve --ray`: the real command, on a local Ray cluster it starts (2 CPUs), with 2 replicas of half a CPU
each on the tiny base and a registry in moto's S3: every route through Ray Serve, streamed and not; an upload served
by both replicas; adapter affinity from the replicas' own load counters; a replica killed mid-stream; and a shutdown
that leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import adapter_archive, random_lora_adapter, run_cli
from s3 import S3

from loraswap.adapters.base import resolve_base
from loraswap.adapters.registry import Registry, publish
from loraswap.bench.launch import free_port

pytest.importorskip("ray.serve", reason="Ray Serve is the optional extra loraswap[ray]")

BUCKET = "rayfleet"
REGISTRY = f"s3://{BUCKET}/prod"
ADAPTERS = [f"a{i}" for i in range(8)]
KEY = "test-inference-key"
AUTH = {"authorization": f"Bearer {KEY}"}
QUESTION = "What are the symptoms of carditis ?"
HTTP = httpx.Client(timeout=300)
"""A first request for an adapter waits for its pull from the registry: minutes may pass on two busy cores."""
START_BOUND = 600.0
"""Seconds the application may take to come up (Ray, then two servers) on two shared CPU cores."""


@dataclass
class App:
    proc: subprocess.Popen[bytes]
    url: str
    mark: str
    log: Path

    def chat(
        self, model: str, max_tokens: int = 4, stream: bool = False, url: str | None = None, **extra: Any
    ) -> httpx.Response:
        """QUESTION to `model` through the application, or through the server at `url` (a replica's own)."""
        body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens}
        return HTTP.post(
            f"{url or self.url}/v1/chat/completions", json=body | {"stream": stream} | extra, headers=AUTH, timeout=300
        )

    def metrics(self) -> dict[str, dict[str, float]]:
        """Per replica: its server's counters of interest (summed over their other labels)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = HTTP.get(f"{self.url}/metrics", headers=AUTH).text
        out: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in ("loraswap_adapter_load_seconds_count", "loraswap_requests_total"):
                    key = s.name if s.name != "loraswap_requests_total" else f"requests:{s.labels.get('adapter')}"
                    row = out.setdefault(s.labels["replica"], {})
                    row[key] = row.get(key, 0.0) + s.value
        return out


def marked(mark: str) -> list[psutil.Process]:
    """Every process started under the test's mark (Ray's, the replicas' servers), whatever became of its parent."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("LSRAY_TEST_MARK") == mark:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def eventually(check: Callable[[], bool], bound: float, what: str) -> None:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < bound, f"{what}: not within {bound:.0f} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def app(s3: S3, lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    root = tmp_path_factory.mktemp("ray-app")
    ref = resolve_base(str(lively_base))
    registry = Registry(REGISTRY)
    source = random_lora_adapter(lively_base, root / "src", "source", seed=40)
    for name in ADAPTERS:  # distinct names are what routing sees; one set of weights is enough
        publish(registry, source, name, ref, max_rank=64)
    port, mark = free_port(), uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="lsray-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = {
        **os.environ,
        **s3.env(),
        "LSRAY_TEST_MARK": mark,
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,  # token auth as Ray's default, without writing the user's ~/.ray
        "LORASWAP_API_KEY": KEY,
        "LORASWAP_ADAPTERS_DIR": str(root / "store"),
        "LORASWAP_REGISTRY_POLL_SECONDS": "0.5",
        "LORASWAP_MAX_LOADED_ADAPTERS": "4",
        "LORASWAP_DRAIN_SECONDS": "5",
        "LORASWAP_REGISTRY_TIMEOUT": "30",  # moto on two busy cores: slow is not down
    }
    cmd = [sys.executable, "-m", "loraswap.main", "serve", "--ray", "--replicas", "2", "--replica-cpus", "0.5"]
    cmd += ["--base", str(lively_base), "--quant", "none", "--max-batch-size", "4", "--port", str(port)]
    cmd += ["--registry", REGISTRY]
    log = root / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True)
    app = App(proc, f"http://127.0.0.1:{port}", mark, log)
    try:
        eventually(lambda: proc.poll() is not None or b"serving on" in log.read_bytes(), START_BOUND, "start")
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        eventually(lambda: len(app.metrics()) == 2, 60, "both replicas report their metrics")
        yield app
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for p in marked(mark):  # whatever a failed test left: never leave a Ray process behind
            p.kill()
        serve_logs = Path(ray_tmp) / "ray" / "session_latest" / "logs" / "serve"
        if serve_logs.is_dir():  # kept beside the command's log, for a failure's story
            shutil.copytree(serve_logs, root / "serve-logs", dirs_exist_ok=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def error_of(r: httpx.Response) -> dict[str, Any]:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return dict(err)


def sse_events(text: str) -> list[Any]:
    return [
        json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


def test_every_route_through_ray_serve(app: App) -> None:
    u = app.url
    assert HTTP.get(f"{u}/health").status_code == 200
    assert HTTP.head(f"{u}/health").status_code == 200
    ids = {m["id"] for m in HTTP.get(f"{u}/v1/models", headers=AUTH).json()["data"]}
    assert set(ADAPTERS) | {"base"} <= ids
    assert HTTP.get(f"{u}/v1/models/a1", headers=AUTH).json()["id"] == "a1"
    assert error_of(HTTP.get(f"{u}/v1/models/a11", headers=AUTH))["code"] == "model_not_found"
    assert {a["name"] for a in HTTP.get(f"{u}/v1/adapters", headers=AUTH).json()["data"]} >= set(ADAPTERS)
    # auth: the replicas' servers check the key; errors keep OpenAI's shape through the proxy
    r = HTTP.post(f"{u}/v1/chat/completions", json={"model": "a1", "messages": []})
    assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
    r = HTTP.post(f"{u}/v1/chat/completions", content=b"{not json", headers=AUTH)
    assert r.status_code == 400 and error_of(r)
    r = app.chat("a-typo")
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    # chat, completions and answer, plain and streamed, for an adapter and the base
    plain = app.chat("a1", max_tokens=6)
    assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = app.chat("a1", max_tokens=6, stream=True)
    events = sse_events(streamed.text)
    assert streamed.headers["content-type"].startswith("text/event-stream") and events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == plain.json()["choices"][0]["message"]["content"]  # greedy: the same answer either way
    assert app.chat("base").status_code == 200
    for stream in (False, True):
        body = {"model": "a2", "prompt": "The signs of", "max_tokens": 4, "stream": stream}
        r = HTTP.post(f"{u}/v1/completions", json=body, headers=AUTH)
        assert r.status_code == 200 and (sse_events(r.text)[-1] == "[DONE]" if stream else r.json()["choices"])
        body = {"adapter": "a3", "question": QUESTION, "max_tokens": 4, "stream": stream}
        r = HTTP.post(f"{u}/v1/answer", json=body, headers=AUTH)
        assert r.status_code == 200 and (sse_events(r.text)[-1] == "[DONE]" if stream else r.json()["adapter"] == "a3")
    assert HTTP.get(f"{u}/").status_code == 200 and "<html" in HTTP.get(f"{u}/").text.lower()
    assert "/v1/chat/completions" in HTTP.get(f"{u}/openapi.json").json()["paths"]
    # vLLM's admin routes (open to loopback callers without an admin key; the caller's address is forwarded)
    r = HTTP.post(f"{u}/v1/load_lora_adapter", json={"lora_name": "a4", "lora_path": REGISTRY})
    assert r.status_code in (200, 400), r.text
    text = HTTP.get(f"{u}/metrics", headers=AUTH).text
    assert 'replica="' in text and "vllm:num_requests_running" in text
    assert HTTP.get(f"{u}/metrics").status_code == 401


def replica_servers(mark: str) -> dict[str, str]:
    """Each replica's own server (`python -m loraswap.server.cluster.child`): its replica's name -> its loopback URL."""
    found = {}
    for p in marked(mark):
        try:
            env, cmdline = p.environ(), p.cmdline()
        except (psutil.Error, OSError):
            continue
        if "loraswap.server.cluster.child" in cmdline and "LORASWAP_RAY_REPLICA" in env:
            found[env["LORASWAP_RAY_REPLICA"]] = f"http://127.0.0.1:{env['LORASWAP_PORT']}"
    return found


def test_an_upload_is_answered_by_both_replicas(app: App, lively_base: Path) -> None:
    """An adapter uploaded through the application reaches both replicas through the registry, and each replica's
    own server answers it with the same weights. The two are asked directly: which replica Ray Serve picks for a
    request through the application is Ray's choice (it prefers one that already holds the adapter, and falls
    back to another only after a busy second or two), so counting replicas through it would test Ray's timing."""
    files = {"file": ("a.tar.gz", adapter_archive(lively_base, 77), "application/gzip")}
    r = HTTP.post(f"{app.url}/v1/adapters", data={"name": "fresh"}, files=files)
    assert r.status_code == 201, r.text
    through_app = app.chat("fresh", max_tokens=48, ignore_eos=True)
    assert through_app.status_code == 200, through_app.text
    servers = replica_servers(app.mark)
    assert len(servers) == 2, servers
    answers = {}
    for replica, url in servers.items():
        reply = app.chat("fresh", max_tokens=48, url=url, ignore_eos=True)
        assert reply.status_code == 200, (replica, reply.text)
        answers[replica] = reply.json()["choices"][0]["message"]["content"]
    assert through_app.headers["x-loraswap-replica"] in answers
    # both serve the same weights (greedy, the same question), and so does the application
    assert set(answers.values()) == {through_app.json()["choices"][0]["message"]["content"]}, answers


def test_requests_go_to_a_replica_that_holds_their_adapter(app: App) -> None:
    def totals() -> tuple[float, float]:
        m = app.metrics()
        loads = sum(r.get("loraswap_adapter_load_seconds_count", 0.0) for r in m.values())
        done = sum(v for r in m.values() for k, v in r.items() if k in {f"requests:{a}" for a in ADAPTERS})
        return loads, done

    loads0, done0 = totals()
    order = [ADAPTERS[(i * 5 + i // 8) % 8] for i in range(200)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda name: app.chat(name, max_tokens=2), order))
    failed = [(r.status_code, r.text[:300]) for r in replies if r.status_code != 200]
    assert not failed, failed
    eventually(lambda: totals()[1] - done0 >= 200, 30, "the replicas report all 200 requests")
    cold = totals()[0] - loads0
    assert 1 - cold / 200 >= 0.85, f"{cold:.0f} of 200 requests loaded their adapter into a replica's engine"


def test_a_killed_replica_fails_its_streams_with_503_and_is_replaced(app: App) -> None:
    results: dict[int, tuple[str, list[Any] | int]] = {}
    started: dict[int, str] = {}

    def stream(i: int) -> None:
        body = {"model": "base", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1000}
        with HTTP.stream(
            "POST",
            f"{app.url}/v1/chat/completions",
            json=body | {"stream": True, "ignore_eos": True},
            headers=AUTH,
            timeout=300,
        ) as r:
            if r.status_code != 200:
                results[i] = ("", r.status_code)
                return
            started[i] = r.headers["x-loraswap-replica"]
            results[i] = (started[i], sse_events("".join(r.iter_text())))

    before = set(app.metrics())
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, i) for i in range(6)]
        eventually(lambda: len(started) == 6 or len(results) == 6, 120, "six streams start")
        victim = next(iter(started.values()))
        servers = [p for p in marked(app.mark) if p.environ().get("LORASWAP_RAY_REPLICA") == victim]
        assert servers, f"no server process of replica {victim}"
        actor = servers[0].parent()
        assert actor is not None and "ServeReplica" in " ".join(actor.cmdline())
        actor.kill()
        for f in futures:
            f.result()
    for replica, outcome in results.values():
        if replica == victim:  # its streams end with the 503 error event
            assert isinstance(outcome, list) and outcome and "error" in outcome[-1], outcome
            assert outcome[-1]["error"]["code"] == "replica_lost"
        elif replica:  # the other replica's streams finish whole
            assert isinstance(outcome, list) and outcome[-1] == "[DONE]"
            assert any(e["choices"] and e["choices"][0]["finish_reason"] == "length" for e in outcome[:-1])
        else:
            assert outcome == 503
    eventually(lambda: not servers[0].is_running(), 60, "the killed replica's server stops")
    eventually(lambda: len(set(app.metrics()) - before) == 1 and len(app.metrics()) == 2, 300, "a new replica")
    assert all(app.chat("a1").status_code == 200 for _ in range(4))


def test_shutdown_leaves_no_process_behind(app: App) -> None:
    assert marked(app.mark)  # the cluster and the servers run under the mark
    app.proc.send_signal(signal.SIGTERM)  # to the command, as Kubernetes or `kill PID` sends it; it stops Ray's
    assert app.proc.wait(timeout=180) == 0, app.log.read_text(errors="replace")[-3000:]
    eventually(lambda: not marked(app.mark), 60, "every process of the application gone")


def test_ray_options_are_checked(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(["serve", "--replicas", "2"], capsys)
    assert code == 2 and "--replicas apply to --ray only" in err
    code, _, err = run_cli(["serve", "--ray", "--min-replicas", "1"], capsys)
    assert code == 2 and "both --min-replicas and --max-replicas" in err
    code, _, err = run_cli(["serve", "--ray", "--min-replicas", "2", "--max-replicas", "4", "--replicas", "1"], capsys)
    assert code == 2 and "must lie within" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    code, _, err = run_cli(["serve", "--ray"], capsys)
    assert code == 2 and "pip install 'loraswap[ray]'" in err
