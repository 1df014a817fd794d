"""Batched multi-LoRA slots against PEFT, the reference: same logits for mixed batches, refusals, reuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engines import PROMPTS, peft_adapter

from loraswap.adapters.manifest import AdapterError
from loraswap.server.worker import q4
from loraswap.server.worker.slots import LoraSlots

KERNELS = [False, pytest.param(True, marks=pytest.mark.skipif(q4.lora_kernel() is None, reason="no LoRA kernel"))]


@pytest.fixture(scope="module")
def adapters(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slots")
    return {
        "qv8": peft_adapter(lively_base, root / "qv8", 1),
        "qv4": peft_adapter(lively_base, root / "qv4", 2, r=4, lora_alpha=8),
        "all16rs": peft_adapter(
            lively_base,
            root / "all16rs",
            3,
            r=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            use_rslora=True,
        ),
        "pattern": peft_adapter(lively_base, root / "pattern", 4, alpha_pattern={"v_proj": 64}),
    }


def reference_logits(base_path: Path, adapter: Path | None, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_path)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("kernel", KERNELS, ids=["torch", "kernel"])
def test_a_mixed_batch_gives_each_row_its_adapters_logits(
    lively_base: Path, adapters: dict[str, Path], kernel: bool
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lively_base)
    slots = LoraSlots(model, capacity=4, kernel=kernel)
    assert (slots.native is not None) == kernel
    for name, path in adapters.items():
        slots.load(name, path)
    for rows in (["qv8", "qv4", "all16rs", "pattern"], ["pattern", None, "qv8", "all16rs"], ["qv4"] * 4):
        slots.use(list(rows))
        with torch.inference_mode():
            mixed = model(PROMPTS).logits
        slots.clear()
        for i, name in enumerate(rows):
            ref = reference_logits(lively_base, None if name is None else adapters[name], PROMPTS[i : i + 1])
            # float32 sums in another order (the native kernel's FMAs): 4e-5 apart on a Xeon with AVX512; a wrong
            # adapter or scale is off by far more
            torch.testing.assert_close(mixed[i : i + 1], ref, atol=1e-4, rtol=1e-3)
    # A running batch, then the other way from the next step on (torch's row buffers made or freed): the same logits.
    rows = ["qv8", "qv4", "all16rs", "pattern"]
    logits = []
    for way in (kernel, not kernel):
        assert slots.set_kernel(way) == (way and q4.lora_kernel() is not None)
        slots.use(list(rows), running=True)
        with torch.inference_mode():
            logits.append(model(PROMPTS).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-3)
    slots.clear()
    # With no adapter in use the model is the base, exactly.
    with torch.inference_mode():
        torch.testing.assert_close(model(PROMPTS).logits, reference_logits(lively_base, None, PROMPTS), atol=0, rtol=0)


def test_adapters_that_the_batched_path_cannot_compute_are_refused(lively_base: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    slots = LoraSlots(AutoModelForCausalLM.from_pretrained(lively_base), capacity=2)
    dora = peft_adapter(lively_base, tmp_path / "dora", 5, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        slots.load("dora", dora)
    embed = peft_adapter(lively_base, tmp_path / "embed", 6, target_modules=["embed_tokens"])
    with pytest.raises(AdapterError, match="only linear layers"):
        slots.load("embed", embed)
    assert len(slots) == 0 and len(slots.free) == 2  # nothing half-loaded


def test_slots_are_reused_without_new_memory(lively_base: Path, adapters: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    slots = LoraSlots(AutoModelForCausalLM.from_pretrained(lively_base), capacity=2)
    slots.load("keep", adapters["qv8"])
    layer = next(iter(slots.layers.values()))
    storage = (layer.A.data_ptr(), layer.Bt.data_ptr())
    for i in range(300):
        slots.load(f"churn{i}", adapters["qv4"])
        slots.unload(f"churn{i}")
    assert (layer.A.data_ptr(), layer.Bt.data_ptr()) == storage
    assert len(slots) == 1 and sorted(slots.free) == [2]
    with pytest.raises(AdapterError, match="slots are in use"):
        slots.load("a", adapters["qv4"])
        slots.load("b", adapters["qv4"])


def test_running_rows_stay_gathered_through_joins_leaves_and_reused_slots(
    lively_base: Path, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running batch keeps its rows' weights gathered from step to step: each step gathers only the rows whose
    adapter changed, and a slot whose weights change (an adapter loaded into a freed slot, a rank grown) is
    gathered again, so every row still gets its own adapter's logits."""
    from transformers import AutoModelForCausalLM

    from loraswap.server.worker.slots import SlotLinear

    refs: dict[str | None, torch.Tensor] = {None: reference_logits(lively_base, None, PROMPTS)}
    refs.update({name: reference_logits(lively_base, path, PROMPTS) for name, path in adapters.items()})
    gathered: list[int] = []
    real_gather = SlotLinear.gather_rows

    def gather_rows(self: SlotLinear, rows: torch.Tensor, slots: torch.Tensor) -> None:
        gathered.append(len(rows))
        real_gather(self, rows, slots)

    monkeypatch.setattr(SlotLinear, "gather_rows", gather_rows)
    model = AutoModelForCausalLM.from_pretrained(lively_base)
    slots = LoraSlots(model, capacity=3, max_rows=4, kernel=False)  # the row buffers are torch's
    slots.load("qv8", adapters["qv8"])
    slots.load("qv4", adapters["qv4"])

    def step(rows: list[str | None]) -> set[int]:
        """One forward of the running rows, each row checked against PEFT; the row counts gathered per layer."""
        gathered.clear()
        slots.use(rows, running=True)
        assert slots.kept
        with torch.inference_mode():
            out = model(PROMPTS[: len(rows)]).logits
        slots.clear()
        for i, name in enumerate(rows):
            torch.testing.assert_close(out[i], refs[name][i], atol=1e-4, rtol=1e-3)
        return set(gathered)

    layers = len(slots.layers)
    assert step(["qv8", "qv4", None, "qv8"]) == {4} and len(gathered) == layers  # first step: every row
    assert step(["qv8", "qv4", None, "qv8"]) == set()  # the same rows: nothing gathered
    assert step(["qv8", "qv8", None]) == {1}  # row 1 left, the last row moved into its place
    assert step(["qv8", "qv8", None, "qv4"]) == {1}  # a row joined
    slots.unload("qv4")
    slots.load("all16rs", adapters["all16rs"])  # qv4's freed slot, a higher rank and new layers
    assert step(["qv8", "all16rs", "qv8", None]) == {4}
    slots.unload("all16rs")
    slots.load("pattern", adapters["pattern"])  # the same slot again, held by row 1
    assert step(["qv8", "pattern", "qv8", None]) == {1}
    assert step(["pattern", "pattern", "qv8", "qv8"]) == {2}  # rows 0 and 3 change their adapters


def test_a_running_batch_of_one_adapter_or_larger_than_the_row_buffers_gathers_nothing_to_keep(
    lively_base: Path, adapters: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lively_base)
    slots = LoraSlots(model, capacity=2, max_rows=2, kernel=False)
    slots.load("qv8", adapters["qv8"])
    slots.load("qv4", adapters["qv4"])
    slots.use(["qv8"] * 4, running=True)
    assert slots.uniform is not None and not slots.kept  # PEFT's two matmuls, no gathering
    slots.use(["qv8", "qv4", "qv8"], running=True)
    assert slots.uniform is None and not slots.kept  # more rows than buffers: gathered for this forward alone
    with torch.inference_mode():
        out = model(PROMPTS[:3]).logits
    slots.clear()
    for i, name in enumerate(["qv8", "qv4", "qv8"]):
        torch.testing.assert_close(
            out[i], reference_logits(lively_base, adapters[name], PROMPTS)[i], atol=1e-4, rtol=1e-3
        )


@pytest.mark.skipif(q4.lora_kernel() is None, reason="no LoRA kernel")
def test_the_lora_kernel_adds_each_rows_own_delta_and_refuses_what_it_cannot_take() -> None:
    """Odd sizes (the vector tails), sequences of several rows, slot 0 and a zero scale adding nothing; against
    the delta computed in torch."""
    add = q4.lora_kernel()
    assert add is not None
    gen = torch.Generator().manual_seed(0)
    slots_n, rank, k, n, seqs, per = 4, 5, 37, 45, 5, 3
    a = torch.randn(slots_n, rank, k, generator=gen)
    bt = torch.randn(slots_n, rank, n, generator=gen)
    scale = torch.tensor([0.0, 0.5, 2.0, 0.0])
    a[0].zero_(), bt[0].zero_()
    slots = torch.tensor([1, 0, 2, 3, 1])
    x = torch.randn(seqs, per, k, generator=gen)
    base = torch.randn(seqs, per, n, generator=gen)
    out = base.clone()
    assert add(x, a, bt, scale, slots, out)
    s = slots.repeat_interleave(per)
    want = base.reshape(-1, n) + torch.einsum("mk,mrk,mrn->mn", x.reshape(-1, k), a[s], bt[s]) * scale[s, None]
    torch.testing.assert_close(out.reshape(-1, n), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], base[1], atol=0, rtol=0)  # slot 0
    torch.testing.assert_close(out[3], base[3], atol=0, rtol=0)  # scale 0
    # What it does not take, it leaves alone for the caller: another dtype, a view with gaps, rows that are not
    # whole sequences.
    for bad in (
        (x.to(torch.bfloat16), a, bt, scale, slots, base.clone()),
        (x, a, bt, scale, slots, torch.randn(seqs, per, 2 * n)[..., :n]),
        (x[:4], a, bt, scale, slots, base[:4].clone()),
    ):
        before = bad[-1].clone()
        assert not add(*bad)
        torch.testing.assert_close(bad[-1], before, atol=0, rtol=0)
