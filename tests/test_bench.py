"""`loraswap bench`: its pieces (synthetic adapters, statistics, traffic) and one whole quick run on the tiny base."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from loraswap.adapters.base import resolve_base
from loraswap.adapters.validate import validate_adapter
from loraswap.bench import load
from loraswap.bench.config import BenchConfig
from loraswap.bench.cpu import quota_unavailable
from loraswap.bench.load import Job, Result, Run
from loraswap.bench.results import Collected
from loraswap.bench.scenarios import Bench


def test_synthetic_adapters_validate_and_change_the_output(lively_base: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraswap.adapters.archive import install_archive
    from loraswap.bench.synth import archive, synth_lora

    ref = resolve_base(str(lively_base))
    folder = synth_lora(ref, tmp_path / "synth" / "a", seed=1)
    installed = install_archive(archive(folder), "a", tmp_path / "store", ref)  # the upload path validates it
    assert validate_adapter(installed, ref) == []
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    base = AutoModelForCausalLM.from_pretrained(lively_base)
    plain = base(ids).logits
    adapted = PeftModel.from_pretrained(base, str(installed))(ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)
    other = synth_lora(ref, tmp_path / "synth" / "b", seed=2)
    assert (other / "adapter_model.safetensors").read_bytes() != (folder / "adapter_model.safetensors").read_bytes()


def test_percentiles_and_summary_count_only_what_succeeded() -> None:
    assert load.percentile([], 50) is None
    assert load.percentile([10.0], 99) == 10.0
    assert load.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    job = Job("a", "q?", 4)
    ok = [Result(job, 0.0, ttft=0.1 * i, latency=1.0 * i, tokens=4) for i in range(1, 5)]
    bad = Result(job, 0.0, error="HTTP 500")
    s = load.summarize([Run([*ok[:2], bad], 2.0), Run(ok[2:], 2.0)])
    assert s["requests"] == 5 and s["errors"] == 1 and s["error_samples"] == ["1 x HTTP 500"]
    assert s["req_s"] == 1.0 and s["tok_s"] == 4.0  # 4 answers of 4 tokens in 4 s
    assert s["p50_ms"] == 2500.0 and s["ttft_p50_ms"] == 250.0


def test_short_requests_starved_behind_long_ones_end_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that serves the long requests and never the short ones (llama-server's one LoRA set at a time, at
    worst): the run ends at its deadline, the short requests waiting then count with the time they waited."""

    async def send(client: object, job: Job, res: Result | None = None, wire: object = None) -> Result:
        res = res or Result(job, time.perf_counter())
        if job.tag == "short":
            await asyncio.sleep(3600)
        await asyncio.sleep(0.02)
        res.latency, res.tokens = time.perf_counter() - res.start, job.max_tokens
        return res

    monkeypatch.setattr(load, "send", send)
    shorts = [Job(f"s{i}", "q?", 4, "short") for i in range(5)]
    run = asyncio.run(
        load.with_background("http://127.0.0.1:9", shorts, 2, lambda i: Job("long", "q?", 8, "long"), 3, deadline=0.5)
    )
    assert 0.5 <= run.wall < 5
    short = [r for r in run.results if r.job.tag == "short"]
    assert len(short) == 5 and sum(r.unfinished for r in short) == 2  # two clients, each stuck on its first
    assert all(0.5 <= r.latency < 5 for r in short if r.unfinished)  # type: ignore[operator]
    s = load.summarize([run], tag="short")
    assert (s["requests"], s["unfinished"], s["errors"]) == (5, 2, 3)  # three never sent
    assert s["p50_ms"] is not None and s["p50_ms"] >= 500  # the waits count, as a lower bound
    assert load.summarize([run], tag="long")["errors"] == 0


def test_a_request_the_server_closed_unanswered_is_sent_once_more() -> None:
    """A pooled keep-alive connection the server closed just as it was reused: no response, so the request is sent
    again; twice in a row is an error, and so is a stream cut after the server answered."""
    sse = b'data: {"delta": "a"}\n\ndata: {"delta": "b", "usage": {"completion_tokens": 2}}\n\ndata: [DONE]\n\n'

    def run(fail: int) -> Result:
        calls = 0

        def handler(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            if calls <= fail:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
            return httpx.Response(200, content=sse, headers={"content-type": "text/event-stream"})

        async def go() -> Result:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://peer") as client:
                return await load.send(client, Job("a", "q?", 2))

        return asyncio.run(go())

    once = run(fail=1)
    assert once.error is None and once.tokens == 2 and once.latency is not None
    twice = run(fail=2)
    assert twice.error is not None and "sent once more" in twice.error and twice.tokens == 0


def test_traffic_is_reproducible_and_zipf_is_skewed() -> None:
    names = [f"a{i}" for i in range(64)]
    uniform = load.jobs(names, 2000, 8, seed=3)
    assert uniform == load.jobs(names, 2000, 8, seed=3)
    assert len({j.adapter for j in uniform}) == 64
    skewed = Counter(j.adapter for j in load.jobs(names, 2000, 8, seed=3, weights=load.zipf_weights(64)))
    top, count = skewed.most_common(1)[0]
    assert top == "a0" and count > 5 * (2000 / 64)


@pytest.fixture(scope="module")
def quick_run(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:  # type: ignore[type-arg]
    """One `loraswap bench --quick` on the tiny base, through the CLI, with 4 synthetic adapters."""
    from loraswap.main import main

    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--quick", "--base", str(lively_base), "--no-quant", "--adapters", "4", "--no-reference"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main([*args, "--max-batch-size", "4", "--json", "--out", str(out)])
    return json.loads(stdout.getvalue()), out


def test_quick_bench_measures_every_scenario_without_errors(quick_run: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    result, _ = quick_run
    scen = result["scenarios"]
    scenarios = ["single", "mixed4", "mixed16", "mixed64", "skewed64", "base", "naive", "short_alone", "open50"]
    scenarios.append("single_neighbour")
    if quota_unavailable() is None:  # root on a machine with a writable cgroup cpu controller
        scenarios.append("single_quota")
        assert result["ratios"]["single_in_quota_vs_single"] > 0
    for name in scenarios:
        row = scen[name]
        assert row["requests"] > 0 and row["errors"] == 0, (name, row)
        assert row["tok_s"] > 0 and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert set(row) >= {"req_s", "tok_s", "p50_ms", "p95_ms", "p99_ms", "ttft_p50_ms", "ttft_p95_ms"}
    # ignore_eos: every request generated exactly its max_tokens, so throughput compares equal work.
    assert scen["single"]["tok_s"] == pytest.approx(16 * scen["single"]["req_s"], rel=0.01)
    assert scen["short_with_long"]["requests"] == scen["short_alone"]["requests"] == 4
    assert scen["short_with_long"]["errors"] == 0
    assert scen["short_with_long"]["long_streamed_tok_s"] > 0  # the long requests streamed meanwhile
    assert scen["single_neighbour"]["requests"] == scen["single"]["requests"]  # the same requests, beside a neighbour
    assert result["ratios"]["single_ttft_p50_with_neighbour_vs_single"] > 0
    ratios = ("mixed16_vs_single", "mixed64_vs_single", "single_vs_naive", "skewed64_vs_single")
    for key in (*ratios, "single_with_neighbour_vs_single"):
        assert result["ratios"][key] > 0
    # Every adapter loaded once: 4 in the warm-up, 3 cold, 2 uploaded; the server timed each load.
    assert result["cold_load_ms"]["n"] == 9 and result["cold_load_ms"]["p50"] > 0
    assert result["cold_extra_ttft_ms"]["n"] == 3 and result["upload_to_first_token_ms"]["n"] == 2
    assert result["upload_to_first_token_ms"]["p50"] > 0
    rss = result["memory"]["worker_rss_mb"]
    assert set(rss) == {"0", "1", "4"} and all(v > 0 for v in rss.values())
    # The warm-up's prompts left blocks in the prefix cache, counted apart from the adapters' own memory.
    cached = result["memory"]["prompt_cache_mb"]
    assert set(cached) == {"0", "1", "4"} and cached["4"] > cached["0"]
    mem = result["memory"]
    assert mem["adapter_mb_per_loaded_adapter"] == pytest.approx(
        mem["mb_per_loaded_adapter"] - mem["prompt_cache_mb_per_loaded_adapter"], abs=0.01
    )
    assert result["machine"]["cores"] >= 1
    assert result["rounds"]["single"] == [scen["single"]["tok_s"]]  # one round: its slice is the scenario
    assert result["churn"]["cycles"] == 500 and result["churn"]["load_ms_p50"] > 0
    spans = mem["intervals"]
    assert [(i["from"], i["to"]) for i in spans] == [(1, 4)]
    assert spans[0]["mb_per_adapter"] == pytest.approx(mem["mb_per_loaded_adapter"], abs=0.01)


def test_quick_bench_writes_the_report_and_charts(quick_run: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    from PIL import Image

    result, out = quick_run
    report = (out / "report.md").read_text()
    assert "| mixed16_vs_single |" in report and "## Adapter cold load" in report
    assert json.loads((out / "results.json").read_text()) == result
    for chart in ("throughput.png", "latency_cdf.png", "cold_load.png", "open_loop.png"):
        assert f"]({chart})" in report
        with Image.open(out / chart) as img:
            assert img.size[0] > 300
    assert "the long ones streamed" in report
    # A run without the short-beside-long scenario still makes the whole report.
    from loraswap.bench.report import markdown

    scenarios = {k: v for k, v in result["scenarios"].items() if k != "short_with_long"}
    partial = markdown({**result, "scenarios": scenarios}, "loraswap bench", [])
    assert "## Adapter cold load" in partial and "the long ones streamed" not in partial


def test_histogram_quantile_interpolates_within_the_bucket() -> None:
    from loraswap.bench.probes import histogram_quantile

    buckets = [(0.01, 2.0), (0.02, 6.0), (0.05, 10.0), (float("inf"), 10.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.01 + 0.01 * (5 - 2) / 4)
    assert histogram_quantile(buckets, 0.1) == pytest.approx(0.005)
    assert histogram_quantile([(float("inf"), 0.0)], 0.5) is None


def _bench_for_steps(naive: object = None) -> Bench:
    """A scenarios.Bench for building steps only: no server, no session."""
    cfg = BenchConfig.quick(adapters=4, clients=2)
    names = [f"a{i}" for i in range(4)]
    return Bench(cfg, None, "http://unused", names, ["c0"], ["u0"], {}, Collected(cfg), naive=naive)  # type: ignore[arg-type]


def test_every_interleaved_scenario_is_one_step_of_a_round() -> None:
    from loraswap.bench.scenarios import round_steps

    order = ["single", "mixed4", "mixed16", "mixed64", "skewed64", "base", "single_neighbour"]
    order += ["short_long", "cold", "upload"]
    assert [name for name, _ in round_steps(_bench_for_steps(), 0)] == order
    with_naive = [name for name, _ in round_steps(_bench_for_steps(naive=object()), 0)]
    assert with_naive == [*order[:7], "naive", *order[7:]]
    bench = _bench_for_steps()
    bench.quota = True
    assert [name for name, _ in round_steps(bench, 0)] == [*order[:7], "single_quota", *order[7:]]


def test_rounds_rotate_the_scenarios_and_record_their_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraswap.bench import scenarios

    ran: list[str] = []
    job = Job("a", "q?", 1)

    def steps(b: object, r: int) -> list[tuple[str, object]]:
        def step(name: str) -> object:
            ran.append(name)
            if name == "pair":
                return [("left", Run([Result(job, 0.0)], 1.0)), ("right", Run([], 1.0))]
            return Run([], 1.0) if name != "quiet" else None

        return [(name, lambda name=name: step(name)) for name in ("one", "pair", "quiet")]

    monkeypatch.setattr(scenarios, "round_steps", steps)
    bench = _bench_for_steps()
    for r in range(3):
        scenarios.run_round(bench, r)
    assert ran == ["one", "pair", "quiet", "pair", "quiet", "one", "quiet", "one", "pair"]
    assert {k: len(v) for k, v in bench.out.runs.items()} == {"one": 3, "left": 3, "right": 3}


def test_session_synthesises_adapters_in_a_folder_it_removes(lively_base: Path) -> None:
    from loraswap.bench.session import Session

    with Session(str(lively_base)) as session:
        with pytest.raises(RuntimeError, match="call start"):
            session.admin  # noqa: B018  # no server yet
        folders = session.synthesise(["a", "b"])
        weights = [(folders[n] / "adapter_model.safetensors").read_bytes() for n in ("a", "b")]
        assert weights[0] != weights[1]  # seeded by position: different adapters
        work = session.work
        assert work.is_dir() and session.proc is None
    assert not work.exists()


def test_bench_against_a_running_server_leaves_it_as_it_was(lively_base: Path, tmp_path: Path) -> None:
    import httpx

    from loraswap.bench.launch import launch, stop
    from loraswap.bench.results import summary
    from loraswap.bench.runner import run_bench

    proc, url = launch(str(lively_base), tmp_path / "store", quant="none", max_batch_size=4, timeout=120)
    try:
        before = httpx.get(f"{url}/v1/models").json()["data"]
        cfg = BenchConfig.quick(
            url=url, base=str(lively_base), quant="none", adapters=2, clients=2, reference=False, churn_cycles=0
        )
        result = summary(run_bench(cfg))
        assert all(row["errors"] == 0 for row in result["scenarios"].values())
        assert result["memory"] == {}  # another process's server: not measured
        assert httpx.get(f"{url}/v1/models").json()["data"] == before  # the bench's adapters are gone
    finally:
        stop(proc)


def test_soak_runs_mixed_traffic_with_uploads_and_deletes(lively_base: Path, tmp_path: Path) -> None:
    """A short `loraswap bench --soak` on the tiny base: every kind of traffic ran, none failed unexpectedly,
    and the server's processes were measured at the end of the warm-up and at the end."""
    from loraswap.main import main

    args = ["bench", "--soak", "--soak-seconds", "12", "--base", str(lively_base), "--no-quant"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.suppress(SystemExit):  # exit 1 when a check fails
        main([*args, "--max-batch-size", "4", "--clients", "4", "--adapters", "3", "--json", "--out", str(tmp_path)])
    result = json.loads(stdout.getvalue())
    assert result["unexpected_errors"] == 0, result["errors"]
    kinds = result["by_kind"]
    for kind in ("answer", "answer-stream", "chat", "chat-stream", "upload", "delete-in-flight", "overwrite"):
        assert kinds.get(kind, 0) > 0, kinds
    res = result["resources"]
    assert {p["role"] for p in res["processes_end"]} >= {"main", "api", "worker"}
    assert res["end"]["rss_mb"] > 0 and res["end"]["fds"] > 0 and res["end"]["threads"] > 0
    assert (tmp_path / "soak.md").is_file() and (tmp_path / "soak_memory.png").is_file()


def test_soak_verdict_fails_on_errors_growth_and_leaks() -> None:
    from loraswap.bench.soak import SoakConfig, SoakStats, summarize

    def procs(rss: float, fds: int, threads: int) -> list[dict[str, object]]:
        return [{"pid": 1, "role": "main", "rss_mb": rss, "fds": fds, "threads": threads}]

    def verdict(stats: SoakStats, end: list[dict[str, object]]) -> dict[str, bool]:
        measured = {"warmup": procs(1000, 50, 20), "end": end, "warmup_requests": 0}
        return dict(summarize(SoakConfig(), stats, measured, 60.0)["checks"])

    clean = SoakStats()
    assert all(verdict(clean, procs(1040, 50, 20)).values())
    assert not verdict(clean, procs(1060, 50, 20))["resident memory within 5% of warm-up"]
    assert not verdict(clean, procs(1000, 51, 20))["no file descriptors leaked"]
    assert not verdict(clean, procs(1000, 50, 21))["no threads leaked"]
    failed = SoakStats()
    failed.fail("answer: HTTP 500")
    assert not verdict(failed, procs(1000, 50, 20))["no unexpected errors"]
