"""llama-server as the bench's CPU peer (`bench/llamaserver.py`): finding the binary, asking it the bench's
requests, pairing its scenarios with loraswap's, the ratios; and, where `make llama-server` built it, that it
serves what loraswap serves: a shipped adapter's greedy answers agree between the two.

The agreement criterion: the first AGREE_TOKENS tokens of the greedy answer identical, on at least MIN_AGREE of
the 16 questions. The two do not run the same arithmetic: loraswap serves the base in NF4 (the embedded Q4_1
weights dequantized, then re-quantized by bitsandbytes) with float32 activations, llama-server the Q4_1 file
itself with activations rounded to 8 bits (Q8_1). Where two tokens are nearly tied the two may pick differently
and every later token then differs, so whole answers cannot be required to match. Measured with `symptoms`: both
sides start all 16 answers with the adapter's learned MedQuAD template ("What are the signs and symptoms of X?
The"), identical for the first 10-12 tokens, and part at the next near tie ("The Human Phenotype" against "The
symptoms of"). An adapter missing, applied at the wrong scale, or a different prompt changes the start of nearly
every answer, which is what this guards. The control: llama-server's base answers (no adapter) must differ
from loraswap's adapter answers on most questions, so an adapter that changed nothing could not pass.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraswap.bench import llamaserver, load
from loraswap.bench.config import BenchConfig
from loraswap.bench.load import Job, Result, Run
from loraswap.bench.results import Collected, summary
from loraswap.bench.scenarios import Bench, round_steps

AGREE_TOKENS = 8
MIN_AGREE = 12
TOPICS = (
    "asthma", "glaucoma", "psoriasis", "anemia", "migraine", "gout", "hepatitis B", "Parkinson's disease",
    "cystic fibrosis", "Lyme disease", "osteoporosis", "celiac disease", "Marfan syndrome", "Tay-Sachs disease",
    "sickle cell disease", "Huntington disease",
)  # fmt: skip
QUESTIONS = tuple(f"What are the symptoms of {t} ?" for t in TOPICS)


def test_cpu_flags_read_the_first_cpu() -> None:
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    assert llamaserver.cpu_flags(text) == {"fpu", "sse", "avx2", "avx512f"}
    assert llamaserver.cpu_flags("nothing here") == set()


def test_locate_says_how_to_build_and_refuses_a_binary_built_for_another_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "llama-server"
    monkeypatch.setattr(llamaserver, "_candidates", lambda: [cache])
    binary, why = llamaserver.locate()
    assert binary is None and "make llama-server" in why
    (cache / "bin").mkdir(parents=True)
    (cache / "bin" / "llama-server").write_text("#!/bin/sh\n")
    (cache / "bin" / "llama-server").chmod(0o755)
    (cache / "cpu-flags").write_text("flags\t\t: fpu an_instruction_no_cpu_has\n")
    binary, why = llamaserver.locate()
    assert binary is None and "another CPU" in why and "an_instruction_no_cpu_has" in why
    here = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    (cache / "cpu-flags").write_text(next((x for x in here.splitlines() if x.startswith("flags")), "") + "\n")
    assert llamaserver.locate() == (cache / "bin" / "llama-server", "")
    assert llamaserver.locate(str(tmp_path / "nope"))[0] is None
    assert llamaserver.locate(str(cache / "bin" / "llama-server"))[0] == cache / "bin" / "llama-server"


def test_the_wire_asks_for_the_jobs_adapter_and_exact_length() -> None:
    wire = llamaserver.completion_wire(lambda q: [1, 2, len(q)], {"a": 0, "b": 1})
    body = wire.body(Job("b", "q?", 7))
    assert body["prompt"] == [1, 2, 2] and body["lora"] == [{"id": 1, "scale": 1.0}]
    assert body["n_predict"] == 7 and body["ignore_eos"] is True and body["stream"] is True
    assert body["temperature"] == 0.0
    assert wire.body(Job("base", "q?", 7))["lora"] == []  # every adapter at its start scale, 0
    with pytest.raises(KeyError, match="'c' is not loaded in llama-server; loaded: a, b"):
        wire.body(Job("c", "q?", 7))
    assert wire.text({"content": "x", "stop": False}) and not wire.text({"content": "", "stop": False})
    assert wire.tokens({"content": "x", "stop": False}) is None
    assert wire.tokens({"content": "", "stop": True, "tokens_predicted": 7}) == 7


def _bench(peer: bool, peer_only: bool = False) -> Bench:
    cfg = BenchConfig.quick(adapters=4, clients=2, peer_only=peer_only)
    names = [f"a{i}" for i in range(4)]
    b = Bench(cfg, None, "http://unused", names, ["c0"], ["u0"], {}, Collected(cfg))  # type: ignore[arg-type]
    if peer:
        b.peer_url, b.peer_wire = "http://peer", llamaserver.completion_wire(lambda q: [1], {})
    return b


def test_each_peer_slice_runs_beside_loraswaps_in_the_same_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraswap.bench import scenarios

    alone = [name for name, _ in round_steps(_bench(False), 0)]
    assert [name for name, _ in round_steps(_bench(True), 0)] == alone  # the twins ride inside their steps
    assert [name for name, _ in round_steps(_bench(True, peer_only=True), 0)] == [
        "single", "mixed16", "mixed64", "base", "short_long"
    ]  # fmt: skip
    order: list[tuple[str, bool]] = []

    def closed(b: Bench, work: list[Job], peer: bool = False) -> Run:
        order.append((work[0].adapter, peer))
        return Run([Result(work[0], 0.0, ttft=0.1, latency=1.0, tokens=1)], 1.0)

    def short_long(b: Bench, seed: int, peer: bool = False) -> list[tuple[str, Run]]:
        prefix = "llamaserver_" if peer else ""
        return [(f"{prefix}short_alone", Run([], 1.0)), (f"{prefix}short_with_long", Run([], 1.0))]

    monkeypatch.setattr(scenarios, "closed", closed)
    monkeypatch.setattr(scenarios, "short_long", short_long)
    for r in (0, 1):
        b = _bench(True, peer_only=True)
        dict(round_steps(b, r))["single"]()  # type: ignore[operator]
        assert order[-2:] == ([("a0", False), ("a0", True)] if r == 0 else [("a0", True), ("a0", False)])
        scenarios.run_round(b, r)
        assert set(b.out.runs) == {
            *(f"{p}{n}" for p in ("", "llamaserver_") for n in ("single", "mixed16", "mixed64", "base")),
            *(f"{p}short_{n}" for p in ("", "llamaserver_") for n in ("alone", "with_long")),
        }


def test_ratios_against_llama_server() -> None:
    cfg = BenchConfig.quick()
    c = Collected(cfg)
    job = Job("a", "q?", 4)

    def run(tokens: int, ttft: float, wall: float = 1.0) -> Run:
        return Run([Result(job, 0.0, ttft=ttft, latency=wall, tokens=tokens)], wall)

    for name, ours, theirs in (("single", 40, 50), ("mixed16", 40, 10), ("mixed64", 36, 6), ("base", 45, 50)):
        c.add(name, run(ours, 0.2))
        c.add(f"llamaserver_{name}", run(theirs, 0.4))
    ratios = summary(c)["ratios"]
    assert ratios["single_vs_llamaserver"] == 0.8 and ratios["mixed16_vs_llamaserver"] == 4.0
    assert ratios["mixed64_vs_llamaserver"] == 6.0 and ratios["base_vs_llamaserver"] == 0.9
    assert ratios["mixed16_ttft_p50_vs_llamaserver"] == 0.5
    assert ratios["llamaserver_short_p50_with_long_vs_alone"] is None  # not measured in this run


# ---- with the real binary (make llama-server; make test builds it) ----

BINARY, WHY = llamaserver.locate()
needs_binary = pytest.mark.skipif(BINARY is None, reason=WHY)


@pytest.fixture(scope="module")
def peer_on_symptoms(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """llama-server on the embedded base's GGUF with the shipped `symptoms` adapter exported to GGUF."""
    from loraswap.adapters.base import embedded_gguf_path, load_tokenizer, resolve_base
    from loraswap.adapters.store import SHIPPED_DIR

    assert BINARY is not None
    ref = resolve_base("embedded")
    work = tmp_path_factory.mktemp("llama-server")
    files = llamaserver.export_ggufs(ref, {"symptoms": SHIPPED_DIR / "symptoms"}, work / "gguf")
    with (
        open(work / "log", "wb") as log,
        llamaserver.Peer(BINARY, embedded_gguf_path(), files, 1, 4, 256, log) as peer,
    ):
        yield peer, peer.wire(llamaserver.prompt_tokens(load_tokenizer(ref), QUESTIONS))


def _peer_tokens(url: str, wire: load.Wire, adapter: str, n: int) -> list[list[int]]:
    """Greedy answers of every question, as token ids (not streamed: the final result lists them)."""
    answers = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for q in QUESTIONS:
            body = wire.body(Job(adapter, q, n)) | {"stream": False, "ignore_eos": False, "return_tokens": True}
            r = client.post(wire.route, json=body)
            assert r.status_code == 200, r.text
            answers.append([int(t) for t in r.json()["tokens"]])
    return answers


def _loraswap_tokens(adapter: str, n: int) -> list[list[int]]:
    """The same greedy answers from loraswap's engine on the NF4 base, one batch (as the bench's server runs)."""
    from loraswap.adapters.base import load_base
    from loraswap.adapters.prompt import prompt_ids
    from loraswap.adapters.store import SHIPPED_DIR, AdapterStore
    from loraswap.server.jobs import Job as EngineJob
    from loraswap.server.worker.engine import Engine

    base = load_base("embedded", quant="nf4")
    store = AdapterStore(Path("/nonexistent"), SHIPPED_DIR)
    engine = Engine(base.model, base.tokenizer, store.get)
    for i, q in enumerate(QUESTIONS):
        engine.submit(EngineJob(f"r{i}", prompt_ids(base.tokenizer, q), adapter, max_tokens=n, logprobs=0))
    ids: dict[int, list[int]] = {i: [] for i in range(len(QUESTIONS))}
    while engine.has_work():
        for e in engine.step():
            assert e.error is None, e.error
            ids[int(e.uid[1:])] += [int(t["id"]) for t in e.logprobs or [] if not t.get("end")]
    return [ids[i] for i in range(len(QUESTIONS))]


@needs_binary
@pytest.mark.slow
def test_a_streamed_bench_request_generates_exactly_max_tokens(peer_on_symptoms: Any) -> None:
    peer, wire = peer_on_symptoms

    async def go(job: Job) -> Result:
        async with load.client_for(peer.url) as client:
            return await load.send(client, job, wire=wire)

    for adapter in ("symptoms", "base"):
        res = asyncio.run(go(Job(adapter, QUESTIONS[0], 40)))
        assert res.error is None and res.tokens == 40 and res.streamed > 0
        assert res.ttft is not None and res.latency is not None and res.ttft <= res.latency


@needs_binary
@pytest.mark.slow
def test_llama_server_and_loraswap_agree_on_a_shipped_adapters_answers(peer_on_symptoms: Any) -> None:
    peer, wire = peer_on_symptoms
    theirs = _peer_tokens(peer.url, wire, "symptoms", AGREE_TOKENS)
    their_base = _peer_tokens(peer.url, wire, "base", AGREE_TOKENS)
    ours = _loraswap_tokens("symptoms", AGREE_TOKENS)
    agree = sum(a[:AGREE_TOKENS] == b[:AGREE_TOKENS] for a, b in zip(ours, theirs, strict=True))
    control = sum(a[:AGREE_TOKENS] == b[:AGREE_TOKENS] for a, b in zip(ours, their_base, strict=True))
    print(f"first {AGREE_TOKENS} tokens identical: {agree}/16 with the adapter, {control}/16 against the base")
    assert agree >= MIN_AGREE, f"{agree}/16 answers agree on their first {AGREE_TOKENS} tokens"
    assert control <= len(QUESTIONS) - MIN_AGREE, f"the adapter changes only {16 - control}/16 answers' start"
