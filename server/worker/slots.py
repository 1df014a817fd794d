"""Batched multi-LoRA: every loaded adapter in a slot of preallocated per-layer tensors, a mixed batch
applied with gathered batched matmuls (the BGMV idea of Punica and S-LoRA, in plain torch ops).

PEFT's mixed-batch path (`adapter_names`) loops over the distinct adapters of the batch in every
adapted layer, and its `load_adapter` walks the whole model (its cost grows with the adapters
already loaded). Here each adapted layer holds, for S slots,

    A: [S, R, in]   Bt (B transposed): [S, R, out]   scale: [S]

where R is the largest rank loaded (smaller ranks are zero-padded, which changes no sum). A forward
over rows that use slots `idx` adds `bmm(bmm(x, A[idx]^T) * scale[idx], Bt[idx])` into the base layer's
output in place: the same number of operations whatever the mix of adapters. On a CPU with loraswap's kernels
(`q4.lora_kernel`) that is one call a layer in which each row reads its own slot; elsewhere, in torch, a batch of
one adapter takes PEFT's own two matmuls. Slot 0 is all zeros: rows on the base, or on a prompt-learning
adapter, use it.

In torch, the running batch's rows keep their gathered `A[idx]`, `Bt[idx]` and scales in per-layer row buffers
(`[rows, R, in]`, `[rows, R, out]`, `[rows]`) from one decoding step to the next, and a step rewrites only the
rows whose adapter changed: a request joining or leaving the batch costs one row's copy, not a regather of
every row in every layer. The row buffers are a fixed cost sized by the batch (allocated and touched with
the layers), not by the adapters loaded. A one-off forward (a prefill) gathers its rows for itself.

Loading an adapter reads its safetensors file straight into a free slot (no module surgery); freeing
one returns the slot, so memory stays flat however many adapters come and go. Slot tensors are
allocated empty (pages are touched as slots are written), so resident memory grows by an adapter's
weights as it loads. PEFT remains the format: the adapter folder is PEFT's, and the results equal
PEFT's within float tolerance (tests compare them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraswap.adapters.lora import lora_pairs, lora_scale
from loraswap.adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from loraswap.server.worker import q4
from loraswap.server.worker.mixing import Mix, mix_rows, mixture_forward

# PEFT LoRA features this path does not compute; such adapters are refused with the reason.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "use_qalora": "QA-LoRA",
}


class SlotLinear(nn.Module):
    """A linear layer of the base (dense or 4-bit) plus the LoRA deltas of every slot."""

    def __init__(self, base_layer: nn.Module, slots: LoraSlots, capacity: int, rank: int, rows: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slots = slots
        self.in_features = int(base_layer.in_features)  # type: ignore[arg-type]
        self.out_features = int(base_layer.out_features)  # type: ignore[arg-type]
        dev, dt = slots.device, slots.dtype
        self.A = torch.empty(capacity, rank, self.in_features, device=dev, dtype=dt)
        self.Bt = torch.empty(capacity, rank, self.out_features, device=dev, dtype=dt)
        self.scale = torch.zeros(capacity, device=dev, dtype=dt)
        self.scales = [0.0] * capacity  # the same, as Python floats (a kernel argument, no tensor op)
        self.A[0].zero_()
        self.Bt[0].zero_()
        self._make_row_buffers(rows)

    def _make_row_buffers(self, rows: int) -> None:
        """The running rows' A [rows, R, in], B^T [rows, R, out] and scale [rows, 1, 1], as `LoraSlots.use` gathers
        them; zeroed, so their pages are resident from the start rather than as mixed batches first fill them."""
        rank, dev, dt = self.A.shape[1], self.A.device, self.A.dtype
        self.row_a = torch.zeros(rows, rank, self.in_features, device=dev, dtype=dt)
        self.row_bt = torch.zeros(rows, rank, self.out_features, device=dev, dtype=dt)
        self.row_scale = torch.zeros(rows, 1, 1, device=dev, dtype=dt)

    def grow_rank(self, rank: int, used: list[int]) -> None:
        """Pad every slot to `rank`; only the slots in use (and slot 0) are copied, so the others stay
        untouched memory."""
        old = self.A.shape[1]
        if rank <= old:
            return
        a = torch.empty(self.A.shape[0], rank, self.in_features, device=self.A.device, dtype=self.A.dtype)
        bt = torch.empty(self.Bt.shape[0], rank, self.out_features, device=self.Bt.device, dtype=self.Bt.dtype)
        for s in [0, *used]:
            a[s, :old].copy_(self.A[s])
            a[s, old:].zero_()
            bt[s, :old].copy_(self.Bt[s])
            bt[s, old:].zero_()
        self.A, self.Bt = a, bt
        self._make_row_buffers(self.row_a.shape[0])  # `LoraSlots` regathers every row

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Put one adapter's A [r, in] and B [out, r] in `slot` (None: this adapter leaves the layer alone)."""
        if a is None or b is None:
            self.A[slot].zero_()
            self.Bt[slot].zero_()
            self.scale[slot] = 0.0
            self.scales[slot] = 0.0
            return
        r = a.shape[0]
        self.A[slot, :r].copy_(a)
        self.A[slot, r:].zero_()
        self.Bt[slot, :r].copy_(b.t())
        self.Bt[slot, r:].zero_()
        self.scale[slot] = scale
        self.scales[slot] = float(self.scale[slot])

    def gather_rows(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Row buffer positions `rows` take the weights of `slots` (index tensors of the same length)."""
        self.row_a.index_copy_(0, rows, self.A.index_select(0, slots))
        self.row_bt.index_copy_(0, rows, self.Bt.index_select(0, slots))
        self.row_scale.index_copy_(0, rows, self.scale.index_select(0, slots).view(-1, 1, 1))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        slots = self.slots
        if slots.mix is not None:
            return mixture_forward(self, x, out, *slots.mix)
        if slots.rows is None:
            return out
        if slots.native is not None and slots.native(x, self.A, self.Bt, self.scale, slots.rows, out):
            return out
        xd = x.to(self.A.dtype)
        if slots.uniform is not None and out.dtype == xd.dtype and out.is_contiguous():
            # One adapter for the whole batch: PEFT's two matmuls, the second adding its scaled product into the
            # base's output in place (two kernels a layer; dispatch, not arithmetic, is the cost at this size).
            s = slots.uniform
            flat = out.view(-1, self.out_features)
            flat.addmm_(torch.mm(xd.reshape(-1, self.in_features), self.A[s].t()), self.Bt[s], alpha=self.scales[s])
            return out
        if slots.uniform is not None:
            s = slots.uniform
            delta = torch.matmul(nn.functional.linear(xd, self.A[s]), self.Bt[s]) * self.scale[s]
            return out + delta.to(out.dtype)
        assert slots.rows is not None
        if slots.kept:  # the running batch: its rows' weights are in the row buffers, in row order
            n = len(slots.rows)
            a, bt, scale = self.row_a[:n], self.row_bt[:n], self.row_scale[:n]
        else:
            a = self.A.index_select(0, slots.rows)
            bt = self.Bt.index_select(0, slots.rows)
            scale = self.scale.index_select(0, slots.rows).view(-1, 1, 1)
        shape = xd.shape
        # Rows x (the scaled rank-R product) x B^T, added into the base's output in place when it can take it.
        u = torch.bmm(xd.reshape(shape[0], -1, shape[-1]), a.transpose(1, 2)).mul_(scale)  # [rows, tokens, R]
        if out.dtype == u.dtype and out.is_contiguous():
            out.view(shape[0], -1, self.out_features).baddbmm_(u, bt)
            return out
        return out + torch.bmm(u, bt).reshape(*shape[:-1], -1).to(out.dtype)


class LoraSlots:
    """The slots of one model: which adapter is where, and the rows of the next forward."""

    def __init__(
        self,
        model: nn.Module,
        capacity: int,
        device: Any = None,
        dtype: Any = None,
        max_rows: int = 16,
        kernel: bool = True,
    ) -> None:
        """`capacity` adapters can be loaded at once (slot 0, the zero adapter, comes on top); a running batch of up
        to `max_rows` rows keeps its rows' weights gathered between decoding steps (in torch). `kernel`: add the
        deltas with loraswap's CPU kernel where it applies (False: torch ops everywhere, as on a GPU)."""
        self.model = model
        self.device = device or next(model.parameters()).device
        # float32, as PEFT computes LoRA (it upcasts half-precision adapter weights): the same results.
        self.dtype = dtype or torch.float32
        self.native: Callable[..., bool] | None = None
        """loraswap's kernel for the deltas (`q4.lora_kernel`), or None: torch ops and the row buffers."""
        self.capacity = capacity + 1
        self.rank = 0
        self.layers: dict[str, SlotLinear] = {}
        self.free = list(range(self.capacity - 1, 0, -1))
        self.slot_of: dict[str, int] = {}
        self.rows: torch.Tensor | None = None
        """Slot of each row for the next forward; None when no row uses an adapter."""
        self.uniform: int | None = None
        """The slot, when every row uses the same one."""
        self.kept = False
        """Whether the layers read the rows' weights from their row buffers (a mixed running batch)."""
        self.mix: tuple[torch.Tensor, torch.Tensor] | None = None
        """With a row that mixes adapters: each row's slots [rows, K] and their weights [rows, K] (`mixing.py`)."""
        self.max_rows = max_rows
        self._held = [-1] * max_rows
        """The slot whose weights each row buffer position holds in every layer (-1: none, or stale)."""
        self.set_kernel(kernel)

    def set_kernel(self, on: bool) -> bool:
        """From the next forward on, add the deltas with loraswap's CPU kernel where it applies (float32 slots on
        the CPU), or in torch; the layers' row buffers are freed or made to match. Whether the kernel is used."""
        on_cpu = torch.device(self.device).type == "cpu" and self.dtype == torch.float32
        self.native = q4.lora_kernel() if on and on_cpu else None
        for layer in self.layers.values():
            layer._make_row_buffers(self.buffered_rows)
        self._held = [-1] * self.max_rows
        return self.native is not None

    @property
    def buffered_rows(self) -> int:
        """Rows of each layer's row buffers: `max_rows` in torch, none with the kernel (it reads the slots)."""
        return 0 if self.native is not None else self.max_rows

    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, key: str) -> bool:
        return key in self.slot_of

    # ---- loading --------------------------------------------------------------------------------

    def load(self, key: str, folder: Path) -> int:
        """Read the PEFT LoRA adapter in `folder` into a free slot; returns the slot."""
        if key in self.slot_of:
            return self.slot_of[key]
        if not self.free:
            raise AdapterError(f"all {self.capacity - 1} adapter slots are in use")
        config = json.loads((folder / CONFIG_FILE).read_text())
        _check_supported(config)
        weights = lora_pairs(load_tensors(folder / WEIGHTS_FILE))
        for module, (a, b) in weights.items():
            base = self._base_linear(module)
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features or a.shape[0] != b.shape[1]:
                raise AdapterError(
                    f"LoRA weights of {module} have shapes {list(a.shape)} and {list(b.shape)}; the layer is "
                    f"{base.in_features} -> {base.out_features}"
                )
        top = max(a.shape[0] for a, _ in weights.values())
        if top > self.rank:  # before new layers are made, so that they are made at the new rank
            self.rank = top
            for layer in self.layers.values():
                layer.grow_rank(top, list(self.slot_of.values()))
            self._held = [-1] * self.max_rows
        for module in weights:
            self._layer(module)
        slot = self.free.pop()
        try:
            with torch.no_grad():
                for module, layer in self.layers.items():
                    pair = weights.get(module)
                    if pair is None:
                        layer.write(slot, None, None, 0.0)
                    else:
                        a, b = pair
                        layer.write(slot, a, b, lora_scale(config, module, a.shape[0]))
        except BaseException:
            self.free.append(slot)
            raise
        finally:  # the slot's weights changed (a freed slot may be reused): rows holding it regather
            self._held = [-1 if s == slot else s for s in self._held]
        self.slot_of[key] = slot
        return slot

    def unload(self, key: str) -> None:
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.free.append(slot)

    def _layer(self, module: str) -> SlotLinear:
        """The slot layer wrapping base module `module`, created (in place of the module) on first use."""
        layer = self.layers.get(module)
        if layer is not None:
            return layer
        layer = SlotLinear(self._base_linear(module), self, self.capacity, self.rank, self.buffered_rows)
        for slot in self.slot_of.values():  # adapters loaded before this layer existed leave it alone
            layer.write(slot, None, None, 0.0)
        self._held = [-1] * self.max_rows
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
        self.layers[module] = layer
        return layer

    def _base_linear(self, module: str) -> Any:
        """The base's linear layer `module` (already wrapped or not)."""
        layer = self.layers.get(module)
        if layer is not None:
            return layer
        try:
            base = self.model.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"the base has no module {module!r}") from None
        if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
            raise AdapterError(f"LoRA on {module} ({type(base).__name__}) is not served; only linear layers are")
        return base

    # ---- the rows of a forward ------------------------------------------------------------------

    def use(self, keys: list[str | Mix | None], running: bool = False) -> None:
        """Set the adapter of each row (None: no LoRA; a `Mix`: several adapters' deltas, weighted) for the next
        forward. `running`: these are the running batch's rows, in the order they keep from step to step (a
        decoding step); their weights stay gathered in the layers' row buffers, and only rows whose adapter changed
        since the last such call are gathered."""
        self.kept, self.mix = False, None
        if any(isinstance(k, tuple) for k in keys):
            self.rows, self.uniform = None, None
            self.mix = mix_rows(keys, self.slot_of, self.device)
            return
        slots = [0 if k is None else self.slot_of[k] for k in keys]  # type: ignore[index]
        if not any(slots):
            self.rows, self.uniform = None, None
            return
        self.uniform = slots[0] if all(s == slots[0] for s in slots) else None
        self.rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        if running and self.native is None and self.uniform is None and len(slots) <= self.max_rows:
            changed = [i for i, s in enumerate(slots) if self._held[i] != s]
            if changed:
                rows = torch.tensor(changed, dtype=torch.long, device=self.device)
                sources = self.rows.index_select(0, rows)
                for layer in self.layers.values():
                    layer.gather_rows(rows, sources)
                for i in changed:
                    self._held[i] = slots[i]
            self.kept = True

    def clear(self) -> None:
        self.rows, self.uniform, self.kept, self.mix = None, None, False, None


def _check_supported(config: dict[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise AdapterError(f"this adapter uses {what}, which the batched LoRA path does not compute")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, on the CPU. Read as bytes: safetensors' file-based loaders
    (`safe_open`, `load_file`; safetensors 0.8) leak a few KiB of small objects per call, which a server loading
    adapters all day would feel."""
    from safetensors.torch import load

    return load(path.read_bytes())
