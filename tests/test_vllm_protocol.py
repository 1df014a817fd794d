"""The model-server protocol LoRA-aware routers speak: vLLM's load/unload endpoints and its gauges, read the way the
Gateway API Inference Extension's endpoint picker reads them (prometheus_client's parser; the series of
`vllm:lora_requests_info` with the largest value; its LoRA-affinity scorer: 1.0 adapter running, 0.8 a free slot,
0.6 waiting, else 0)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import random_lora_adapter
from prometheus_client.parser import text_string_to_metric_families
from s3 import S3

from loraswap.adapters.base import resolve_base
from loraswap.adapters.registry import Registry, publish
from loraswap.bench.fleet_policies import lora_affinity
from loraswap.bench.launch import launch, stop
from loraswap.server.api.metrics import Metrics

ADMIN_KEY = "sk-admin-vllm-protocol-1"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BUCKET = "proto"
REGISTRY = f"s3://{BUCKET}/served"
OTHER_REGISTRY = f"s3://{BUCKET}/elsewhere"


@dataclass
class EppView:
    """What the endpoint picker keeps of one model server's metrics."""

    running: int
    waiting: int
    kv: float
    active: set[str]
    waiting_models: set[str]
    max_active: int


def epp_view(text: str) -> EppView:
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def gauge(name: str) -> float:
        return float(families[name].samples[0].value)

    best = None
    for s in families["vllm:lora_requests_info"].samples:
        if not s.labels["running_lora_adapters"] and not s.labels["waiting_lora_adapters"]:
            continue  # the picker ignores series with both lists empty
        if best is None or s.value > best.value:
            best = s
    labels = best.labels if best is not None else {}
    split = lambda v: set(v.split(",")) if v else set()  # noqa: E731 (as the picker splits: on "," only)
    return EppView(
        running=int(gauge("vllm:num_requests_running")),
        waiting=int(gauge("vllm:num_requests_waiting")),
        kv=gauge("vllm:kv_cache_usage_perc"),
        active=split(labels.get("running_lora_adapters", "")),
        waiting_models=split(labels.get("waiting_lora_adapters", "")),
        max_active=int(labels.get("max_lora", "0") or 0),
    )


def affinity(view: EppView, model: str) -> float:
    return lora_affinity(model, view.active, view.waiting_models, view.max_active)


def test_gauges_follow_the_requests_in_flight_as_the_picker_reads_them() -> None:
    m = Metrics("tiny", max_lora=2, capacity=4)
    idle = epp_view(m.render().decode())
    assert (idle.running, idle.waiting, idle.kv, idle.active) == (0, 0, 0.0, set())
    m.inflight.queued("a")
    m.inflight.started("a")
    m.inflight.queued("b")
    m.inflight.queued(None)  # the base: a request, not an adapter
    view = epp_view(m.render().decode())
    assert (view.running, view.waiting, view.kv) == (1, 2, 0.25)
    assert view.active == {"a"} and view.waiting_models == {"b"} and view.max_active == 2
    assert affinity(view, "a") == 1.0
    assert affinity(view, "b") == 0.6 and affinity(view, "c") == 0.0  # both slots taken
    m.inflight.started("b")
    time.sleep(0.01)  # the newest series wins by its value, the time it was set
    view = epp_view(m.render().decode())
    assert view.active == {"a", "b"} and view.waiting_models == set()
    m.inflight.ended("a", started=True)
    m.inflight.ended("b", started=True)
    m.inflight.ended(None, started=False)
    time.sleep(0.01)
    view = epp_view(m.render().decode())
    assert (view.running, view.waiting) == (0, 0)
    for i in range(100):  # series are bounded however many combinations were seen
        m.inflight.queued(f"x{i}")
        m.render()
    text = m.render().decode()
    assert text.count("vllm:lora_requests_info{") <= 32
    assert "running_lora_adapters" in text and 'max_lora="2"' in text


@dataclass
class Server:
    proc: object
    url: str
    store: Path


@pytest.fixture(scope="module")
def srv(s3: S3, lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("vllm-protocol")
    env = {
        **s3.env(),
        "LORASWAP_ADMIN_KEY": ADMIN_KEY,
        "LORASWAP_REGISTRY": REGISTRY,
        "LORASWAP_REGISTRY_CACHE_DIR": str(root / "cache"),
        "LORASWAP_REGISTRY_POLL_SECONDS": "0.5",
        "LORASWAP_MAX_LOADED_ADAPTERS": "3",
    }
    proc, url = launch(str(lively_base), root / "store", quant="none", max_batch_size=4, env=env, timeout=180)
    yield Server(proc, url, root / "store")
    stop(proc)  # type: ignore[arg-type]


def post(srv: Server, path: str, body: object, headers: dict[str, str] | None = ADMIN) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body, headers=headers, timeout=120)


def ask(srv: Server, model: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "What is osteitis ?"}], "max_tokens": max_tokens}
    body["ignore_eos"] = True  # every request runs its max_tokens: long enough for the scrapes to see it
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)


def test_load_and_unload_a_folder(srv: Server, lively_base: Path, tmp_path: Path) -> None:
    folder = random_lora_adapter(lively_base, tmp_path, "peft-folder", seed=5)
    (folder / "loraswap.json").unlink()  # a plain PEFT folder, as vLLM users have them
    assert ask(srv, "folder-one").status_code == 404
    r = post(srv, "/v1/load_lora_adapter", {"lora_name": "folder-one", "lora_path": str(folder)})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'folder-one' added successfully."
    assert ask(srv, "folder-one").status_code == 200
    again = post(srv, "/v1/load_lora_adapter", {"lora_name": "folder-one", "lora_path": str(folder)})
    assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
    r = post(srv, "/v1/unload_lora_adapter", {"lora_name": "folder-one"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'folder-one' removed successfully."
    assert ask(srv, "folder-one").status_code == 404
    gone = post(srv, "/v1/unload_lora_adapter", {"lora_name": "folder-one"})
    assert gone.status_code == 404 and "cannot be found" in gone.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"lora_name": "x"}, 400, "Both 'lora_name' and 'lora_path'"),
        ({"lora_name": "", "lora_path": "/x"}, 400, "Both"),
        ({"lora_name": "Bad Name", "lora_path": "/x"}, 400, "invalid adapter name"),
        ({"lora_name": "rel", "lora_path": "relative/folder"}, 400, "absolute"),
        ({"lora_name": "nowhere", "lora_path": "/tmp/no/such/adapter"}, 404, "No adapter found"),
        ({"lora_name": "notreg", "lora_path": "s3://UPPER"}, 400, "s3://BUCKET"),
        ({"lora_name": "missing", "lora_path": REGISTRY}, 404, "not in the registry"),
        ({"lora_name": "base", "lora_path": "/x"}, 400, "already been loaded"),
    ],
)
def test_bad_loads_get_vllms_status(srv: Server, body: dict[str, str], status: int, words: str) -> None:
    r = post(srv, "/v1/load_lora_adapter", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert "/tmp/" not in err["message"]  # server paths are never echoed


def test_an_invalid_folder_is_refused(srv: Server, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = post(srv, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(tmp_path)})
    assert r.status_code == 422, r.text
    assert not (srv.store / "broken").exists()


def test_admin_guard(srv: Server) -> None:
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        r = post(srv, path, {"lora_name": "x", "lora_path": "/x"}, headers=None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_load_from_the_registry_and_from_another(srv: Server, lively_base: Path, tmp_path: Path) -> None:
    ref = resolve_base(str(lively_base))
    src = random_lora_adapter(lively_base, tmp_path, "src", seed=6)
    publish(Registry(REGISTRY), src, "from-registry", ref, max_rank=64)
    r = post(srv, "/v1/load_lora_adapter", {"lora_name": "from-registry", "lora_path": REGISTRY})
    assert r.status_code == 200, r.text  # pulled now, though the listing may not have seen it yet
    assert ask(srv, "from-registry").status_code == 200
    assert post(srv, "/v1/unload_lora_adapter", {"lora_name": "from-registry"}).status_code == 200
    assert ask(srv, "from-registry").status_code == 200  # the registry still holds it: pulled again
    pulls = [
        s.value
        for f in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text)
        for s in f.samples
        if s.name == "loraswap_registry_pull_seconds_count"
    ]
    assert pulls and pulls[0] >= 2
    publish(Registry(OTHER_REGISTRY), src, "from-other", ref, max_rank=64)
    r = post(srv, "/v1/load_lora_adapter", {"lora_name": "from-other", "lora_path": OTHER_REGISTRY})
    assert r.status_code == 200, r.text
    assert (srv.store / "from-other").is_dir() and ask(srv, "from-other").status_code == 200


def test_metrics_of_a_live_server_drive_the_affinity_scorer(srv: Server, lively_base: Path, tmp_path: Path) -> None:
    folder = random_lora_adapter(lively_base, tmp_path, "hot", seed=7)
    assert post(srv, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(folder)}).status_code == 200
    views: list[EppView] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            views.append(epp_view(httpx.get(f"{srv.url}/metrics", timeout=30).text))
            time.sleep(0.05)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        threads = [threading.Thread(target=ask, args=(srv, "hot", 160)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        done.set()
        scraper.join()
    busy = [v for v in views if v.running or v.waiting]
    assert busy, "no scrape saw the requests in flight"
    assert any(affinity(v, "hot") == 1.0 for v in busy), busy
    assert all(v.max_active == 3 for v in busy) and all(0.0 <= v.kv <= 1.0 for v in views), views
    assert any(affinity(v, "cold") == 0.8 for v in busy), busy  # a free slot for an adapter not running
    final = epp_view(httpx.get(f"{srv.url}/metrics").text)
    assert (final.running, final.waiting, final.kv) == (0, 0, 0.0)
