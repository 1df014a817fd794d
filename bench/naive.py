"""Baselines a user would otherwise run, in this process: PEFT's plain recipe, and llama.cpp.

- naive: one PeftModel holding the adapters; each request in turn does `set_adapter(name)` and
  `generate()`, one request at a time (PEFT's documented way to serve several adapters).
- llama.cpp: the base's GGUF through llama-cpp-python, single stream, when that package is installed
  (`pip install loraswap[reference]`; it compiles llama.cpp).

Both run while the server is idle, on the same questions and token counts as the HTTP scenarios.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loraswap.bench.load import Job, Result


class Naive:
    """PEFT's plain multi-adapter recipe over the base `base` and adapters {name: folder}."""

    def __init__(self, base: str, quant: str, adapters: dict[str, Path], double_quant: bool = True) -> None:
        from peft import PeftModel

        from loraswap.adapters.base import load_base

        loaded = load_base(base, quant=quant, double_quant=double_quant)  # type: ignore[arg-type]
        self.tokenizer = loaded.tokenizer
        first, *rest = adapters.items()
        self.model: Any = PeftModel.from_pretrained(loaded.model, str(first[1]), adapter_name=first[0])
        for name, path in rest:
            self.model.load_adapter(str(path), adapter_name=name)
        self.model.eval()

    def run(self, work: Sequence[Job]) -> tuple[list[Result], float]:
        """Serve `work` one request at a time; (results, wall seconds)."""
        import torch

        from loraswap.adapters.prompt import prompt_ids

        results = []
        start = time.perf_counter()
        for job in work:
            res = Result(job, time.perf_counter())
            self.model.set_adapter(job.adapter)
            ids = torch.tensor([prompt_ids(self.tokenizer, job.question)], device=self.model.device)
            first: list[float] = []
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=job.max_tokens,
                    min_new_tokens=job.max_tokens,  # as the server's ignore_eos: the same work
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    streamer=_FirstToken(first),
                )
            res.latency = time.perf_counter() - res.start
            res.ttft = first[0] - res.start if first else None
            res.tokens = int(out.shape[1] - ids.shape[1])
            results.append(res)
        return results, time.perf_counter() - start


class _FirstToken:
    """A `generate` streamer that notes when the first generated token arrives."""

    def __init__(self, sink: list[float]) -> None:
        self.sink = sink
        self.calls = 0

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.sink.append(time.perf_counter())

    def end(self) -> None:
        pass


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    """The base GGUF through llama.cpp, single stream, with the same chat prompt as the server's."""

    def __init__(self, gguf: Path, threads: int, render: Callable[[str], str]) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
        self.render = render
        self.eos = self.llm.token_eos()

    def run(self, work: Sequence[Job]) -> tuple[list[Result], float]:
        results = []
        start = time.perf_counter()
        for job in work:
            res = Result(job, time.perf_counter())
            out: Any = self.llm.create_completion(
                self.render(job.question),
                max_tokens=job.max_tokens,
                temperature=0.0,
                logit_bias={self.eos: -1e9},  # as ignore_eos: exactly max_tokens tokens
            )
            res.tokens = int(out["usage"]["completion_tokens"])
            res.latency = time.perf_counter() - res.start
            results.append(res)
        return results, time.perf_counter() - start
