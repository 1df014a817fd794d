"""The real server over HTTP, on the lively tiny base with random (non-zero) LoRA adapters."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import adapter_archive, peft_reference, random_lora_adapter, routed_store

from loraswap.adapters.base import load_tokenizer, resolve_base
from loraswap.adapters.prompt import prompt_ids
from loraswap.bench.launch import launch, stop

QUESTIONS = ["What are the symptoms of carditis ?", "What are the treatments for hepatitis ?", "What is osteitis ?"]


@pytest.fixture(scope="module")
def store(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return routed_store(lively_base, tmp_path_factory.mktemp("server-store"))


def start_server(
    base: Path, store: Path, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    return launch(str(base), store, quant="none", max_batch_size=4, env=extra_env, timeout=120)


@pytest.fixture(scope="module")
def url(lively_base: Path, store: Path) -> Iterator[str]:
    proc, url = start_server(lively_base, store)
    yield url
    stop(proc)


def reference(base_path: Path, store: Path, adapter: str | None, question: str, n: int) -> str:
    tokenizer = load_tokenizer(resolve_base(str(base_path)))
    ids = peft_reference(base_path, None if adapter is None else store / adapter, question, n)
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def stream_and_act(url: str, ask: dict, act: Any, after: int = 2) -> list[str]:  # type: ignore[type-arg]
    """Stream an answer, call `act()` once `after` events have arrived, and return every event line."""
    events: list[str] = []
    with httpx.stream("POST", f"{url}/v1/answer", json=ask, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line)
                if len(events) == after:
                    act()
    return events


def test_health_and_models(url: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    models = httpx.get(f"{url}/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert models["object"] == "list" and ids[1:] == ["base", "auto", "symptoms", "treatment"]
    assert all(m["parent"] == ids[0] for m in models["data"][1:])


def test_concurrent_mixed_requests_match_each_adapter_alone(url: str, lively_base: Path, store: Path) -> None:
    plan = [(a, q) for q in QUESTIONS for a in ("symptoms", "treatment", "base")]

    def ask(item: tuple[str, str]) -> dict:  # type: ignore[type-arg]
        adapter, question = item
        r = httpx.post(
            f"{url}/v1/answer", json={"adapter": adapter, "question": question, "max_tokens": 10}, timeout=120
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    with ThreadPoolExecutor(len(plan)) as pool:
        answers = list(pool.map(ask, plan))
    for (adapter, question), got in zip(plan, answers, strict=True):
        want = reference(lively_base, store, None if adapter == "base" else adapter, question, 10)
        assert got["answer"] == want, (adapter, question)
        assert got["adapter"] == adapter and got["usage"]["completion_tokens"] <= 10
        assert got["finish_reason"] in ("stop", "length")
    assert len({a["answer"] for a in answers}) == len(plan)  # non-zero adapters: every output differs


def test_openai_client_plain_and_streaming(url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    done = client.chat.completions.create(
        model="symptoms", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=6, extra_body={"x": 1}
    )
    assert done.choices[0].finish_reason == "length" and done.usage is not None
    assert done.usage.completion_tokens == 6 and done.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="symptoms",
            messages=[{"role": "user", "content": QUESTIONS[0]}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content  # greedy: streaming and not give the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/answer", {"adapter": "symtoms", "question": "x"}, 404, "did you mean 'symptoms'"),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "not found"),
        ("/v1/chat/completions", {"model": "base", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "base", "messages": [{"role": "user", "content": "x"}], "n": 0},
            400,
            "n: Input should be greater than or equal to 1",
        ),
        ("/v1/answer", {"adapter": "base", "question": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/answer", {"adapter": "base", "question": "x", "max_tokens": 10**6}, 400, "at most 1024"),
        ("/v1/answer", {"adapter": "base", "question": 5}, 400, "question"),
        ("/v1/answer", {"adapter": "base", "question": "word " * 600}, 400, "context length is 512"),
        ("/v1/answer", {"adapter": "base", "question": "x" * (2 << 20)}, 413, "limit"),
    ],
)
def test_bad_requests_get_a_specific_error(url: str, path: str, body: dict, status: int, message: str) -> None:  # type: ignore[type-arg]
    r = httpx.post(f"{url}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_invalid_json(url: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_upload_use_delete(url: str, lively_base: Path, store: Path) -> None:
    data = adapter_archive(lively_base, seed=3)
    files = {"file": ("a.tar.gz", data, "application/gzip")}
    r = httpx.post(f"{url}/v1/adapters", data={"name": "fresh"}, files=files, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "fresh" and r.json()["rank"] == 8
    ask = {"adapter": "fresh", "question": QUESTIONS[2], "max_tokens": 6}
    answer = httpx.post(f"{url}/v1/answer", json=ask, timeout=60)
    assert answer.status_code == 200 and answer.json()["answer"] == reference(
        lively_base, store, "fresh", QUESTIONS[2], 6
    )
    assert httpx.post(f"{url}/v1/adapters", data={"name": "fresh"}, files=files, timeout=60).status_code == 409
    r = httpx.post(
        f"{url}/v1/adapters",
        data={"name": "fresh", "overwrite": "true"},
        files={"file": ("a.tar.gz", adapter_archive(lively_base, seed=4), "application/gzip")},
        timeout=60,
    )
    assert r.status_code == 201
    changed = httpx.post(f"{url}/v1/answer", json=ask, timeout=60).json()["answer"]
    assert changed == reference(lively_base, store, "fresh", QUESTIONS[2], 6) != answer.json()["answer"]
    listed = {a["name"]: a for a in httpx.get(f"{url}/v1/adapters").json()["data"]}
    assert listed["fresh"]["loaded"] is True and listed["fresh"]["rank"] == 8
    assert httpx.delete(f"{url}/v1/adapters/fresh").status_code == 204
    assert httpx.post(f"{url}/v1/answer", json=ask, timeout=60).status_code == 404
    assert httpx.delete(f"{url}/v1/adapters/fresh").status_code == 404


def test_hostile_upload_is_refused_and_writes_nothing(url: str, store: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    before = sorted(p.name for p in store.iterdir())
    r = httpx.post(f"{url}/v1/adapters", data={"name": "evil"}, files={"file": ("e.tar.gz", buf.getvalue())})
    assert r.status_code == 422 and "outside the archive" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/adapters", data={"name": "../x"}, files={"file": ("e.tar.gz", buf.getvalue())})
    assert r.status_code == 400 and "invalid adapter name" in r.json()["error"]["message"]
    assert sorted(p.name for p in store.iterdir()) == before
    assert not (store.parent / "escape.json").exists()


def test_admin_routes_refuse_remote_callers(url: str, lively_base: Path, store: Path) -> None:
    """No admin key set: a caller that is not on this host gets a 403, also through a reverse proxy on this host
    (uvicorn takes the caller's address from X-Forwarded-For, trusting that header from 127.0.0.1 only)."""
    remote = {"X-Forwarded-For": "203.0.113.9"}
    before = sorted(p.name for p in store.iterdir())
    files = {"file": ("a.tar.gz", adapter_archive(lively_base, 9))}
    r = httpx.post(f"{url}/v1/adapters", data={"name": "remote"}, files=files, headers=remote, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.delete(f"{url}/v1/adapters/symptoms", headers=remote).status_code == 403
    assert sorted(p.name for p in store.iterdir()) == before
    # Inference routes stay open to remote callers when no inference key is set.
    ask = {"adapter": "base", "question": "x", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/answer", json=ask, headers=remote, timeout=60).status_code == 200


def test_api_keys(lively_base: Path, store: Path) -> None:
    proc, url = start_server(lively_base, store, {"LORASWAP_API_KEY": "k-infer", "LORASWAP_ADMIN_KEY": "k-admin"})
    try:
        assert httpx.get(f"{url}/health").status_code == 200  # never needs a key
        ask = {"adapter": "base", "question": "x", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/answer", json=ask).status_code == 401
        wrong = httpx.post(f"{url}/v1/answer", json=ask, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        ok = httpx.post(f"{url}/v1/answer", json=ask, headers={"Authorization": "Bearer k-infer"}, timeout=60)
        assert ok.status_code == 200
        # The inference key does not open admin routes.
        r = httpx.delete(f"{url}/v1/adapters/symptoms", headers={"Authorization": "Bearer k-infer"})
        assert r.status_code == 401 and (store / "symptoms").is_dir()
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k-infer"}).status_code == 200
    finally:
        stop(proc)


def test_metrics(url: str) -> None:
    httpx.post(f"{url}/v1/answer", json={"adapter": "treatment", "question": QUESTIONS[0], "max_tokens": 3}, timeout=60)
    httpx.post(f"{url}/v1/answer", json={"adapter": "symtoms", "question": "x"}, timeout=60)
    text = httpx.get(f"{url}/metrics").text
    assert 'loraswap_requests_total{adapter="treatment",route="/v1/answer",status="200"}' in text
    assert 'loraswap_errors_total{adapter="-",route="/v1/answer"}' in text  # unknown names never become labels
    for name in (
        "loraswap_request_seconds_bucket",
        "loraswap_time_to_first_token_seconds_bucket",
        "loraswap_generated_tokens_total",
        "loraswap_batch_size_bucket",
        "loraswap_queue_depth",
        "loraswap_loaded_adapters",
        "loraswap_adapter_load_seconds_bucket",
    ):
        assert name in text, name


def test_prefix_cache_shows_in_usage_and_metrics(url: str) -> None:
    def ask(question: str) -> dict[str, Any]:
        body = {"adapter": "symptoms", "question": question, "max_tokens": 2}
        r = httpx.post(f"{url}/v1/answer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return dict(r.json()["usage"])

    before = _metric(url, "loraswap_prompt_cached_tokens_total")
    ask(QUESTIONS[2])
    second = ask(QUESTIONS[1])  # shares the system turn with the first, same adapter: its blocks are reused
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["prompt_tokens"]
    assert _metric(url, "loraswap_prompt_cached_tokens_total") - before >= cached
    assert _metric(url, "loraswap_prompt_tokens_total") >= second["prompt_tokens"]
    assert _metric(url, "loraswap_prompt_cache_bytes") > 0  # the blocks held, as the bench subtracts them


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_disconnects_stops_costing_compute(url: str) -> None:
    ask = {"adapter": "symptoms", "question": QUESTIONS[0], "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{url}/v1/answer", json=ask, timeout=60) as r:
        lines = r.iter_lines()
        got: list[str] = []
        for line in lines:
            if line.startswith("data:"):
                got.append(line)
            if len(got) == 2:
                break
    # The server notices on its next write and tells the worker to drop the row.
    deadline = time.monotonic() + 60
    while _metric(url, "loraswap_cancelled_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(url, "loraswap_cancelled_total") >= 1
    time.sleep(0.5)  # the cancel message is queued ahead of the next request
    before = _metric(url, 'loraswap_batch_size_bucket{le="1.0"}')
    short = httpx.post(
        f"{url}/v1/answer", json={"adapter": "treatment", "question": QUESTIONS[1], "max_tokens": 5}, timeout=60
    ).json()
    after = _metric(url, 'loraswap_batch_size_bucket{le="1.0"}')
    # Every step of the short request ran alone: the abandoned 400-token request no longer decodes.
    assert short["usage"]["completion_tokens"] >= 1
    assert after - before >= short["usage"]["completion_tokens"] - 1


def test_two_workers_see_one_upload(lively_base: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    random_lora_adapter(lively_base, store, "symptoms", seed=1)
    proc, url = start_server(lively_base, store, {"LORASWAP_WORKERS": "2"})
    try:
        files = {"file": ("a.tar.gz", adapter_archive(lively_base, seed=5), "application/gzip")}
        assert httpx.post(f"{url}/v1/adapters", data={"name": "shared"}, files=files, timeout=60).status_code == 201
        want = reference(lively_base, store, "shared", QUESTIONS[0], 5)

        def ask(_: int) -> str:
            r = httpx.post(
                f"{url}/v1/answer", json={"adapter": "shared", "question": QUESTIONS[0], "max_tokens": 5}, timeout=120
            )
            assert r.status_code == 200, r.text
            return str(r.json()["answer"])

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, range(8))) == [want] * 8
    finally:
        stop(proc)


def test_each_worker_takes_the_cancels_of_its_own_requests(lively_base: Path, store: Path) -> None:
    """Cancels go through one dict shared by all workers: a worker applies those of its requests and
    leaves the others to the worker that runs them (stale ones expire)."""
    from loraswap.server.api.spec import LoraswapSpec
    from loraswap.server.jobs import Job
    from loraswap.server.settings import Settings
    from loraswap.server.worker.api import LoraswapAPI

    cancels: dict[str, float] = {}
    settings = Settings(base=str(lively_base), quant="none", adapters_dir=store)
    api = LoraswapAPI(settings, LoraswapSpec(settings), cancels)
    api.setup("cpu")
    tok = api.engine.tokenizer
    for uid in ("mine", "mine-too"):
        api.add_request(uid, Job(uid, prompt_ids(tok, QUESTIONS[0]), None, max_tokens=50))
    api.step(None)
    cancels.update({"mine": time.monotonic(), "elsewhere": time.monotonic(), "stale": time.monotonic() - 120})
    outputs = api.step(None)
    finished = {o.uid: o.output for o in outputs if isinstance(o.output, dict) and o.output.get("finish_reason")}
    assert finished["mine"]["finish_reason"] == "cancelled" and "mine-too" not in finished
    assert set(cancels) == {"elsewhere"}  # another worker's request; the stale one is forgotten


def test_the_worker_loads_its_model_and_runs_every_step_on_one_thread(
    lively_base: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each thread that calls into torch gets an OpenMP team of its own, and with more of them than cores libgomp
    stops spin-waiting between parallel regions (server/worker/api.py): the model is loaded on the thread that then
    runs every step, however busy the event loop's default pool is."""
    import asyncio
    import threading

    from loraswap.server.api.spec import LoraswapSpec
    from loraswap.server.jobs import Job
    from loraswap.server.settings import Settings
    from loraswap.server.worker import api as worker

    seen: dict[str, set[int]] = {"load": set(), "step": set()}
    real_load = worker.load_base

    def load(*args: Any, **kwargs: Any) -> Any:
        seen["load"].add(threading.get_ident())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(worker, "load_base", load)
    settings = Settings(base=str(lively_base), quant="none", adapters_dir=store)
    api = worker.LoraswapAPI(settings, LoraswapSpec(settings), {})
    api.setup("cpu")
    real_step = api.step

    def step(prev: Any) -> Any:
        seen["step"].add(threading.get_ident())
        return real_step(prev)

    api.step = step  # type: ignore[method-assign]
    ids = prompt_ids(api.engine.tokenizer, QUESTIONS[0])
    api.add_request("q", Job("q", ids, "symptoms", max_tokens=8))

    async def many(loop: worker.EngineLoop) -> None:
        for _ in range(20):  # the default pool's threads kept busy beside each step
            await asyncio.gather(asyncio.to_thread(threading.get_ident), loop.step(None, api, None))

    asyncio.run(many(worker.EngineLoop()))
    assert not api.engine.has_work()  # the request ran to its end on those steps
    assert len(seen["load"]) == 1 and seen["step"] == seen["load"]
    assert threading.get_ident() not in seen["step"]


def test_sigterm_lets_running_requests_finish_then_exits(lively_base: Path, store: Path) -> None:
    proc, url = start_server(lively_base, store)
    try:
        ask = {"adapter": "symptoms", "question": QUESTIONS[0], "max_tokens": 120, "stream": True}
        events = stream_and_act(url, ask, lambda: proc.send_signal(signal.SIGTERM))
        assert events[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in events[-2] and '"completion_tokens": 120' in events[-2]
        proc.wait(timeout=60)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=2)
        # No process of the server's group is left (multiprocessing's resource tracker exits just after the main).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if not left:
                break
            time.sleep(0.5)
        assert left == []
    finally:
        if proc.poll() is None:
            stop(proc)


def test_sigterm_to_the_whole_process_group_stops_the_server_cleanly(
    lively_base: Path, store: Path, tmp_path: Path
) -> None:
    """Processes forked after the server set its SIGTERM handler inherit it (LitServe's manager, which holds the
    request queues): only the main process acts on it, and no other one fails on it."""
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc, _ = launch(str(lively_base), store, quant="none", max_batch_size=4, log=log, timeout=120)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                stop(proc)
    assert "Traceback" not in log_path.read_text(errors="replace")


def test_auto_routes_to_the_adapter_of_the_question_type(url: str, lively_base: Path, store: Path) -> None:
    for question, qtype in [
        ("What are the symptoms of nephritis ?", "symptoms"),
        ("What are the treatments for nephritis ?", "treatment"),
    ]:
        r = httpx.post(f"{url}/v1/answer", json={"adapter": "auto", "question": question, "max_tokens": 5}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == qtype and body["routed"]["qtype"] == qtype
        assert body["answer"] == reference(lively_base, store, qtype, question, 5)


def test_delete_lets_running_requests_finish(url: str, lively_base: Path) -> None:
    files = {"file": ("a.tar.gz", adapter_archive(lively_base, seed=6), "application/gzip")}
    assert httpx.post(f"{url}/v1/adapters", data={"name": "doomed"}, files=files, timeout=60).status_code == 201
    ask = {"adapter": "doomed", "question": QUESTIONS[0], "max_tokens": 60, "stream": True}
    deleted: list[int] = []
    events = stream_and_act(url, ask, lambda: deleted.append(httpx.delete(f"{url}/v1/adapters/doomed").status_code))
    assert deleted == [204]
    assert events[-1] == "data: [DONE]" and '"completion_tokens": 60' in events[-2]
    later = httpx.post(f"{url}/v1/answer", json={**ask, "stream": False}, timeout=60)
    assert later.status_code == 404


def test_start_up_reports_and_skips_broken_adapter_folders(
    lively_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraswap.server.api.app import report_store
    from loraswap.server.settings import Settings

    store = tmp_path / "store"
    random_lora_adapter(lively_base, store, "good", seed=1)
    (store / "broken").mkdir()
    (store / "broken" / "adapter_config.json").write_text("{not json")
    report_store(Settings(base=str(lively_base), adapters_dir=store))
    err = capsys.readouterr().err
    assert "1 adapters: good" in err
    assert "skipping unusable adapter folder 'broken'" in err


def test_locustfile_runs_headless_against_the_server(url: str) -> None:
    locustfile = Path(__file__).resolve().parents[1] / "bench" / "locustfile.py"
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", url]
    cmd += ["-u", "3", "-r", "3", "-t", "8s", "--max-tokens", "4", "--adapters", "symptoms,treatment,base"]
    r = subprocess.run([*cmd, "--json", "--only-summary"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = {s["name"]: s for s in json.loads(r.stdout)}
    for route in ("/v1/answer", "/v1/chat/completions"):
        assert stats[route]["num_requests"] > 0 and stats[route]["num_failures"] == 0, stats[route]
    assert sum(s["num_failures"] for s in stats.values()) == 0
