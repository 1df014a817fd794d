"""The serving fast paths (`server/worker/fastpath.py`): the direct 4-bit kernel is bit for bit bitsandbytes' own, the
bf16 LM head keeps the float32 head's greedy choice and top logits, and an engine on them matches PEFT."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import PARITY_QUESTIONS as QUESTIONS
from conftest import peft_reference, random_lora_adapter
from pydantic import ValidationError

from loraswap.adapters.base import load_base
from loraswap.adapters.prompt import prompt_ids
from loraswap.adapters.store import AdapterStore
from loraswap.server.jobs import Job, JobEvent
from loraswap.server.settings import Q4Kernel, Settings
from loraswap.server.worker import fastpath
from loraswap.server.worker.engine import Engine

needs_native_bf16 = pytest.mark.skipif(
    not fastpath.native_bf16_cpu(), reason="bitsandbytes' fused kernel needs a CPU with AVX512-BF16"
)


def prompts(tokenizer: object, n: int = 4) -> list[torch.Tensor]:
    return [torch.tensor([prompt_ids(tokenizer, q)]) for q in QUESTIONS[:n]]


@needs_native_bf16
def test_the_direct_4bit_kernel_gives_bitsandbytes_own_output_bit_for_bit(lively_base: Path) -> None:
    from bitsandbytes.nn import Linear4bit

    for quant in ("nf4", "fp4"):
        base = load_base(str(lively_base), quant=quant)  # type: ignore[arg-type]
        model = base.model
        with torch.inference_mode():
            before = [model(input_ids=ids).logits for ids in prompts(base.tokenizer)]
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert fastpath.lean_4bit(model) == (len(layers), "bitsandbytes") and layers
        assert all("forward" in m.__dict__ for m in layers)
        with torch.inference_mode():
            after = [model(input_ids=ids).logits for ids in prompts(base.tokenizer)]
        for a, b in zip(before, after, strict=True):
            assert torch.equal(a, b), quant


WAYS = ["bfloat16", pytest.param("loraswap", marks=needs_native_bf16)]  # the bf16 matmuls of the head


@pytest.mark.parametrize("way", WAYS)
def test_the_bf16_head_keeps_the_float32_greedy_choice_and_top_logits(way: str, lively_base: Path) -> None:
    base = load_base(str(lively_base), quant="none")
    model = base.model
    with torch.inference_mode():
        exact = torch.cat([model(input_ids=ids).logits[0] for ids in prompts(base.tokenizer)])
    assert fastpath.bf16_head(model, way=way)
    assert model.get_output_embeddings().loraswap_bf16 == way
    assert fastpath.bf16_head(model)  # a second call leaves the patched head as it is
    with torch.inference_mode():
        fast = torch.cat([model(input_ids=ids).logits[0] for ids in prompts(base.tokenizer)])
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # the bf16 pass did run: the tail's logits moved
    assert torch.equal(fast.argmax(-1), exact.argmax(-1))
    # The float32 head's best few are among the bf16 pass's top RESCORED, so they come back exact.
    top = exact.topk(fastpath.RESCORED // 2, dim=-1)
    torch.testing.assert_close(fast.gather(-1, top.indices), top.values, rtol=1e-5, atol=1e-4)
    scale = exact.abs().max()
    assert (fast - exact).abs().max() < 0.02 * scale  # the rest: within a bf16 dot product's rounding


@pytest.mark.parametrize("way", WAYS)
def test_a_strided_single_position_goes_through_the_bf16_head(way: str) -> None:
    """A prefill hands the head a [1, 1, hidden] slice that keeps its parent's strides (and 100 outputs are not
    whole blocks of loraswap's kernel)."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(32, 100, bias=True)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.head

    torch.manual_seed(0)
    model = Tiny()
    hidden = torch.randn(1, 5, 32)[:, -1:, :]
    exact = model.head(hidden)
    assert fastpath.bf16_head(model, way=way)
    fast = model.head(hidden)
    assert fast.shape == (1, 1, 100)
    assert int(fast.argmax()) == int(exact.argmax())
    torch.testing.assert_close(fast.max(), exact.max(), rtol=1e-5, atol=1e-5)


def test_the_head_choice_follows_the_setting_and_the_cpu(monkeypatch: pytest.MonkeyPatch, lively_base: Path) -> None:
    model = load_base(str(lively_base), quant="none").model
    monkeypatch.setattr(fastpath, "native_bf16_cpu", lambda: False)
    assert fastpath.head_dtype(model, "auto") is None
    assert fastpath.head_dtype(model, "bfloat16") == torch.bfloat16
    monkeypatch.setattr(fastpath, "native_bf16_cpu", lambda: True)
    timed: list[int] = []
    for faster in (True, False):  # auto: bf16 where a bf16 matmul measures faster at the server's batch size
        monkeypatch.setattr(fastpath, "bf16_pays", lambda weight, rows, f=faster: timed.append(rows) or f)
        assert fastpath.head_dtype(model, "auto", rows=12) == (torch.bfloat16 if faster else None)
    assert timed == [12, 12]
    assert fastpath.head_dtype(model, "float32") is None
    done = fastpath.apply(model, "float32")
    assert done["lm_head"] == "float32" and done["rescored"] == 0
    assert "LM head in float32" in fastpath.describe(done)
    with pytest.raises(ValidationError):
        Settings(lm_head="float16")  # type: ignore[arg-type]


def test_the_bf16_measurement_times_both_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[torch.dtype, int]] = []
    real = torch.nn.functional.linear

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append((w.dtype, x.shape[0]))
        return real(x, w)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    assert fastpath.bf16_pays(torch.randn(64, 32), rows=3, repeats=4) in (None, "bfloat16", "loraswap")
    assert calls == [(torch.float32, 3), (torch.bfloat16, 3)] * 4  # interleaved, at the rows asked


@pytest.mark.parametrize("q4_kernel", ["bitsandbytes", "float32", "bfloat16", "int8"])
def test_an_engine_on_the_fast_paths_matches_peft_on_a_4bit_base(
    q4_kernel: Q4Kernel, lively_base: Path, tmp_path: Path
) -> None:
    random_lora_adapter(lively_base, tmp_path, "symptoms", seed=1)
    random_lora_adapter(lively_base, tmp_path, "treatment", seed=2)
    store = AdapterStore(tmp_path, shipped_dir=None)
    base = load_base(str(lively_base), quant="nf4")
    # the bf16 head on any CPU; the 4-bit kernel where it applies, under PEFT's reference too (`test_q4.py` checks
    # the kernels against the 4-bit weights' exact products; here it is the engine and its LoRA rows that are checked)
    done = fastpath.apply(base.model, "bfloat16", q4_kernel=q4_kernel)
    assert done["lm_head"] == "bfloat16" and done["rescored"] == fastpath.RESCORED
    assert done["q4_kernel"] == (q4_kernel if fastpath.native_bf16_cpu() else None)
    engine = Engine(base.model, base.tokenizer, store.get)
    tok = base.tokenizer
    plan = [("symptoms", QUESTIONS[0]), ("treatment", QUESTIONS[1]), (None, QUESTIONS[2]), ("symptoms", QUESTIONS[3])]
    for i, (adapter, q) in enumerate(plan):
        engine.submit(Job(f"r{i}", prompt_ids(tok, q), adapter, max_tokens=12))
    events: dict[str, list[JobEvent]] = {}
    while engine.has_work():
        for e in engine.step():
            events.setdefault(e.uid, []).append(e)
    texts = set()
    for i, (adapter, q) in enumerate(plan):
        path = None if adapter is None else store.get(adapter).path
        ref = peft_reference(lively_base, path, q, 12, quant="nf4", q4_kernel=q4_kernel)
        text = "".join(e.text for e in events[f"r{i}"])
        assert text == tok.decode(ref, skip_special_tokens=True), (adapter, q)
        texts.add(text)
    assert len(texts) == len(plan)  # the adapters change the answers: the parity could fail


@pytest.fixture
def fresh_probes() -> Iterator[None]:
    """fastpath's once-only probes of bitsandbytes forgotten before and after the test."""
    probes = (fastpath.native_bf16_cpu, fastpath._bitsandbytes_cpu_kernels, fastpath._linear4bit)
    for probe in probes:
        probe.cache_clear()
    yield
    for probe in probes:
        probe.cache_clear()


def test_a_fast_path_not_taken_says_why_once_in_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_probes: None
) -> None:
    """Where a part of bitsandbytes cannot be imported, its fast path is not taken, and the log says so once."""
    for module in ("bitsandbytes.functional", "bitsandbytes.backends.cpu", "bitsandbytes.nn"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ModuleNotFoundError
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with caplog.at_level(logging.INFO, logger="loraswap.server.worker.fastpath"):
        for _ in range(3):
            assert fastpath.native_bf16_cpu() is False
            assert fastpath._packed_kernel(model[0]) is None
            assert fastpath._pack(model) == []
    assert caplog.text.count("bf16 instructions cannot run (ModuleNotFoundError") == 1
    assert caplog.text.count("fused CPU 4-bit kernel cannot be called directly (ModuleNotFoundError") == 1
    assert caplog.text.count("no 4-bit fast path: bitsandbytes cannot be imported (ModuleNotFoundError") == 1
