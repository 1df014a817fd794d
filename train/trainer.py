"""QLoRA (and prompt-learning) training of one adapter per qtype, with the HF Trainer.

What makes it fast on a CPU, measured by `loraswap train-bench` against the plain recipe:
- length bucketing (`train_sampling_strategy="group_by_length"`): batches hold answers of similar
  length, so little compute goes to padding;
- no gradient checkpointing by default: a 135M-parameter base fits many times over in memory, and
  recomputing activations costs a third more compute.
The loss is taken on answer tokens only: the prompt is masked with -100 (causal bases) or is the encoder's
input while the answer is the decoder's (seq2seq bases).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loraswap.adapters.arch import Architecture, architecture, kind_of
from loraswap.adapters.base import BaseModelError, BaseRef, LoadedBase, Quant, load_base, resolve_base
from loraswap.adapters.manifest import Method, dump_json, qtype_to_name
from loraswap.adapters.prompt import Example
from loraswap.train.artifact import save_adapter
from loraswap.train.batching import PadCollator, is_seq2seq, pick_rows, tokenize_rows
from loraswap.train.data import QA, Split, check_qtypes, load_qa, split
from loraswap.train.evaluate import answer_nll_items, change_figures
from loraswap.train.stats import nll_of

log = logging.getLogger(__name__)

# The default targets come from the base's architecture (`adapters/arch.py`): its attention query and
# value projections, as in the LoRA paper and PEFT's reference recipe. `--target-modules all-linear`
# adapts every linear layer (more capacity, ~5x the size).
_DEFAULT_LR: dict[str, float] = {"lora": 5e-4, "prefix": 1e-2, "prompt": 3e-2, "ptuning": 1e-2}


@dataclass(frozen=True)
class TrainConfig:
    """How one adapter is trained; saved into the adapter's manifest."""

    method: Method = "lora"
    """lora (default), or a prompt-learning method: prefix, prompt, ptuning."""
    rank: int = 8
    """LoRA rank r."""
    alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = 0.1
    """LoRA dropout."""
    loraplus_ratio: float = 1.0
    """LoRA+ (Hayou et al., 2024): the B matrices learn this many times faster than the A matrices, whose rate is
    `lr`; 1 is plain LoRA. PEFT's LoRA+ optimizer (create_loraplus_optimizer) does it; the adapter is plain LoRA."""
    target_modules: tuple[str, ...] = ()
    """Modules LoRA adapts; () for the architecture's default (attention q and v), ('all-linear',) for every
    linear layer but the output head."""
    num_virtual_tokens: int = 20
    """Virtual tokens for prefix, prompt and P-tuning."""
    lr: float | None = None
    """Peak learning rate; None picks the method's default (5e-4 for LoRA, 1e-2 to 3e-2 for prompt methods)."""
    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 60
    """Optimizer steps; -1 trains for `epochs` instead."""
    epochs: float = 1.0
    """Epochs over the training rows when max_steps is -1."""
    max_examples: int | None = None
    """Use at most this many training rows (after the split), picked deterministically."""
    other_rows: float = 0.0
    """Mix in training rows of the other qtypes, as a share of this qtype's own (0.5: half as many again), drawn
    with the seed from their side of the split (a held-out question is held out of every qtype)."""
    max_seq_len: int = 256
    """Prompt + answer tokens; longer answers are cut (the prompt never is)."""
    seed: int = 0
    """Seed for sampling, shuffling and initialisation."""
    heldout_fraction: float = 0.1
    """Share of distinct questions held out for evaluation."""
    quant: Quant = "nf4"
    """nf4 or fp4: QLoRA over the 4-bit base; int8: over the LLM.int8 base; none: the dense base."""
    double_quant: bool = True
    """4-bit only: quantize the blocks' scales too (bitsandbytes double quantization)."""
    bucketing: bool = True
    """Batch examples of similar length together (HF LengthGroupedSampler)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory (for large bases)."""
    save_steps: int = 20
    """Checkpoint every N steps, so an interrupted run resumes."""
    eval_examples: int = 16
    """Held-out questions scored (answer NLL, base vs adapter) after training; 0 skips."""

    def __post_init__(self) -> None:
        if not self.other_rows >= 0:
            raise ValueError(f"other_rows must be 0 or more (a share of the qtype's own rows), got {self.other_rows}")
        if not self.loraplus_ratio > 0:
            raise ValueError(f"loraplus_ratio must be above 0 (1 is plain LoRA), got {self.loraplus_ratio}")
        if self.loraplus_ratio != 1 and self.method != "lora":
            raise ValueError(f"loraplus_ratio applies to LoRA only, not to {self.method}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.method]

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["lr"] = self.learning_rate
        return d


@dataclass
class TrainResult:
    name: str
    path: Path
    steps: int
    seconds: float
    train_tokens: int
    """Non-padding tokens seen by the model (prompt included)."""
    losses: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.seconds if self.seconds else 0.0


def peft_config(cfg: TrainConfig, tokenizer: Any, arch: Architecture) -> Any:
    from peft import (
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
    )

    task = TaskType(arch.peft_task)
    if cfg.method == "lora":
        targets: str | list[str] = "all-linear" if cfg.target_modules == ("all-linear",) else list(arch.targets)
        return LoraConfig(
            task_type=task, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets
        )
    if cfg.method == "prefix":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "prompt":
        return PromptTuningConfig(
            task_type=task,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text="Answer the medical question accurately:",
            tokenizer_name_or_path=tokenizer.name_or_path,
        )
    return PromptEncoderConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=128)


def _progress_callback() -> Any:
    from transformers.trainer_callback import ProgressCallback

    class LossBar(ProgressCallback):
        """The Trainer's progress bar, with the latest loss shown on the bar instead of printed per step."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")

    return LossBar


def attach_adapter(base: LoadedBase, cfg: TrainConfig) -> Any:
    """Wrap the base in a trainable PeftModel for `cfg.method`."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = base.model
    if base.quant != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model_type = base.ref.model_type
    if cfg.method == "lora":
        arch = architecture(model_type, cfg.target_modules or None)
    else:  # prompt-learning methods adapt no modules: only the base's kind matters, known architecture or not
        arch = Architecture(model_type, kind_of(model_type), ())
    peft_model = get_peft_model(model, peft_config(cfg, base.tokenizer, arch))
    peft_model.print_trainable_parameters()
    return peft_model


def run_trainer(
    peft_model: Any,
    examples: list[Example],
    cfg: TrainConfig,
    work_dir: Path,
    pad_id: int,
    resume: bool = True,
    progress: bool = True,
) -> tuple[list[dict[str, float]], float, PadCollator]:
    """Train with the HF Trainer; returns (loss history, seconds, the collator with its token counts)."""
    import datasets
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    seq2seq = is_seq2seq(peft_model)
    # Causal examples hold the prompt in the labels too (masked); seq2seq ones hold the answer alone.
    ds = datasets.Dataset.from_list(
        [
            {"input_ids": e.input_ids, "labels": e.labels, "length": len(e.input_ids) + seq2seq * len(e.labels)}
            for e in examples
        ]
    )
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, min(10, cfg.max_steps // 10)) if cfg.max_steps > 0 else 10,
        logging_steps=1,
        save_steps=cfg.save_steps,
        save_total_limit=1,
        save_only_model=False,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.bucketing else "random",
        length_column_name="length",
        remove_unused_columns=False,
        disable_tqdm=not progress,
        use_cpu=str(peft_model.device) == "cpu",
        dataloader_num_workers=0,
    )
    collator = PadCollator(pad_id, seq2seq=seq2seq)
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=ds,
        data_collator=collator,
        optimizers=(_optimizer(peft_model, cfg), None),
    )
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_progress_callback())
    else:  # no per-step log dicts on stdout either (commands with --json print one object there)
        trainer.remove_callback(PrinterCallback)
    checkpoint = get_last_checkpoint(str(work_dir)) if resume and work_dir.is_dir() else None
    if checkpoint:
        print(f"resuming from {Path(checkpoint).name}", file=sys.stderr)
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    log.debug(
        "trained to step %d; padding share %.1f%%",
        out.global_step,
        100 * (1 - collator.tokens / max(1, collator.slots)),
    )
    # The trainer's log history includes the steps before a resume (restored from the checkpoint).
    history = [
        {"step": h["step"], "loss": float(h["loss"]), "lr": float(h.get("learning_rate") or 0.0)}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    return history, seconds, collator


def _optimizer(peft_model: Any, cfg: TrainConfig) -> Any:
    """The LoRA+ optimizer (AdamW, B matrices at `loraplus_ratio` times `lr`); None leaves the Trainer's own."""
    if cfg.loraplus_ratio == 1:
        return None
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        peft_model, optimizer_cls=torch.optim.AdamW, lr=cfg.learning_rate, loraplus_lr_ratio=cfg.loraplus_ratio
    )


def _work_dir(out: Path, name: str, cfg: TrainConfig, ref: BaseRef, split_hash: str) -> Path:
    """Checkpoints live in out/.work/<name>; a run with a different config starts over."""
    work = out / ".work" / name
    stamp = {"config": cfg.describe(), "base": ref.fingerprint, "split": split_hash}
    stamp_file = work / "run.json"
    if work.is_dir() and (not stamp_file.is_file() or json.loads(stamp_file.read_text()) != stamp):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    dump_json(stamp_file, stamp)
    return work


def other_qtype_rows(rows: list[QA], qtype: str, n: int, cfg: TrainConfig) -> list[QA]:
    """`n` training rows of qtypes other than `qtype`, drawn with the seed. The split is by question, so none of
    them is a held-out question of `qtype` or of any other qtype."""
    if n <= 0:
        return []
    others = [r for r in split(rows, None, cfg.heldout_fraction).train if r.qtype != qtype]
    return pick_rows(others, n, cfg.seed + 1)


def train_qtype(
    base_spec: str | BaseRef,
    rows: list[QA],
    qtype: str,
    out: Path,
    cfg: TrainConfig,
    data_source: str,
    name: str | None = None,
    overwrite: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train one adapter for `qtype` and publish it as out/<name>."""
    name = name or qtype_to_name(qtype)
    ref = base_spec if isinstance(base_spec, BaseRef) else resolve_base(base_spec)
    sp: Split = split(rows, qtype, cfg.heldout_fraction)
    if not sp.train:
        raise ValueError(f"qtype {qtype!r} has no training rows after holding out {cfg.heldout_fraction:.0%}")
    if cfg.method != "lora" and ref.kind == "seq2seq":
        raise BaseModelError(
            f"--method {cfg.method}: base {ref.base_id!r} is a seq2seq ({ref.model_type}) base, on which loraswap "
            "trains and serves LoRA only (its server places virtual tokens and prefixes for decoder-only bases)"
        )
    base = load_base(ref, quant=cfg.quant, double_quant=cfg.double_quant)
    train_rows = pick_rows(sp.train, cfg.max_examples, cfg.seed)
    mixed = other_qtype_rows(rows, qtype, round(cfg.other_rows * len(train_rows)), cfg)
    examples = tokenize_rows(train_rows + mixed, base.tokenizer, cfg.max_seq_len, seq2seq=ref.kind == "seq2seq")
    of_others = f" ({len(mixed)} of other qtypes)" if mixed else ""
    print(
        f"[{name}] {len(examples)} training examples{of_others}, {len(sp.heldout)} held-out questions; "
        f"base {ref.base_id}"
    )
    peft_model = attach_adapter(base, cfg)
    work = _work_dir(out, name, cfg, ref, sp.hash)
    history, seconds, collated = run_trainer(
        peft_model, examples, cfg, work, base.tokenizer.pad_token_id, progress=progress
    )

    metrics: dict[str, Any] = {}
    heldout = sp.heldout[: cfg.eval_examples]
    if heldout:
        peft_model.eval()
        scored = answer_nll_items(peft_model, base.tokenizer, heldout, cfg.max_seq_len)
        with peft_model.disable_adapter():
            base_scored = answer_nll_items(peft_model, base.tokenizer, heldout, cfg.max_seq_len)
        nll, base_nll = nll_of(scored), nll_of(base_scored)
        metrics = {
            "heldout_n": len(scored),
            "base_nll": round(base_nll, 4),
            "nll": round(nll, 4),
            **change_figures(scored, base_scored),
            "quant": cfg.quant,
        }
        low, high = metrics["nll_change_ci95"]
        print(
            f"[{name}] held-out answer NLL: base {base_nll:.3f} -> adapter {nll:.3f} "
            f"({metrics['nll_change']:+.1%}, 95% interval {low:+.1%} to {high:+.1%}, {len(scored)} questions)"
        )

    final = save_adapter(
        peft_model,
        out,
        name,
        ref,
        history,
        f"{name}: {cfg.method} r={cfg.rank} on {ref.base_id}",
        overwrite=overwrite,
        qtype=qtype,
        training={**cfg.describe(), "steps": len(history), "seconds": round(seconds, 1), "examples": len(examples)},
        data_source=data_source,
        split_hash=sp.hash,
        metrics=metrics,
    )
    shutil.rmtree(work, ignore_errors=True)
    return TrainResult(name, final, len(history), seconds, collated.tokens, history, metrics)


def train_many(
    base_spec: str, data: str, qtypes: list[str], out: Path, cfg: TrainConfig, progress: bool = True
) -> list[TrainResult]:
    ref = resolve_base(base_spec)
    if cfg.method == "lora":  # an architecture without defaults fails now, before the data and the base load
        architecture(ref.model_type, cfg.target_modules or None)
    rows = load_qa(data)
    check_qtypes(rows, qtypes)
    return [
        train_qtype(
            ref, rows, q, out, cfg, data_source=Path(data).name if Path(data).exists() else data, progress=progress
        )
        for q in qtypes
    ]


__all__ = ["TrainConfig", "TrainResult", "other_qtype_rows", "replace", "train_many", "train_qtype"]
