"""What pulling an adapter from the registry adds to its first request: cold first-token latency of a rank-8 adapter
pulled from an S3 endpoint (moto's server on the loopback address) against one installed in the local store, in one
run, interleaved.

    python -m loraswap.bench.pull [--rounds 20] [--base embedded] [--quant nf4]

Each round makes two new adapters with distinct random weights (so every request loads one the server has never
seen): one is published to the registry, the other is installed in the server's user store (the same validation an
upload gets). Once the server lists both, one streamed chat request with max_tokens=1 is timed for each, in
alternating order, from sending to the first token. The registry's request pays for its pull (record and blobs
read, sha256 checked, the full validation, one rename into the cache) on top of what both pay: the worker's load of
the adapter and the prefill. On a shared CPU those vary by far more than a pull takes, so the pull is also timed
where it happens: by the server itself (`pull_in_server`, its `loraswap_registry_pull_seconds` histogram) and alone
afterwards, the same adapters pulled again by a fresh replica in this process (`pull_alone`). Needs moto
(`pip install "moto[server]"`, in the dev extra).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median, quantiles
from typing import Any

import httpx

from loraswap.bench.launch import free_port, launch_with_log, stop

BUCKET = "bench-registry"
QUESTION = "What are the symptoms of glaucoma ?"


def start_s3() -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """moto's S3 server on a free loopback port, a bucket on it; the environment that points boto3 at it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(env["AWS_ENDPOINT_URL"], timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto's S3 server did not start (is moto[server] installed?)") from None
            time.sleep(0.2)
    import boto3

    boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)
    return proc, env


def first_token_seconds(url: str, model: str) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 1,
        "stream": True,
    }
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {r.read().decode(errors='replace')}")
        for line in r.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content") or choices[0].get("finish_reason"):
                return time.perf_counter() - start
    raise RuntimeError(f"{model}: the stream ended without a token")


def wait_listed(url: str, names: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
        if names <= listed:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the server did not list {sorted(names)} within {timeout:.0f} s")


def pull_histogram(url: str) -> dict[str, float]:
    """The server's own timing of its pulls (`loraswap_registry_pull_seconds`): count and mean."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "loraswap_registry_pull_seconds":
            values = {s.name: s.value for s in family.samples if not s.labels.get("le")}
            count = values.get("loraswap_registry_pull_seconds_count", 0.0)
            total = values.get("loraswap_registry_pull_seconds_sum", 0.0)
            return {"n": count, "mean_ms": round(1e3 * total / count, 1) if count else 0.0}
    return {"n": 0, "mean_ms": 0.0}


def summary(xs: list[float]) -> dict[str, float]:
    p95 = quantiles(xs, n=20, method="inclusive")[-1] if len(xs) > 1 else xs[0]
    return {"p50_ms": round(1e3 * median(xs), 1), "p95_ms": round(1e3 * p95, 1), "n": len(xs)}


def run(rounds: int, base: str, quant: str) -> dict[str, Any]:
    from loraswap.adapters.archive import prepare_folder
    from loraswap.adapters.base import resolve_base
    from loraswap.adapters.registry import Registry, publish
    from loraswap.adapters.store import AdapterStore
    from loraswap.bench.synth import synth_lora

    ref = resolve_base(base)
    s3, s3_env = start_s3()
    times: dict[str, list[float]] = {"registry": [], "local": [], "pull_alone": []}
    try:
        with tempfile.TemporaryDirectory(prefix="loraswap-pull-") as tmp:
            work = Path(tmp)
            registry_uri = f"s3://{BUCKET}/bench"
            env = {
                **s3_env,
                "LORASWAP_REGISTRY": registry_uri,
                "LORASWAP_REGISTRY_CACHE_DIR": str(work / "cache"),
                "LORASWAP_REGISTRY_POLL_SECONDS": "0.5",
                "LORASWAP_MAX_LOADED_ADAPTERS": str(2 * rounds + 4),
            }
            with (work / "server.log").open("wb") as log:
                proc, url = launch_with_log(base, work / "store", quant, 4, env, log)
            try:
                registry = Registry(registry_uri)
                store = AdapterStore(work / "store", shipped_dir=None)
                first_token_seconds(url, "base")  # warm the kernels and the prompt cache
                for i in range(rounds):
                    reg_name, loc_name = f"pulled-{i:03d}", f"local-{i:03d}"
                    reg_src = synth_lora(ref, work / "src" / reg_name, seed=2 * i + 1)
                    loc_src = synth_lora(ref, work / "src" / loc_name, seed=2 * i + 2)
                    publish(registry, reg_src, reg_name, ref, max_rank=64)
                    staged = store.stage(loc_name)
                    prepare_folder(loc_src, loc_name, staged, ref)
                    store.add(staged, loc_name)
                    wait_listed(url, {reg_name, loc_name})
                    order = [("registry", reg_name), ("local", loc_name)]
                    for kind, name in order if i % 2 == 0 else order[::-1]:
                        times[kind].append(first_token_seconds(url, name))
                    print(
                        f"round {i + 1}/{rounds}: registry {1e3 * times['registry'][-1]:.0f} ms, "
                        f"local {1e3 * times['local'][-1]:.0f} ms",
                        file=sys.stderr,
                    )
                in_server = pull_histogram(url)
            finally:
                stop(proc)
            from loraswap.adapters.replica import Replica

            replica = Replica(registry, work / "pull-alone", lambda: ref, 64, max_bytes=1 << 40)
            replica.sync()
            for i in range(rounds):
                start = time.perf_counter()
                replica.ensure(f"pulled-{i:03d}")
                times["pull_alone"].append(time.perf_counter() - start)
    finally:
        os.killpg(s3.pid, signal.SIGKILL)
        s3.wait(timeout=30)
    reg, loc = summary(times["registry"]), summary(times["local"])
    paired = [a - b for a, b in zip(times["registry"], times["local"], strict=True)]
    return {
        "base": ref.base_id,
        "quant": quant,
        "rounds": rounds,
        "registry_cold_first_token": reg,
        "local_cold_first_token": loc,
        "registry_minus_local_p50_ms": round(reg["p50_ms"] - loc["p50_ms"], 1),
        "paired_difference_p50_ms": round(1e3 * median(paired), 1),
        "pull_alone": summary(times["pull_alone"]),
        "pull_in_server": in_server,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="adapters of each kind timed")
    ap.add_argument("--base", default="embedded")
    ap.add_argument("--quant", default="nf4")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.rounds, args.base, args.quant), indent=2))


if __name__ == "__main__":
    main()
