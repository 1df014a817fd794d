"""llama.cpp's own server (`llama-server`), the CPU peer the bench measures loraswap against.

`make llama-server` builds it once per machine from the llama.cpp that llama-cpp-python's source distribution
vendors (the same code the `reference` extra compiles), for this CPU (`-march=native`: the peer's best case), into
`.cache/llama-server/` beside a note of the CPU flags it was built for. `locate` finds that binary (or the one
given with `--llama-server` / `LORASWAP_LLAMA_SERVER`) and says why not, with how to build it, where there is none
that runs here.

`Peer` starts it on the base's GGUF with every adapter exported to GGUF (`loraswap export --format gguf`), loaded
at start with scale 0 (`--lora-scaled FILE:0`, `--lora-init-without-apply`); each request picks its adapter with
the `lora` field, so the server batches concurrent requests (`--parallel`, `--cont-batching`) only where their
LoRA configurations are the same. `Peer.wire` asks it the bench's questions through the same client code as
loraswap (`load.send`): the same prompt tokens, greedy, exactly `max_tokens` tokens (`n_predict` with
`ignore_eos`), streamed from `/completion`. `python -m loraswap.bench.llamaserver` measures it alone: one wave
of base requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import httpx

from loraswap.bench.launch import free_port, log_tail, stop, wait_healthy
from loraswap.bench.load import Job, Wire

if TYPE_CHECKING:
    from loraswap.bench.scenarios import Bench

CACHE = Path(".cache") / "llama-server"
"""Where `make llama-server` puts `bin/llama-server` and `cpu-flags`, under the repository."""
BUILD_HINT = "build it once with `make llama-server` (about 13 CPU-minutes; it needs cmake and a C++ compiler)"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The instruction-set flags of the first CPU in a /proc/cpuinfo text (empty where it has none)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _candidates() -> list[Path]:
    repo = Path(__file__).resolve().parents[1]
    return [Path.cwd() / CACHE, repo / CACHE]


def locate(explicit: str | None = None) -> tuple[Path | None, str]:
    """(the llama-server binary, "") where one runs here, else (None, why not and how to build it). `explicit`: a
    binary to use instead of the built one (it must exist; its CPU is the caller's business)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            return None, f"llama-server {explicit!r} is not an executable file"
        return path, ""
    here = cpu_flags(Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").is_file() else set()
    for folder in _candidates():
        binary = folder / "bin" / "llama-server"
        if not binary.is_file():
            continue
        built = cpu_flags((folder / "cpu-flags").read_text()) if (folder / "cpu-flags").is_file() else set()
        lacking = sorted(built - here)
        if lacking:
            return None, (
                f"{binary} was built for another CPU (this one lacks {', '.join(lacking[:6])}); rebuild it: "
                + BUILD_HINT
            )
        return binary, ""
    return None, f"llama-server is not built; {BUILD_HINT}"


def export_ggufs(ref: Any, folders: dict[str, Path], out: Path) -> dict[str, Path]:
    """Each adapter folder as a llama.cpp LoRA GGUF under `out` (what `loraswap export --format gguf` writes); a
    bare PEFT folder (the bench's synthetic adapters) gets the manifest an upload would give it first."""
    from loraswap.adapters.archive import prepare_folder
    from loraswap.adapters.export import export_adapter
    from loraswap.adapters.manifest import MANIFEST_FILE

    files = {}
    for name, folder in folders.items():
        if not (folder / MANIFEST_FILE).is_file():
            described = out / "described" / name
            described.mkdir(parents=True)
            prepare_folder(folder, name, described, ref)
            folder = described
        result = export_adapter(folder, ref, "gguf", out / name, progress=False)
        files[name] = result.out / result.info["gguf"]["file"]
    return files


def completion_wire(prompts: Callable[[str], list[int]], lora_ids: dict[str, int]) -> Wire:
    """Requests to llama-server's `/completion`: the question's prompt tokens, the job's adapter as the `lora`
    list (empty for "base": every adapter at its start scale, 0), greedy, exactly `max_tokens` tokens."""

    def body(job: Job) -> dict[str, Any]:
        if job.adapter != "base" and job.adapter not in lora_ids:
            raise KeyError(f"adapter {job.adapter!r} is not loaded in llama-server; loaded: {', '.join(lora_ids)}")
        lora = [] if job.adapter == "base" else [{"id": lora_ids[job.adapter], "scale": 1.0}]
        return {
            "prompt": prompts(job.question),
            "n_predict": job.max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "cache_prompt": True,
            "lora": lora,
        }

    def tokens(event: dict[str, Any]) -> int | None:
        return int(event["tokens_predicted"]) if event.get("stop") else None

    return Wire("/completion", body, lambda event: bool(event.get("content")), tokens)


class Peer:
    """llama-server on `gguf` with `adapters` (name -> LoRA GGUF) loaded at scale 0, `threads` threads and
    `parallel` slots, on a free port of 127.0.0.1; a context manager that stops it on leaving."""

    def __init__(
        self,
        binary: Path,
        gguf: Path,
        adapters: dict[str, Path],
        threads: int,
        parallel: int,
        ctx_per_slot: int,
        log: IO[bytes],
    ) -> None:
        self.binary, self.gguf, self.adapters = binary, gguf, adapters
        self.threads, self.parallel, self.ctx_per_slot, self.log = threads, parallel, ctx_per_slot, log
        self.lora_ids = {name: i for i, name in enumerate(adapters)}
        """Adapter name -> its index in llama-server's `--lora` list (the id of a request's `lora` entry)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def command(self, port: int) -> list[str]:
        cmd = [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--threads", str(self.threads), "--threads-batch", str(self.threads)]
        cmd += [
            "--parallel",
            str(self.parallel),
            "--cont-batching",
            "--ctx-size",
            str(self.parallel * self.ctx_per_slot),
        ]
        cmd += ["--no-webui"]
        if self.adapters:
            # `--lora` alone records scale 1 as each adapter's default, which a request without a `lora` list (the
            # base's) gets; `--lora-init-without-apply` only skips applying it at start. Scale 0 is asked for here.
            # One comma-separated list: the option given again is deprecated ("only last value will be used", though
            # this version still loads them all).
            cmd += ["--lora-init-without-apply", "--lora-scaled", ",".join(f"{p}:0" for p in self.adapters.values())]
        return cmd

    def __enter__(self) -> Peer:
        port = free_port()
        self.proc = subprocess.Popen(
            self.command(port), stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_healthy(self.proc, self.url, 300, "llama-server")
            except RuntimeError as e:
                tail = log_tail(self.log) if hasattr(self.log, "name") else ""
                raise RuntimeError(f"{e}; its last output:\n{tail}") from None
            self._check_adapters()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _check_adapters(self) -> None:
        """Every adapter loaded, in the order given, at scale 0."""
        listed = httpx.get(f"{self.url}/lora-adapters", timeout=30).json()
        if len(listed) != len(self.adapters) or any(a.get("scale", 0) != 0 for a in listed):
            raise RuntimeError(f"llama-server holds {len(listed)} adapters, not the {len(self.adapters)} asked at 0")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def wire(self, prompts: Callable[[str], list[int]]) -> Wire:
        return completion_wire(prompts, self.lora_ids)


def prompt_tokens(tokenizer: Any, questions: Sequence[str]) -> Callable[[str], list[int]]:
    """The prompt token ids loraswap's /v1/answer builds for each question (its chat template and system prompt)."""
    from loraswap.adapters.prompt import prompt_ids

    table = {q: prompt_ids(tokenizer, q) for q in questions}

    def lookup(question: str) -> list[int]:
        if question not in table:
            table[question] = prompt_ids(tokenizer, question)
        return table[question]

    return lookup


def start_peer(b: Bench, stack: contextlib.ExitStack) -> None:
    """llama-server beside loraswap for the peer scenarios: the base's GGUF, the mixed scenarios' adapters exported
    to GGUF, as many threads as the machine has cores (as loraswap's worker), a slot per client; warmed up with one
    batch on the base. Sets `b.peer_url` and `b.peer_wire`, or says why the peer scenarios do not run."""
    from loraswap.adapters.base import load_tokenizer
    from loraswap.bench.load import QUESTIONS, closed_loop
    from loraswap.bench.scenarios import gguf_of
    from loraswap.bench.session import say

    cfg = b.cfg
    binary, why = locate(cfg.llama_server)
    gguf = gguf_of(cfg.base)
    if binary is not None and gguf is None:
        why = f"the base {cfg.base!r} has no GGUF file"
    if binary is None or gguf is None:
        say(f"skipping the llama-server scenarios: {why}")
        b.out.peer = {"skipped": why}
        return
    say(f"exporting {len(b.names)} adapters to GGUF for llama-server")
    files = export_ggufs(b.session.ref, {n: b.folders[n] for n in b.names}, b.session.work / "gguf")
    prompts = prompt_tokens(load_tokenizer(b.session.ref), QUESTIONS)
    longest = max(len(prompts(q)) for q in QUESTIONS)
    ctx_per_slot = 64 * -(-(longest + max(cfg.max_tokens, cfg.long_tokens) + 16) // 64)
    threads, parallel = os.cpu_count() or 1, max(cfg.clients, cfg.max_batch_size)
    log: IO[bytes] = stack.enter_context(open(b.session.work / "llama-server.log", "wb"))  # noqa: SIM115
    say(f"starting llama-server on {gguf.name}: {threads} threads, {parallel} slots, {len(files)} adapters at scale 0")
    peer = stack.enter_context(Peer(binary, gguf, files, threads, parallel, ctx_per_slot, log))
    b.peer_url, b.peer_wire = peer.url, peer.wire(prompts)
    warm = asyncio.run(
        closed_loop(peer.url, [Job("base", q, 2) for q in QUESTIONS[: cfg.clients]], cfg.clients, None, b.peer_wire)
    )
    failed = [r.error for r in warm.results if r.error]
    if failed:
        raise RuntimeError(f"llama-server warm-up requests failed: {failed[0]}")
    b.out.peer = {
        "binary": str(binary.relative_to(Path.cwd()) if binary.is_relative_to(Path.cwd()) else binary),
        "version": version(binary),
        "gguf": gguf.name,
        "threads": threads,
        "parallel": parallel,
        "ctx_per_slot": ctx_per_slot,
        "adapters": len(files),
    }


def version(binary: Path) -> str:
    """What `llama-server --version` says of its build (its last line)."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return " / ".join(line.strip() for line in lines[-2:])


def probe(threads: int, clients: int, tokens: int) -> dict[str, Any]:
    """llama-server alone on the embedded base: one wave of `clients` base requests of `tokens` tokens (after a
    warm-up wave), as the bench sends them; its summary (`load.summarize`)."""
    import tempfile

    from loraswap.adapters.base import embedded_gguf_path, load_tokenizer, resolve_base
    from loraswap.bench.load import QUESTIONS, closed_loop, jobs, summarize

    binary, why = locate()
    if binary is None:
        raise SystemExit(why)
    prompts = prompt_tokens(load_tokenizer(resolve_base("embedded")), QUESTIONS)
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "log", "wb"))
        peer = stack.enter_context(Peer(binary, embedded_gguf_path(), {}, threads, clients, 256, log))
        wire = peer.wire(prompts)
        asyncio.run(closed_loop(peer.url, jobs(["base"], clients, 2, 1), clients, None, wire))
        run = asyncio.run(closed_loop(peer.url, jobs(["base"], clients, tokens, 5), clients, None, wire))
    return summarize([run])


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="llama-server alone: one wave of base requests, as the bench sends")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(probe(args.threads, args.clients, args.tokens)))
