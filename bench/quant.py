"""The quantization choices side by side on one base: memory, decoding speed, and an adapter's quality.

    python -m loraswap.bench.quant --data ../shared/data/medquad/medquad.csv.gz [--out docs/quant]

For each choice (NF4 with and without double quantization, FP4, LLM.int8, dense) a fresh process loads the
base and measures, in this order:
- memory: the bytes of the model's tensors (weights, with bitsandbytes' quantization constants: 4-bit blocks'
  scales, their second-level scales under double quantization, int8 row scales), and the process's resident
  memory (RSS, Linux) after the load, once freed loader buffers are handed back to the system (`malloc_trim`):
  in all, its growth over the process before the load (torch and the libraries already imported), the
  anonymous part of that growth (memory the process allocated), and the file-backed pages (the base's
  safetensors file as the loader mapped it: page cache the kernel can reclaim); and the RSS again after the
  warm-up answer (serving), when every weight has been read (a dense load maps the file lazily, so right
  after loading little of it is resident yet);
- decoding speed: generated tokens/s of one stream, greedy, through the server's engine (with its CPU fast
  paths, `server/worker/fastpath.py`) with the adapter in its slot: the same questions, each answered with exactly
  `--tokens` tokens (end-of-turn ignored), after one warm-up answer;
- quality: the adapter's held-out answer NLL (per answer token, as `loraswap eval` scores it) on the first
  `--questions` held-out questions of its qtype, the split its training used.
A fresh process per choice keeps one load's memory out of the next's figures. Results go to OUT/quant.json
and OUT/quant.png (one bar chart per measure).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

# (label, quant, double quantization)
CHOICES: tuple[tuple[str, str, bool], ...] = (
    ("nf4 + double quant", "nf4", True),
    ("nf4", "nf4", False),
    ("fp4 + double quant", "fp4", True),
    ("int8 (LLM.int8)", "int8", False),
    ("none (dense fp32)", "none", False),
)


def measure(args: argparse.Namespace, quant: str, double_quant: bool) -> dict[str, Any]:
    """One choice, in this process (run it in a fresh one: the memory figures assume nothing was loaded)."""
    import torch
    from peft import PeftModel

    from loraswap.adapters.base import load_base, resolve_base
    from loraswap.adapters.prompt import prompt_ids
    from loraswap.adapters.store import AdapterStore
    from loraswap.bench.load import QUESTIONS
    from loraswap.server.jobs import Job
    from loraswap.server.worker import fastpath
    from loraswap.server.worker.engine import Engine
    from loraswap.train.data import load_qa, split
    from loraswap.train.evaluate import answer_nll

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    ref = resolve_base(args.base)
    entry = AdapterStore.default(None).get(args.adapter)
    before = _settled_rss()
    base = load_base(ref, quant=quant, double_quant=double_quant)  # type: ignore[arg-type]
    loaded = _settled_rss()
    footprint = tensor_bytes(base.model)

    fastpath.apply(base.model, rows=1)  # as a server worker does, for one stream
    engine = Engine(base.model, base.tokenizer, AdapterStore.default(None).get, max_batch_size=1)
    questions = [QUESTIONS[i * 7 % len(QUESTIONS)] for i in range(args.prompts + 1)]
    seconds, tokens = 0.0, 0
    for i, q in enumerate(questions):  # the first is the warm-up (adapter load, first-call costs)
        req = Job(f"q{i}", prompt_ids(base.tokenizer, q), args.adapter, max_tokens=args.tokens, ignore_eos=True)
        start = time.perf_counter()
        engine.submit(req)
        done = 0
        while engine.has_work():
            done = max([done, *(e.completion_tokens for e in engine.step())])
        if i:
            seconds += time.perf_counter() - start
            tokens += done
        else:  # every weight has been read once: lazily mapped files are resident now
            serving = _settled_rss()
    del engine

    rows = load_qa(args.data)
    fraction = float(entry.manifest.training.get("heldout_fraction", 0.1))
    qtype = entry.manifest.qtype or args.adapter
    heldout = split(rows, qtype, fraction).heldout[: args.questions]
    max_len = int(entry.manifest.training.get("max_seq_len", 256))
    base = load_base(ref, quant=quant, double_quant=double_quant)  # type: ignore[arg-type]  # no slot layers
    model = PeftModel.from_pretrained(base.model, str(entry.path)).eval()
    with torch.no_grad():
        nll = answer_nll(model, base.tokenizer, heldout, max_len)
    return {
        "quant": quant,
        "double_quant": double_quant,
        "rss_after_load_mb": round(loaded["rss"] / 2**20, 1),
        "rss_load_growth_mb": round((loaded["rss"] - before["rss"]) / 2**20, 1),
        "anon_load_growth_mb": round((loaded["anon"] - before["anon"]) / 2**20, 1),
        "file_backed_after_load_mb": round(loaded["file"] / 2**20, 1),
        "rss_serving_mb": round(serving["rss"] / 2**20, 1),
        "rss_serving_growth_mb": round((serving["rss"] - before["rss"]) / 2**20, 1),
        "tensor_mb": round(footprint / 2**20, 1),
        "tokens_per_s": round(tokens / seconds, 2),
        "generated_tokens": tokens,
        "heldout_nll": round(nll, 4),
        "heldout_questions": len(heldout),
    }


def tensor_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, plus the quantization constants bitsandbytes keeps beside
    its packed weights (not counted by transformers' `get_memory_footprint`)."""
    import torch

    seen: set[int] = set()

    def size(t: Any) -> int:
        if not isinstance(t, torch.Tensor) or t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        total += size(t)
        state = getattr(t, "quant_state", None)  # Linear4bit: block scales, and their own under double quant
        if state is not None:
            total += size(state.absmax) + size(getattr(state, "offset", None))
            if getattr(state, "state2", None) is not None:
                total += size(state.state2.absmax)
        total += size(getattr(t, "SCB", None))  # Linear8bitLt: one scale per output row
    return total


def _settled_rss() -> dict[str, int]:
    """Resident memory in bytes after garbage collection and glibc's `malloc_trim` (freed heap pages back to the
    system): all of it (rss), anonymous memory (anon: what the process allocated) and file-backed pages
    (file: mapped files, such as safetensors weights the loader maps; shared with the page cache)."""
    import gc
    import re

    from loraswap.server.worker.memory import return_freed_memory

    gc.collect()
    return_freed_memory()
    status = Path("/proc/self/status").read_text()
    kib = {k: int(m[1]) for k in ("VmRSS", "RssAnon", "RssFile") if (m := re.search(rf"{k}:\s+(\d+)", status))}
    return {"rss": kib["VmRSS"] << 10, "anon": kib.get("RssAnon", 0) << 10, "file": kib.get("RssFile", 0) << 10}


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("tensor_mb", "model tensors (MiB)"),
        ("rss_serving_growth_mb", "RSS growth, loaded + 1 answer (MiB)"),
        ("tokens_per_s", "generated tokens/s, one stream"),
        ("heldout_nll", "adapter's held-out answer NLL"),
    ]
    labels = [r["label"] for r in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    for ax, (key, name) in zip(axes, panels, strict=True):
        values = [r[key] for r in results]
        bars = ax.barh(labels, values, color="#4c72b0")
        ax.bar_label(bars, fmt="%g", padding=2, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.invert_yaxis()
        ax.margins(x=0.2)
        if key == "heldout_nll":
            ax.set_xlim(min(values) * 0.95, max(values) * 1.03)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="embedded")
    ap.add_argument("--adapter", default="symptoms", help="a shipped (or stored) adapter of the base")
    ap.add_argument("--data", required=True, help="MedQuAD (csv, csv.gz, parquet, jsonl, or the hub id)")
    ap.add_argument("--questions", type=int, default=32, help="held-out questions scored")
    ap.add_argument("--prompts", type=int, default=4, help="questions answered for tokens/s (after a warm-up)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per answer")
    ap.add_argument("--out", type=Path, default=Path("docs/quant"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one choice, print JSON
    args = ap.parse_args(argv)
    if args.one:
        quant, double = args.one.split(":")
        print("RESULT " + json.dumps(measure(args, quant, double == "1")), flush=True)
        return
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--one")]
    results = []
    for label, quant, double in tqdm(CHOICES, desc="quantization choices"):
        cmd = [sys.executable, "-m", "loraswap.bench.quant", *passed, "--one", f"{quant}:{int(double)}"]
        run = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if run.returncode or line is None:
            sys.exit(f"{label}: the measuring process failed:\n{run.stderr[-3000:]}")
        results.append({"label": label, **json.loads(line.removeprefix("RESULT "))})
        tqdm.write(f"{label}: {results[-1]}")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m loraswap.bench.quant " + " ".join(passed)
    report = {"command": command, "cpu_count": os.cpu_count(), "results": results}
    (args.out / "quant.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "quant.png", f"base {args.base}, adapter {args.adapter}: one run, {os.cpu_count()} CPUs")
    print(f"wrote {args.out / 'quant.json'} and {args.out / 'quant.png'}")


if __name__ == "__main__":
    main()
