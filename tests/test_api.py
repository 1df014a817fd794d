"""The API process's pieces without a server: the error mapping, the response shapes, the queue bridge, and
what crosses to the workers (the spec and its metrics are pickled into each worker)."""

from __future__ import annotations

import asyncio
import json
import pickle
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import pytest
from litserve.utils import LitAPIStatus

from loraswap.adapters.store import did_you_mean
from loraswap.server.api.bridge import Bridge
from loraswap.server.api.errors import KIND_STATUS, APIError, from_event, from_validation
from loraswap.server.api.metrics import Metrics
from loraswap.server.api.protocol import ChatRequest, finish_reason, usage
from loraswap.server.api.spec import LoraswapSpec
from loraswap.server.jobs import ErrorKind, Job, JobEvent, failed
from loraswap.server.settings import Settings


def test_every_error_kind_has_its_one_status() -> None:
    assert set(KIND_STATUS) == set(get_args(ErrorKind))
    assert KIND_STATUS == {"adapter_not_found": 404, "invalid_job": 400, "generation_failed": 500, "worker_lost": 503}
    for kind, status in KIND_STATUS.items():
        err = from_event(failed("u", f"it failed ({kind})", kind))
        assert err.status_code == status
        assert err.body["error"]["message"] == f"it failed ({kind})"
    assert from_event(failed("u", "gone", "adapter_not_found")).body["error"]["type"] == "not_found_error"
    assert from_event(failed("u", "retry", "worker_lost")).body["error"]["type"] == "server_error"


def test_a_failed_event_survives_the_wire_with_its_kind() -> None:
    ev = failed("u", "the worker stopped", "worker_lost", prompt_tokens=3)
    back = JobEvent.from_wire(json.loads(json.dumps(ev.to_wire())))
    assert back == ev and from_event(back).status_code == 503


def test_the_finish_reason_is_openai_s() -> None:
    assert finish_reason("length") == "length"
    assert [finish_reason(r) for r in ("stop", "cancelled", "error")] == ["stop", "stop", "stop"]


def test_usage_from_the_last_event() -> None:
    ev = JobEvent("u", "", "stop", prompt_tokens=30, completion_tokens=5, cached_tokens=24)
    assert usage(ev) == {
        "prompt_tokens": 30,
        "completion_tokens": 5,
        "total_tokens": 35,
        "prompt_tokens_details": {"cached_tokens": 24},
    }


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(Exception) as caught:
        ChatRequest.model_validate({"model": "base", "messages": [{"role": "user", "content": "hi"}], "n": 129})
    err = from_validation(caught.value.errors())  # type: ignore[attr-defined]
    assert err.status_code == 400 and err.body["error"]["param"] == "n"
    assert "n: Input should be less than or equal to 128" in str(err.body["error"]["message"])
    assert from_validation([]).body["error"]["message"] == "invalid request"


def test_the_close_name_hint() -> None:
    assert did_you_mean("symtoms", ["symptoms", "treatment"]) == "; did you mean 'symptoms'?"
    assert did_you_mean("zzz", ["symptoms"]) == ""


class FakeSpec:
    """What the bridge uses of a LitSpec that LitServe connected to its queues."""

    def __init__(self) -> None:
        self.response_buffer: dict[str, Any] = {}
        self.queued: list[tuple[Any, ...]] = []
        self.response_queue_id = 0
        self.request_queue = self
        self.script: list[Any] = []  # what the workers send back, in order

    def put(self, item: tuple[Any, ...]) -> None:
        self.queued.append(item)

    async def data_streamer(self, q: Any, event: Any, send_status: bool) -> AsyncIterator[tuple[Any, Any]]:
        for data in self.script:
            yield data, LitAPIStatus.OK


def job(**kw: Any) -> Job:
    return Job(uid=str(uuid.uuid4()), prompt_ids=[1, 2, 3], adapter=None, **kw)


def test_the_bridge_queues_the_job_under_its_uid_and_parses_its_events() -> None:
    spec = FakeSpec()
    j = job(max_tokens=2)
    spec.script = [
        JobEvent(j.uid, "Hel", None, 3, 1, batch=1).to_wire(),
        json.dumps(JobEvent(j.uid, "lo", "length", 3, 2, batch=1, loaded_names=("a",), worker=7).to_wire()),
    ]
    bridge = Bridge(spec, Metrics())

    async def run() -> list[JobEvent]:
        return [ev async for ev in bridge.events(j, "/v1/answer")]

    events = asyncio.run(run())
    assert [(e.text, e.finish_reason) for e in events] == [("Hel", None), ("lo", "length")]
    (queued,) = spec.queued
    assert queued[1] == j.uid and queued[3] is j
    assert spec.response_buffer == {}  # the entry is dropped once the job ends
    assert bridge.loaded() == {"a"}


def test_a_job_left_early_is_cancelled_on_the_workers() -> None:
    spec = FakeSpec()
    j = job()
    spec.script = [JobEvent(j.uid, "Hel", None, 3, 1, batch=1).to_wire()]
    cancels: dict[str, float] = {}
    bridge = Bridge(spec, Metrics(), cancels=cancels)

    async def first() -> None:
        events = bridge.events(j, "/v1/answer")
        async for _ in events:
            break
        await events.aclose()  # type: ignore[attr-defined]

    asyncio.run(first())
    assert list(cancels) == [j.uid]


def test_the_spec_pickles_for_the_workers_without_its_routes_or_metrics(tmp_path: Path) -> None:
    spec = LoraswapSpec(Settings(base="embedded", adapters_dir=tmp_path), unusable={"bad": "why"})
    spec.metrics.cancelled.inc()
    assert spec.endpoints
    copy = pickle.loads(pickle.dumps(spec))
    assert copy.endpoints == [] and copy.catalog.unusable == {"bad": "why"}
    assert b"loraswap_cancelled_total 0.0" in copy.metrics.render()  # a fresh registry in the copy


def test_a_route_error_is_openai_shaped_without_paths() -> None:
    err = APIError(404, "no file /tmp/x/y/adapter.safetensors", param="model", code="model_not_found")
    assert err.body == {
        "error": {
            "message": "no file adapter.safetensors",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_each_job_gets_its_own_uuid4_and_the_server_s_limits(tiny_base: Path, tmp_path: Path) -> None:
    spec = LoraswapSpec(Settings(base=str(tiny_base), adapters_dir=tmp_path, max_tokens=64))
    a, b = (spec.prompts.job([1, 2], None, None, 0.0, 1.0, None, ()) for _ in range(2))
    assert a.uid != b.uid and uuid.UUID(a.uid).version == 4 and str(uuid.UUID(a.uid)) == a.uid
    assert a.max_tokens == 64
    with pytest.raises(APIError) as over:
        spec.prompts.job([1, 2], None, 65, 0.0, 1.0, None, ())
    assert over.value.status_code == 400 and over.value.body["error"]["code"] == "max_tokens_too_large"
    with pytest.raises(APIError) as long:
        spec.prompts.job([1] * spec.prompts.context, None, None, 0.0, 1.0, None, ())
    assert long.value.body["error"]["code"] == "context_length_exceeded"
