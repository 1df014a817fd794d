"""What Ray Serve adds to a request: the same calls timed against a direct `loraswap serve` and against
`loraswap serve --ray` (a local Ray cluster, Serve's HTTP proxy, loraswap's proxy deployment, a replica forwarding to
its own server) in one run, interleaved; then, optionally, `loraswap bench --quick --url` against the Ray deployment.

    python -m loraswap.bench.ray_proxy [--rounds 200] [--replicas 2] [--base embedded] [--quant nf4] [--quick-bench DIR]

Both run on the same base and store (the shipped adapters). Each round times, for each deployment in a rotated
order, `GET /health` (the trivial call: what the path itself costs) and a chat completion of one token for the
shipped `symptoms` adapter (the path plus the engine's shortest answer). Reported: p50 and p95 of each, and the
Ray deployment's p50 minus the direct server's. Needs Ray Serve (`pip install 'loraswap[ray]'`).
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
from statistics import quantiles
from typing import Any

import httpx

from loraswap.bench.launch import free_port, launch_with_log, stop

QUESTION = "What are the symptoms of glaucoma ?"


def start_ray(args: argparse.Namespace, log: Path, ray_tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    """`loraswap serve --ray` in its own process group; returns it and its URL once both replicas report."""
    port = free_port()
    cmd = [sys.executable, "-m", "loraswap.main", "serve", "--ray", "--replicas", str(args.replicas)]
    cmd += [
        "--replica-cpus",
        str(2 / args.replicas / 2),
        "--base",
        args.base,
        "--quant",
        args.quant,
        "--port",
        str(port),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, "RAY_TMPDIR": ray_tmp, "LORASWAP_ADAPTERS_DIR": str(log.parent / "store")},
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1200
    while b"serving on" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"serve --ray did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(1)
    return proc, url


def timed(client: httpx.Client, method: str, url: str, body: dict[str, Any] | None = None) -> float:
    start = time.perf_counter()
    r = client.request(method, url, json=body)
    elapsed = 1000 * (time.perf_counter() - start)
    if r.status_code != 200:
        raise RuntimeError(f"{method} {url}: {r.status_code} {r.text[:200]}")
    return elapsed


def summary(ms: list[float]) -> dict[str, float]:
    q = quantiles(ms, n=20)
    return {"p50_ms": round(q[9], 2), "p95_ms": round(q[18], 2), "n": len(ms)}


def measure(direct: str, ray: str, rounds: int) -> dict[str, Any]:
    chat = {"model": "symptoms", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1}
    times: dict[str, dict[str, list[float]]] = {n: {"health": [], "chat": []} for n in ("direct", "ray")}
    urls = {"direct": direct, "ray": ray}
    with httpx.Client(timeout=300) as client:
        for name in urls:  # warm-up: the adapter loaded, connections open
            for _ in range(3):
                timed(client, "POST", f"{urls[name]}/v1/chat/completions", chat)
        for i in range(rounds):
            for name in ["direct", "ray"] if i % 2 == 0 else ["ray", "direct"]:
                times[name]["health"].append(timed(client, "GET", f"{urls[name]}/health"))
                times[name]["chat"].append(timed(client, "POST", f"{urls[name]}/v1/chat/completions", chat))
    out: dict[str, Any] = {n: {k: summary(v) for k, v in t.items()} for n, t in times.items()}
    out["added_p50_ms"] = {
        k: round(out["ray"][k]["p50_ms"] - out["direct"][k]["p50_ms"], 2) for k in ("health", "chat")
    }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--base", default="embedded")
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--quick-bench", type=Path, help="Also run `loraswap bench --quick --url` on the Ray deployment.")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="loraswap-ray-bench-"))
    ray_tmp = tempfile.mkdtemp(prefix="lsray-", dir="/tmp")  # Ray's socket paths must stay short
    direct = ray = None
    try:
        with (work / "direct.log").open("wb") as log:
            direct, direct_url = launch_with_log(args.base, work / "store", args.quant, 16, {}, log)
        ray, ray_url = start_ray(args, work / "ray.log", ray_tmp)
        result = {"rounds": args.rounds, "replicas": args.replicas, **measure(direct_url, ray_url, args.rounds)}
        print(json.dumps(result), file=sys.stderr, flush=True)  # the overhead, before the longer quick bench
        stop(direct)
        direct = None
        if args.quick_bench is not None:
            cmd = [sys.executable, "-m", "loraswap.main", "bench", "--quick", "--url", ray_url, "--json"]
            done = subprocess.run([*cmd, "--out", str(args.quick_bench)], capture_output=True, text=True, check=True)
            quick = json.loads(done.stdout)
            result["quick_bench"] = {
                n: {"errors": s["errors"], "requests": s["requests"]} for n, s in quick["scenarios"].items()
            }
        print(json.dumps(result, indent=2))
    finally:
        if direct is not None:
            stop(direct)
        if ray is not None and ray.poll() is None:
            os.killpg(ray.pid, signal.SIGTERM)
            try:
                ray.wait(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(ray.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
