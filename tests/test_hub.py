"""Hub adapters (`model: "hf:org/name"`) through huggingface_hub's real download code, against a local fake of the
hub's file endpoints (no hub is reachable here): install, validation, unknown repositories, an unreachable hub, and
a server that serves one on its first request."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import random_lora_adapter

from loraswap.adapters import hub
from loraswap.adapters.base import resolve_base
from loraswap.adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterError, AdapterNotFound, sha256_of
from loraswap.adapters.store import AdapterStore
from loraswap.bench.launch import free_port, launch, stop

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves `repos` ({"org/name": {file: bytes}}) at /{repo}/resolve/{revision}/{file}, as the hub does."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.gets: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, fname = "/".join(parts[:2]), "/".join(parts[4:])
                if repo not in fake.repos:
                    return self._error(404, "RepoNotFound")
                if fname not in fake.repos[repo]:
                    return self._error(404, "EntryNotFound")
                data = fake.repos[repo][fname]
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    fake.gets.append(f"{repo}/{fname}")
                    self.wfile.write(data)

            def _error(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:
                self._answer(False)

            def do_GET(self) -> None:
                self._answer(True)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def fake_hub(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    src = random_lora_adapter(lively_base, tmp_path_factory.mktemp("hub-src"), "src", seed=41)
    good = {f: (src / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE)}
    repos = {
        "Org/Good-Adapter": good,
        "org/pickled": {CONFIG_FILE: good[CONFIG_FILE], "adapter_model.bin": b"\x80\x04pickle"},
        "org/broken": {CONFIG_FILE: good[CONFIG_FILE], WEIGHTS_FILE: b"not safetensors"},
    }
    fake = FakeHub(repos)
    yield fake
    fake.server.shutdown()


def test_hub_names() -> None:
    assert hub.parse("hf:org/name") == ("org/name", None)
    assert hub.parse("hf:org/name@v1.0") == ("org/name", "v1.0")
    assert hub.local_name("hf:org/name") == "hf--org--name"
    assert hub.local_name("hf:Org/Name") != hub.local_name("hf:org/name")  # case kept apart
    assert hub.local_name("hf:org/name@v2") != hub.local_name("hf:org/name")
    assert len(hub.local_name("hf:" + "o" * 90 + "/" + "n" * 90)) <= 64
    for bad in ("org/name", "hf:org", "hf:org/../x", "hf:/x", "hf:org/name/extra"):
        with pytest.raises(AdapterError, match="not a hub adapter name"):
            hub.parse(bad)


def test_install_validates_and_refuses(
    fake_hub: FakeHub, lively_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants
    import huggingface_hub.utils._http

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests' default is offline
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ref = resolve_base(str(lively_base))
    store = AdapterStore(tmp_path / "store", shipped_dir=None)
    name = hub.install("hf:Org/Good-Adapter", store, ref, 64, endpoint=fake_hub.url)
    entry = store.get(name)
    assert (
        sha256_of(entry.path / WEIGHTS_FILE)
        == hashlib.sha256(fake_hub.repos["Org/Good-Adapter"][WEIGHTS_FILE]).hexdigest()
    )
    assert entry.manifest.base_fingerprint == ref.fingerprint
    with pytest.raises(AdapterNotFound, match="repository not found"):
        hub.install("hf:org/missing", store, ref, 64, endpoint=fake_hub.url)
    with pytest.raises(AdapterNotFound, match="entry not found"):  # pickled weights are never fetched
        hub.install("hf:org/pickled", store, ref, 64, endpoint=fake_hub.url)
    with pytest.raises(AdapterError):
        hub.install("hf:org/broken", store, ref, 64, endpoint=fake_hub.url)
    # A hub that cannot be reached: huggingface_hub retries with backoff (23 s of sleeps), then loraswap says so.
    # The sleeps are recorded here instead of slept: the retries are the hub client's, the outcome is loraswap's.
    slept: list[float] = []
    with monkeypatch.context() as m:
        m.setattr(huggingface_hub.utils._http.time, "sleep", slept.append)
        with pytest.raises(hub.HubUnavailable):
            hub.install("hf:org/anything", store, ref, 64, endpoint=f"http://127.0.0.1:{free_port()}")
    assert slept, "the hub client gave up without retrying"
    assert store.names() == [name] and not any(p.name.startswith(".") for p in store.user_dir.iterdir())


def test_a_server_serves_a_hub_adapter_on_first_request(fake_hub: FakeHub, lively_base: Path, tmp_path: Path) -> None:
    env = {
        "LORASWAP_HUB_ADAPTERS": "true",
        "HF_ENDPOINT": fake_hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
    }
    proc, url = launch(str(lively_base), tmp_path / "store", quant="none", max_batch_size=4, env=env, timeout=180)
    try:

        def ask(model: str) -> httpx.Response:
            body = {"model": model, "messages": [{"role": "user", "content": "What is osteitis ?"}], "max_tokens": 4}
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)

        before = len(fake_hub.gets)
        r = ask("hf:Org/Good-Adapter")
        assert r.status_code == 200, r.text
        assert ask("hf:Org/Good-Adapter").status_code == 200
        assert len(fake_hub.gets) - before == 2  # two files, once
        r = ask("hf:org/missing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert ask("hf:org/broken").status_code == 422
    finally:
        stop(proc)
    proc, url = launch(str(lively_base), tmp_path / "store2", quant="none", max_batch_size=4, timeout=180)
    try:
        body = {"model": "hf:Org/Good-Adapter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 404 and "LORASWAP_HUB_ADAPTERS" in r.json()["error"]["message"]
    finally:
        stop(proc)
