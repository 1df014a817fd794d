"""Adapter names, manifests, the store, and validation against the base."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraswap.adapters.base import BaseRef, fingerprint, resolve_base
from loraswap.adapters.manifest import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterNotFound,
    BaseMismatch,
    check_name,
    publish,
    qtype_to_name,
    read_manifest,
    sha256_of,
    staging_dir,
    write_manifest,
)
from loraswap.adapters.store import AdapterStore, did_you_mean
from loraswap.adapters.validate import check_compatible, validate_adapter
from loraswap.train.trainer import TrainConfig, train_many


@pytest.fixture(scope="module")
def adapter(tiny_base: Path, qa_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapters")
    cfg = TrainConfig(max_steps=2, batch_size=2, eval_examples=0, quant="none")
    train_many(str(tiny_base), str(qa_csv), ["symptoms"], out, cfg, progress=False)
    return out / "symptoms"


@pytest.fixture
def copy(adapter: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(adapter, dst)
    return dst


@pytest.mark.parametrize("name", ["symptoms", "genetic-changes", "a", "x" * 64, "v1.2_b"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Symptoms", "a/b", "..", "a..b", "-x", ".hidden", "x" * 65, "sym ptoms", "ѕymptoms"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(AdapterError, match="invalid adapter name"):
        check_name(name)


def test_qtype_names() -> None:
    assert qtype_to_name("genetic changes") == "genetic-changes"
    assert qtype_to_name("exams and tests") == "exams-and-tests"


def test_fingerprint_is_stable_and_separates_bases() -> None:
    arch = {"model_type": "llama", "hidden_size": 64}
    assert fingerprint(arch, "w1") == fingerprint(dict(reversed(list(arch.items()))), "w1")
    assert fingerprint(arch, "w1") != fingerprint(arch, "w2")
    assert fingerprint(arch, "w1") != fingerprint({**arch, "hidden_size": 128}, "w1")


def test_publish_is_all_or_nothing(tmp_path: Path) -> None:
    staged = staging_dir(tmp_path, "a")
    (staged / "f").write_text("1")
    publish(staged, tmp_path / "a", overwrite=False)
    again = staging_dir(tmp_path, "a")
    (again / "f").write_text("2")
    with pytest.raises(FileExistsError):
        publish(again, tmp_path / "a", overwrite=False)
    assert (tmp_path / "a" / "f").read_text() == "1"
    assert not again.exists()
    newer = staging_dir(tmp_path, "a")
    (newer / "f").write_text("3")
    publish(newer, tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / "f").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_store_lists_complete_adapters_and_suggests_names(adapter: Path, tmp_path: Path) -> None:
    shutil.copytree(adapter, tmp_path / "symptoms")
    shutil.copytree(adapter, tmp_path / ".tmp-half-written")  # staging folders are invisible
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{")
    store = AdapterStore(tmp_path, shipped_dir=None)
    assert store.names() == ["symptoms"]
    assert "broken" in store.problems()
    d = store.get("symptoms").describe()
    assert d["source"] == "user" and d["rank"] == 8 and d["method"] == "lora" and int(d["size_bytes"]) > 0  # type: ignore[call-overload]
    with pytest.raises(AdapterNotFound, match=r"'symtoms' not found; did you mean 'symptoms'"):
        store.get("symtoms")


def test_store_add_publishes_a_staged_adapter_whole(adapter: Path, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store", shipped_dir=None)
    staged = store.stage("mine")
    assert staged.parent == store.user_dir and staged.name.startswith(".tmp-mine-")
    shutil.copytree(adapter, staged, dirs_exist_ok=True)
    entry = store.add(staged, "mine")
    assert entry.path == store.user_dir / "mine" and entry.source == "user" and entry.manifest.qtype == "symptoms"
    assert store.names() == ["mine"] and not staged.exists()
    again = store.stage("mine")
    shutil.copytree(adapter, again, dirs_exist_ok=True)
    with pytest.raises(FileExistsError, match="'mine' already exists"):
        store.add(again, "mine")
    assert not again.exists()
    elsewhere = staging_dir(tmp_path / "other", "mine")
    with pytest.raises(ValueError, match="not a staging folder of this store"):
        store.add(elsewhere, "mine")
    assert sorted(p.name for p in store.user_dir.iterdir()) == ["mine"] and elsewhere.is_dir()  # left untouched
    with pytest.raises(AdapterError, match="invalid adapter name"):
        store.stage("../x")


def test_did_you_mean() -> None:
    assert did_you_mean("symtoms", ["symptoms", "treatment"]) == "; did you mean 'symptoms'?"
    assert did_you_mean("zzz", ["symptoms", "treatment"]) == ""


def test_valid_adapter_passes(adapter: Path, tiny_base: Path) -> None:
    assert validate_adapter(adapter, resolve_base(str(tiny_base))) == []


def test_base_mismatch_names_both_bases(adapter: Path) -> None:
    other = BaseRef("other", "other-model", "/nowhere", "gguf-sha256:abc", {"model_type": "llama"})
    m = read_manifest(adapter)
    with pytest.raises(BaseMismatch, match=rf"trained on base '{m.base_id}' .* loaded base is 'other-model'"):
        check_compatible(m, other)
    problems = validate_adapter(adapter, other)
    assert any("other-model" in p and m.base_id in p for p in problems)


def test_pickles_and_links_are_refused(copy: Path) -> None:
    (copy / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    assert any("pickled weights are refused" in p for p in validate_adapter(copy))
    (copy / "adapter_model.bin").unlink()
    (copy / "link").symlink_to("/etc/passwd")
    assert any("symbolic link" in p for p in validate_adapter(copy))


def test_config_problems(copy: Path) -> None:
    cfg_path = copy / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    assert any("does not parse" in p for p in validate_adapter(copy))
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    assert any("unsupported adapter method 'IA3'" in p for p in validate_adapter(copy))
    cfg_path.write_text(json.dumps({**cfg, "r": 4096}))
    assert any("rank r=4096 is outside 1..64" in p for p in validate_adapter(copy))
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    assert any("DoRA" in p for p in validate_adapter(copy))


def _rewrite_weights(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(folder / WEIGHTS_FILE))
    save_file(change(tensors), str(folder / WEIGHTS_FILE))
    m = read_manifest(folder)
    write_manifest(folder, m.model_copy(update={"weights_sha256": sha256_of(folder / WEIGHTS_FILE)}))


def test_weights_that_do_not_fit_the_base(copy: Path, tiny_base: Path) -> None:
    ref = resolve_base(str(tiny_base))

    def widen(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = next(n for n in t if "lora_A" in n)
        return {**t, k: torch.zeros(8, 999)}

    _rewrite_weights(copy, widen)
    assert any("needs [8, 64]" in p for p in validate_adapter(copy, ref))


def test_weights_for_modules_the_base_lacks(copy: Path, tiny_base: Path) -> None:
    def rename(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n.replace("q_proj", "wq"): v for n, v in t.items()}

    _rewrite_weights(copy, rename)
    assert any("does not have" in p for p in validate_adapter(copy, resolve_base(str(tiny_base))))


def test_nan_weights_and_tampered_files(copy: Path) -> None:
    def poison(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = next(iter(t))
        v = t[k].clone()
        v.view(-1)[0] = math.nan
        return {**t, k: v}

    _rewrite_weights(copy, poison)
    assert any("NaN or Inf" in p for p in validate_adapter(copy))
    with (copy / WEIGHTS_FILE).open("r+b") as f:  # change bytes without updating the manifest
        f.seek(-4, 2)
        f.write(b"\x00\x00\x00\x00")
    assert any("does not match the sha256" in p for p in validate_adapter(copy))


def test_lying_safetensors_header(copy: Path) -> None:
    raw = (copy / WEIGHTS_FILE).read_bytes()
    (copy / WEIGHTS_FILE).write_bytes((10**9).to_bytes(8, "little") + raw[8:])
    assert any("header length" in p for p in validate_adapter(copy))
    (copy / WEIGHTS_FILE).write_bytes(b"abc")
    assert any("too short" in p for p in validate_adapter(copy))


def test_missing_manifest(copy: Path) -> None:
    (copy / MANIFEST_FILE).unlink()
    assert any(f"no {MANIFEST_FILE}" in p for p in validate_adapter(copy))
    assert validate_adapter(copy, require_manifest=False) == []


def test_corrupt_gguf_is_a_clear_error_and_leaves_no_cache(tmp_path: Path) -> None:
    from loraswap.adapters.base import BaseModelError

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(BaseModelError, match=r"could not read GGUF 'broken\.gguf'"):
        resolve_base(str(bad), cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(BaseModelError, match="no such GGUF file"):
        resolve_base(str(tmp_path / "missing.gguf"))


def test_hub_ids_resolve_through_the_hub_snapshot(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub is outside the process: its download is replaced by a local snapshot folder named by commit."""
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / "0123abcd"
    shutil.copytree(tiny_base, snapshot)
    asked: list[str] = []

    def fake_download(repo_id: str, **kwargs: object) -> str:
        asked.append(repo_id)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    ref = resolve_base("someorg/tiny-llama")
    assert asked == ["someorg/tiny-llama"]
    assert ref.base_id == "tiny-llama" and ref.load_path == str(snapshot)
    assert ref.weights_source == "hub:someorg/tiny-llama@0123abcd"
    assert ref.fingerprint != resolve_base(str(tiny_base)).fingerprint  # another weights identity
