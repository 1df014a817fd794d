"""The OpenAI surface through the official openai client and plain HTTP, on the real server (the lively tiny base,
random non-zero LoRA adapters, a router): legacy completions (text and token prompts, streamed, logprobs, echo,
scoring only), chat logprobs, n choices, "auto", the model routes, HEAD /health, CORS and the field audit."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import routed_store

from loraswap.adapters.base import load_tokenizer, resolve_base
from loraswap.adapters.prompt import prompt_ids
from loraswap.bench.launch import launch, stop

QUESTION = "What are the symptoms of carditis ?"
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def store(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return routed_store(lively_base, tmp_path_factory.mktemp("openai-store"))


@pytest.fixture(scope="module")
def url(lively_base: Path, store: Path) -> Iterator[str]:
    proc, url = launch(
        str(lively_base), store, quant="none", max_batch_size=4, env={"LORASWAP_CORS_ORIGINS": ORIGIN}, timeout=120
    )
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused")


_base: list[Path] = []


@pytest.fixture(scope="module")
def question_ids(lively_base: Path) -> list[int]:
    _base[:] = [lively_base]
    return prompt_ids(load_tokenizer(resolve_base(str(lively_base))), QUESTION)


def test_models_list_base_and_auto_and_retrieve_one(client: Any, url: str) -> None:
    from openai import NotFoundError

    ids = [m.id for m in client.models.list().data]
    assert ids[1:] == ["base", "auto", "symptoms", "treatment"]
    base_id = ids[0]
    assert client.models.retrieve("symptoms").parent == base_id  # type: ignore[attr-defined]
    assert client.models.retrieve(base_id).id == base_id  # a hub-style id holds a slash
    assert client.models.retrieve("auto").id == "auto"
    with pytest.raises(NotFoundError, match="did you mean 'symptoms'"):
        client.models.retrieve("symtoms")


def test_head_health(url: str) -> None:
    r = httpx.head(f"{url}/health")
    assert r.status_code == 200 and r.content == b""


def test_cors_allows_the_configured_origin_only(url: str) -> None:
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization"}
    ok = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": ORIGIN, **ask})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    other = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": "http://evil.example", **ask})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    got = httpx.get(f"{url}/v1/models", headers={"Origin": ORIGIN})
    assert got.headers["access-control-allow-origin"] == ORIGIN


def test_cors_is_off_by_default() -> None:
    from starlette.testclient import TestClient

    from loraswap.server.api.app import build_server
    from loraswap.server.settings import Settings

    app = build_server(Settings()).app
    headers = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    r = TestClient(app).options("/v1/chat/completions", headers=headers)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    with pytest.raises(ValueError, match="not an origin"):
        Settings(cors_origins="app.example")  # type: ignore[arg-type]
    assert Settings(cors_origins=f"{ORIGIN}, https://b.example:8443").cors_origins == [  # type: ignore[arg-type]
        ORIGIN,
        "https://b.example:8443",
    ]


def test_completion_of_token_ids_equals_the_answer_route(client: Any, url: str, question_ids: list[int]) -> None:
    answer = httpx.post(
        f"{url}/v1/answer", json={"adapter": "symptoms", "question": QUESTION, "max_tokens": 6}, timeout=60
    ).json()
    done = client.completions.create(model="symptoms", prompt=question_ids, max_tokens=6)
    assert done.object == "text_completion" and done.choices[0].text == answer["answer"]
    assert done.choices[0].finish_reason == "length" and done.choices[0].logprobs is None
    assert done.usage.prompt_tokens == len(question_ids) and done.usage.completion_tokens == 6
    other = client.completions.create(model="treatment", prompt=question_ids, max_tokens=6)
    assert other.choices[0].text != done.choices[0].text  # the adapter is applied


def test_completion_streamed_equals_plain(client: Any) -> None:
    prompt = "The signs and symptoms of carditis include"
    done = client.completions.create(model="symptoms", prompt=prompt, max_tokens=8)
    chunks = list(
        client.completions.create(
            model="symptoms", prompt=prompt, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    every = list(
        client.completions.create(
            model="symptoms", prompt=prompt, max_tokens=8, stream=True, stream_options={"continuous_usage_stats": True}
        )
    )
    counts = [c.usage.completion_tokens for c in every]  # vLLM's extension: usage so far on every chunk
    assert counts == sorted(counts) and counts[-1] == 8 and every[-1].usage.prompt_tokens == done.usage.prompt_tokens


def test_completion_logprobs(client: Any) -> None:
    done = client.completions.create(model="symptoms", prompt=QUESTION, max_tokens=5, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and top[token] == value
    by_id = client.completions.create(
        model="symptoms", prompt=QUESTION, max_tokens=5, logprobs=2, extra_body={"return_tokens_as_token_ids": True}
    ).choices[0]
    assert by_id.text == done.choices[0].text
    got = by_id.logprobs
    for token, value, top in zip(got.tokens, got.token_logprobs, got.top_logprobs, strict=True):
        assert 2 <= len(top) <= 3 and top[token] == value  # the 2 most likely, and the chosen if not among them
        assert value == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely
    streamed = list(client.completions.create(model="symptoms", prompt=QUESTION, max_tokens=5, logprobs=2, stream=True))
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    values = [v for c in streamed for v in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert tokens == lp.tokens and values == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_echo_scores_the_prompt_as_generation_did(client: Any, question_ids: list[int], lively_base: Path) -> None:
    tokenizer = load_tokenizer(resolve_base(str(lively_base)))
    ids_please = {"return_tokens_as_token_ids": True}
    gen = client.completions.create(
        model="symptoms", prompt=question_ids, max_tokens=4, logprobs=1, extra_body=ids_please
    ).choices[0]
    generated = [int(t.removeprefix("token_id:")) for t in gen.logprobs.tokens]
    full = question_ids + generated
    scored = client.completions.create(model="symptoms", prompt=full, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    lp = choice.logprobs
    assert scored.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert len(lp.token_logprobs) == len(full) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[-4:] == pytest.approx(gen.logprobs.token_logprobs, abs=1e-3)  # the same numbers
    assert choice.text.endswith(gen.text) and lp.text_offset[0] == 0
    assert tokenizer.decode(generated) == gen.text  # the ids are the generated tokens
    base = client.completions.create(model="base", prompt=full, max_tokens=0, echo=True, logprobs=0)
    assert sum(base.choices[0].logprobs.token_logprobs[1:]) != pytest.approx(sum(lp.token_logprobs[1:]))
    echoed = client.completions.create(model="symptoms", prompt="Hello there", max_tokens=3, echo=True)
    assert echoed.choices[0].text.startswith("Hello there") and echoed.choices[0].logprobs is None


def test_n_choices_and_several_prompts(client: Any, question_ids: list[int]) -> None:
    two = client.completions.create(model="symptoms", prompt=question_ids, max_tokens=6, n=2, temperature=1.0, seed=7)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text != two.choices[1].text
    again = client.completions.create(model="symptoms", prompt=question_ids, max_tokens=6, n=2, temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]  # a seed makes n choices repeatable
    assert two.usage.prompt_tokens == len(question_ids) and two.usage.completion_tokens == 12
    # The n choices of a prompt never seen whole before: the first computes it (all but the system turn, which
    # earlier requests cached), the others take all its blocks from the prefix cache (blocks of 8 tokens that end
    # before the prompt's last token).
    fresh = prompt_ids(load_tokenizer(resolve_base(str(_base[0]))), "What are the treatments for pulmitis ?")
    three = client.completions.create(model="treatment", prompt=fresh, max_tokens=2, n=3)
    reusable = (len(fresh) - 1) // 8 * 8
    first_cached = three.usage.prompt_tokens_details.cached_tokens - 2 * reusable
    assert reusable > 0 and 0 <= first_cached < reusable
    many = client.completions.create(model="base", prompt=["Fever and", "Rest and fluids"], max_tokens=3, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy: both choices of a prompt agree
    chat = client.chat.completions.create(
        model="treatment", messages=[{"role": "user", "content": QUESTION}], max_tokens=5, n=2, temperature=1.0
    )
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 10
    streamed = list(
        client.chat.completions.create(
            model="treatment",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=5,
            n=2,
            stream=True,
            seed=3,
            temperature=1.0,
        )
    )
    finished = [c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_chat_logprobs_plain_and_streamed(client: Any) -> None:
    ask: dict[str, Any] = {
        "model": "symptoms",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 5,
        "logprobs": True,
        "top_logprobs": 3,
    }
    done = client.chat.completions.create(**ask)
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens == 5
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token and c.bytes == list(c.token.encode())
        assert math.isclose(c.logprob, c.top_logprobs[0].logprob, abs_tol=1e-6)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"continuous_usage_stats": True}))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert [x.token for x in streamed] == [c.token for c in content]
    plain = client.chat.completions.create(**{**ask, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    by_id = client.chat.completions.create(**ask, extra_body={"return_tokens_as_token_ids": True})
    assert all(c.token.startswith("token_id:") for c in by_id.choices[0].logprobs.content)
    assert [c.logprob for c in by_id.choices[0].logprobs.content] == [c.logprob for c in content]


def test_auto_on_the_openai_routes(client: Any) -> None:
    for question, qtype in [
        ("What are the symptoms of nephritis ?", "symptoms"),
        ("What are the treatments for nephritis ?", "treatment"),
    ]:
        ask = [{"role": "user", "content": question}]
        chat = client.chat.completions.create(model="auto", messages=ask, max_tokens=3)
        assert chat.model == qtype
        done = client.completions.create(model="auto", prompt=question, max_tokens=3)
        assert done.model == qtype


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"hello": 1}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"100000": 1}}, "logit_bias"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"best_of": 1, "n": 2}, None),
        ("/v1/completions", {"best_of": 3, "stream": True}, None),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"top_k": 5}, "top_k"),
        ("/v1/completions", {"prompt": [10**7]}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"n": 129}, "n"),
        ("/v1/chat/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/chat/completions", {"logit_bias": {"-1": 10}}, "logit_bias"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"repetition_penalty": 1.2}, "repetition_penalty"),
    ],
)
def test_fields_that_would_change_the_answer_are_refused(url: str, path: str, extra: dict, param: str | None) -> None:  # type: ignore[type-arg]
    body = {"model": "base", "max_tokens": 2}
    body |= {"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(f"{url}{path}", json=body | extra, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and (param is None or param in err["message"])


def test_logit_bias_and_penalties_are_honoured(client: Any) -> None:
    ask: dict[str, Any] = {"model": "symptoms", "prompt": QUESTION, "max_tokens": 4, "logprobs": 0}
    ids = {"return_tokens_as_token_ids": True}
    plain = client.completions.create(**ask, extra_body=ids).choices[0].logprobs.tokens
    banned = int(plain[0].removeprefix("token_id:"))
    forced = 7 if banned != 7 else 8
    biased = client.completions.create(**ask, logit_bias={str(forced): 100}, extra_body=ids).choices[0]
    assert biased.logprobs.tokens == [f"token_id:{forced}"] * 4
    other = client.completions.create(**ask, logit_bias={str(banned): -100}, extra_body=ids).choices[0]
    assert other.logprobs.tokens[0] != plain[0]
    chat = {"model": "symptoms", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
    forced_chat = client.chat.completions.create(**chat, logit_bias={str(forced): 100})
    assert (
        forced_chat.choices[0].message.content
        == client.completions.create(model="base", prompt=[forced] * 4, max_tokens=0, echo=True).choices[0].text
    )  # the forced token four times
    penalised = client.chat.completions.create(**chat, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised.choices[0].finish_reason in ("stop", "length")


def test_best_of_returns_the_choices_of_highest_mean_logprob(client: Any, question_ids: list[int]) -> None:
    ask: dict[str, Any] = {"model": "symptoms", "prompt": question_ids, "max_tokens": 5, "temperature": 1.0, "seed": 11}
    all_four = client.completions.create(**ask, n=4, logprobs=0)
    every = all_four.choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every]
    ranked = [every[i].text for i in sorted(range(4), key=lambda i: -means[i])]
    best = client.completions.create(**ask, n=2, best_of=4)
    assert [c.text for c in best.choices] == ranked[:2] and [c.index for c in best.choices] == [0, 1]
    assert best.choices[0].logprobs is None  # computed to rank, returned only when asked for
    assert best.usage.completion_tokens == all_four.usage.completion_tokens  # all 4 were generated


def test_fields_that_change_nothing_are_ignored_and_neutral_values_accepted(url: str) -> None:
    neutral = {"user": "u1", "metadata": {"a": "b"}, "store": False, "presence_penalty": 0, "logit_bias": {}}
    chat = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "service_tier": "auto"}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat | neutral, timeout=30).status_code == 200
    done = {"model": "base", "prompt": "Hi", "max_tokens": 2, "best_of": 1, "suffix": None, "top_k": -1}
    assert httpx.post(f"{url}/v1/completions", json=done | neutral, timeout=30).status_code == 200


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_guidellm_benchmark_completes_without_errors(url: str, lively_base: Path, tmp_path: Path, route: str) -> None:
    """guidellm (vLLM's load tester; its 0.8 CLI names the command `run`) for a few seconds, two concurrent streams
    of synthetic prompts, streamed with usage: every request completes."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    exe = shutil.which("guidellm", path=str(Path(sys.executable).parent))
    assert exe is not None, "guidellm is a dev dependency (pyproject.toml); run make install"
    out = tmp_path / "report.json"
    cmd = [
        exe,
        "run",
        "--backend",
        f"kind=openai_http,target={url},model=symptoms,request_format={route}",
        "--data",
        "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
        "--profile",
        "kind=concurrent,streams=2",
        "--constraint",
        "kind=max_duration,seconds=4",
        "--tokenizer",
        f"kind=huggingface_auto,model={lively_base}",
        "--output",
        f"kind=json,path={out}",
        "--disable-progress",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    totals = json.loads(out.read_text())["benchmarks"][0]["metrics"]["request_totals"]
    assert totals["successful"] >= 2 and totals["errored"] == 0, totals


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_leaves_an_n_choice_stream_cancels_every_choice(url: str) -> None:
    before = _metric(url, "loraswap_cancelled_total")
    ask = {"model": "symptoms", "prompt": QUESTION, "max_tokens": 400, "n": 3, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=ask, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 4:
                break
    deadline = time.monotonic() + 60
    while _metric(url, "loraswap_cancelled_total") < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(url, "loraswap_cancelled_total") == before + 3
    time.sleep(0.5)  # the cancels reach the worker ahead of the next request
    plain = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 3
