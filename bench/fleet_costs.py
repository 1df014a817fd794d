"""What one replica's work costs, for the fleet simulation (`bench/fleet.py`): measured on loraswap's engine.

A replica is one `loraswap serve` worker: its engine's continuous batching (`server/worker/engine.py`), its LoRA
slots (`server/worker/residency.py`, bounded by `LORASWAP_MAX_LOADED_ADAPTERS` and `LORASWAP_MAX_LOADED_BYTES`) and
the registry's local cache on disk (`LORASWAP_REGISTRY_CACHE_BYTES`). Its costs:

- `decode_ms[b]`: one decoding step over b running rows (each of its own adapter), per batch size measured;
- `prefill_ms[k]`: the prefill of k prompts joining in one step (the first token of each), whole prompts;
  `prefill_warm_ms[k]` the same where every prompt's adapter has its system turn in the worker's prefix cache
  (`server/worker/prefix.py`; an adapter's blocks go when it is evicted), as for an adapter the replica serves;
- `load_ms`: an adapter's cold load into a slot (safetensors read, weights written into the slots);
- `pull_ms`: an adapter's pull from the registry into the local cache (measured by `loraswap.bench.pull`
  as the server times it, `loraswap_registry_pull_seconds`; not re-measured here, since it needs the S3
  emulator);
- `prompt_tokens`: the prompt length the prefills were measured with.

`measure()` times them on the engine in this process (the embedded base, synthetic rank-8 adapters, as
`python -m loraswap.bench.steps` does); `fleet_costs.json` beside this file holds a measured set and the command
that produced it.
"""

from __future__ import annotations

import bisect
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

COSTS_JSON = Path(__file__).with_name("fleet_costs.json")
PULL_MS = 35.9
"""The registry pull, mean of 30 as the server timed it (`python -m loraswap.bench.pull --rounds 30`,
BENCHMARKS.md)."""


@dataclass(frozen=True)
class Costs:
    decode_ms: dict[int, float]
    """Decoding step time (ms) by running rows."""
    prefill_ms: dict[int, float]
    """Prefill time (ms) by prompts joining in one step, whole prompts (nothing in the prefix cache)."""
    load_ms: float
    """Cold load of an adapter into a LoRA slot (ms)."""
    prefill_warm_ms: dict[int, float] = field(default_factory=dict)
    """Prefill time (ms) by prompts when their adapters' system turn is in the prefix cache (empty: as cold)."""
    pull_ms: float = PULL_MS
    """Pull of an adapter from the registry into the replica's local cache (ms)."""
    adapter_bytes: int = 1_855_000
    """One adapter's files (bytes): with the byte bounds, how many fit in the slots and in the disk cache."""
    prompt_tokens: int = 40
    """Prompt length (tokens) the prefills were measured with."""
    source: dict[str, Any] = field(default_factory=dict)
    """How they were measured: the command, the machine, the date."""

    def __post_init__(self) -> None:
        if not self.prefill_warm_ms:
            object.__setattr__(self, "prefill_warm_ms", dict(self.prefill_ms))
        for name, table in (("decode_ms", self.decode_ms), ("prefill_ms", self.prefill_ms),
                            ("prefill_warm_ms", self.prefill_warm_ms)):  # fmt: skip
            if not table or min(table) < 1 or min(table.values()) <= 0:
                raise ValueError(f"{name} needs positive times at batch sizes >= 1, got {table}")
        if self.load_ms < 0 or self.pull_ms < 0 or self.adapter_bytes < 1:
            raise ValueError(f"load_ms ({self.load_ms}), pull_ms ({self.pull_ms}) must be >= 0, adapter_bytes > 0")

    def decode(self, rows: int) -> float:
        """Seconds of a decoding step over `rows` rows (linear between the measured sizes, beyond the largest)."""
        return _interpolate(self.decode_ms, rows) / 1000

    def prefill(self, rows: int, warm: bool = False) -> float:
        """Seconds of a prefill of `rows` prompts joining together (`warm`: every adapter's system turn cached)."""
        return _interpolate(self.prefill_warm_ms if warm else self.prefill_ms, rows) / 1000

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["decode_ms"] = {str(k): v for k, v in sorted(self.decode_ms.items())}
        out["prefill_ms"] = {str(k): v for k, v in sorted(self.prefill_ms.items())}
        out["prefill_warm_ms"] = {str(k): v for k, v in sorted(self.prefill_warm_ms.items())}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Costs:
        try:
            return cls(
                decode_ms={int(k): float(v) for k, v in data["decode_ms"].items()},
                prefill_ms={int(k): float(v) for k, v in data["prefill_ms"].items()},
                prefill_warm_ms={int(k): float(v) for k, v in data.get("prefill_warm_ms", {}).items()},
                load_ms=float(data["load_ms"]),
                pull_ms=float(data.get("pull_ms", PULL_MS)),
                adapter_bytes=int(data.get("adapter_bytes", 1_855_000)),
                prompt_tokens=int(data.get("prompt_tokens", 40)),
                source=dict(data.get("source", {})),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a costs file: missing or malformed {e}") from e

    @classmethod
    def load(cls, path: Path = COSTS_JSON) -> Costs:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read costs from {path}: {e}") from e

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def machine() -> str:
    """The CPU and the torch build the costs were measured on."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {gpu}"


def _interpolate(table: dict[int, float], rows: int) -> float:
    if rows <= 0:
        return 0.0
    sizes = sorted(table)
    if rows <= sizes[0]:
        return table[sizes[0]] * rows / sizes[0] if rows < sizes[0] else table[sizes[0]]
    if rows >= sizes[-1]:
        if len(sizes) == 1:
            return table[sizes[-1]] * rows / sizes[-1]
        lo, hi = sizes[-2], sizes[-1]  # extrapolate on the last segment's slope
    else:
        i = bisect.bisect_left(sizes, rows)
        if sizes[i] == rows:
            return table[rows]
        lo, hi = sizes[i - 1], sizes[i]
    slope = (table[hi] - table[lo]) / (hi - lo)
    return table[lo] + slope * (rows - lo)


def measure(batches: tuple[int, ...] = (1, 2, 4, 8, 16), steps: int = 12, reps: int = 3, loads: int = 24,
            threads: int = 1, base: str = "embedded", progress: bool = True) -> Costs:  # fmt: skip
    """Time the engine here: the base in NF4 with the fast paths (as `serve` runs them), `max(batches)` synthetic
    rank-8 adapters in a temporary store, every row of its own adapter, all loaded before any timing. For each
    batch size b, `reps` times: b prompts submitted together; their first step is the prefill and a decoding
    step, then `steps` decoding steps; a prefill is a first step less the decoding step. Every prompt is new (a
    fleet's prompts differ): prefills are timed with the adapters' system-turn blocks dropped from the prefix
    cache (as after a cold load), then kept (an adapter the replica has been serving). Cold loads: `loads`
    adapters loaded into full slots one at a time, each evicting the least recently used
    (`Residency.ensure_loaded`).

    With one compute thread (the default) every time is the process's CPU time, which other work on the machine
    does not inflate, and the median is kept: the replica modelled is a worker on one core. With more threads
    they are wall-clock times and the fastest is kept (the one other work slowed least), the medians going to
    `source`."""
    import logging

    import torch

    from loraswap.adapters.archive import install_archive
    from loraswap.adapters.base import load_base, resolve_base
    from loraswap.adapters.prompt import prompt_ids
    from loraswap.adapters.store import AdapterStore
    from loraswap.bench.load import QUESTIONS
    from loraswap.bench.synth import archive, synth_lora
    from loraswap.server.jobs import Job
    from loraswap.server.worker import fastpath
    from loraswap.server.worker.engine import Engine

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    pick = statistics.median if threads == 1 else min

    def say(line: str) -> None:
        if progress:
            print(line, file=sys.stderr)

    ref = resolve_base(base)
    width = max(batches)
    slots = max(2, width)
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        names = [f"a{i:03d}" for i in range(width + slots + loads)]
        say(f"measure: {len(names)} synthetic adapters")
        for i, name in enumerate(names):
            folder = synth_lora(ref, Path(tmp) / "synth" / name, seed=i + 1)
            install_archive(archive(folder), name, store_dir, ref)
        store = AdapterStore(store_dir, shipped_dir=None)
        size = store.get(names[0]).size_bytes
        b = load_base(ref, quant="nf4")
        say(f"measure: {fastpath.describe(fastpath.apply(b.model, 'auto', rows=width))}")
        engine = Engine(b.model, b.tokenizer, store.get, max_batch_size=width, max_loaded=slots,
                        max_prefill_tokens=1 << 20)  # fmt: skip
        assert engine.prompt_cache is not None
        keys = [engine.residency.ensure_loaded(name)[0] for name in names[:width]]
        decode: dict[int, float] = {}
        prefill: dict[int, float] = {}
        warm: dict[int, float] = {}
        medians: dict[str, dict[int, float]] = {"decode_ms": {}, "prefill_ms": {}, "prefill_warm_ms": {}}
        run, lengths = 0, []

        def rep(rows: int, cold: bool) -> tuple[float, list[float]]:
            nonlocal run
            run += 1
            if cold:  # the adapters' prompt blocks gone, as after a cold load
                for key in keys[:rows]:
                    engine.prompt_cache.drop(key)  # type: ignore[union-attr]
            for i in range(rows):  # a prompt never sent before: only the system turn can be cached
                ids = prompt_ids(b.tokenizer, f"Case {run}-{i}. {QUESTIONS[(run + i) % len(QUESTIONS)]}")
                lengths.append(len(ids))
                engine.submit(Job(f"m{run}-{i}", ids, names[i], max_tokens=steps + 2, ignore_eos=True))
            start = clock()
            engine.step()
            first = 1000 * (clock() - start)
            times = []
            while engine.has_work():
                start = clock()
                engine.step()
                times.append(1000 * (clock() - start))
            return first, times

        for rows in batches:
            if not decode:  # warm-up: kernels at every width, every adapter's system turn cached
                rep(width, cold=False)
            cold = [rep(rows, cold=True) for _ in range(reps)]
            hot = [rep(rows, cold=False) for _ in range(reps)]
            times = [t for _, ts in cold + hot for t in ts]
            decode[rows] = pick(times)
            prefill[rows] = max(0.01, pick([f for f, _ in cold]) - decode[rows])
            warm[rows] = max(0.01, pick([f for f, _ in hot]) - decode[rows])
            medians["decode_ms"][rows] = statistics.median(times)
            medians["prefill_ms"][rows] = statistics.median(f for f, _ in cold) - statistics.median(times)
            medians["prefill_warm_ms"][rows] = statistics.median(f for f, _ in hot) - statistics.median(times)
            say(f"measure: batch {rows}: decoding step {decode[rows]:.1f} ms, prefill {prefill[rows]:.1f} ms cold, "
                f"{warm[rows]:.1f} ms with the system turn cached")  # fmt: skip
        load_times = []
        for name in names[width:]:  # fills the slots, then every load evicts one
            full = len(engine.residency.lru) >= slots
            start = clock()
            engine.residency.ensure_loaded(name)
            if full:
                load_times.append(1000 * (clock() - start))
        load = pick(load_times)
        say(f"measure: cold load into a slot {load:.2f} ms")
        tokens = int(statistics.median(lengths))
    source: dict[str, Any] = {
        "threads": threads,
        "timing": "CPU time, median" if threads == 1 else "wall clock, fastest",
    }
    if threads > 1:
        medians["load_ms"] = {1: statistics.median(load_times)}
        source["medians"] = {k: {str(n): round(v, 2) for n, v in t.items()} for k, t in medians.items()}
    return Costs(decode_ms=decode, prefill_ms=prefill, prefill_warm_ms=warm, load_ms=load, adapter_bytes=size,
                 prompt_tokens=tokens, source=source)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """`python -m loraswap.bench.fleet_costs [--out FILE]`: measure the costs and write them (the committed set)."""
    import argparse

    ap = argparse.ArgumentParser(description="Measure a replica's costs on the engine for the fleet simulation.")
    ap.add_argument("--out", type=Path, default=COSTS_JSON, help="where to write them (JSON)")
    ap.add_argument("--steps", type=int, default=12, help="decoding steps timed per batch size, each repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per batch size")
    ap.add_argument("--threads", type=int, default=1, help="compute threads (1: CPU times; more: wall clock)")
    args = ap.parse_args(argv)
    costs = measure(steps=args.steps, reps=args.reps, threads=args.threads)
    command = " ".join(["python -m loraswap.bench.fleet_costs", *(sys.argv[1:] if argv is None else argv)])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    costs = replace(costs, source={"command": command, "measured": when, "machine": machine(), **costs.source})
    costs.save(args.out)
    print(json.dumps(costs.to_json(), indent=2))


if __name__ == "__main__":
    main()
