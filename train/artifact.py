"""A trained adapter's folder, written whole and published into a store: PEFT's files with a portable config, the
loss log and its plot, and the manifest (`build_manifest`), then `AdapterStore.add`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loraswap.adapters.base import BaseRef
from loraswap.adapters.manifest import WEIGHTS_FILE, build_manifest, dump_json, sha256_of, write_manifest
from loraswap.adapters.store import AdapterStore


def save_adapter(
    peft_model: Any,
    out: Path,
    name: str,
    ref: BaseRef,
    history: list[dict[str, float]],
    plot_title: str,
    overwrite: bool = True,
    **provenance: Any,
) -> Path:
    """Write the trained adapter and publish it as out/<name>; `provenance` (qtype, training, data_source,
    split_hash, metrics) goes into its manifest. On any error nothing is published and the staging folder is
    removed."""
    store = AdapterStore(out, shipped_dir=None)
    staged = store.stage(name)
    try:
        peft_model.save_pretrained(str(staged))
        portable_config(staged, ref)
        dump_json(staged / "loss.json", history)
        if history:
            plot_losses(history, staged / "loss.png", plot_title)
        manifest = build_manifest(staged, name, ref, sha256_of(staged / WEIGHTS_FILE), **provenance)
        write_manifest(staged, manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return store.add(staged, name, overwrite=overwrite).path


def plot_losses(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    ax.plot(steps, losses, lw=1, alpha=0.5, label="step loss")
    if len(losses) >= 5:
        k = max(2, len(losses) // 10)
        smooth = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))
        ]
        ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def portable_config(folder: Path, ref: BaseRef) -> None:
    """PEFT records the base's load path (for the embedded base, a cache folder of this machine) and
    writes a boilerplate model card that repeats it. An adapter names its base by id instead (a hub id
    where there is one; the fingerprint in loraswap.json is what identifies it), and the card is dropped."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = ref.spec if ref.weights_source.startswith("hub:") else ref.base_id
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)
