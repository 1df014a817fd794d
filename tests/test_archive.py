"""Installing adapter archives: good ones land whole, hostile or broken ones leave nothing behind."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from loraswap.adapters.archive import extract_adapter, install_archive
from loraswap.adapters.base import BaseRef, resolve_base
from loraswap.adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, AdapterError, read_manifest
from loraswap.adapters.store import AdapterStore
from loraswap.train.trainer import TrainConfig, train_many


@pytest.fixture(scope="module")
def adapter(tiny_base: Path, qa_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("src")
    train_many(
        str(tiny_base),
        str(qa_csv),
        ["symptoms"],
        out,
        TrainConfig(max_steps=1, eval_examples=0, quant="none"),
        progress=False,
    )
    return out / "symptoms"


@pytest.fixture(scope="module")
def ref(tiny_base: Path) -> BaseRef:
    return resolve_base(str(tiny_base))


def tar_gz(files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def adapter_files(folder: Path, prefix: str = "", manifest: bool = True) -> dict[str, bytes]:
    names = [CONFIG_FILE, WEIGHTS_FILE] + ([MANIFEST_FILE] if manifest else [])
    return {prefix + n: (folder / n).read_bytes() for n in names}


def leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def test_tar_gz_at_root_installs(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    path = install_archive(tar_gz(adapter_files(adapter)), "mine", tmp_path, ref)
    assert path == tmp_path / "mine"
    m = read_manifest(path)
    assert m.name == "mine" and m.qtype == "symptoms"
    assert AdapterStore(tmp_path, shipped_dir=None).names() == ["mine"]
    assert leftovers(tmp_path) == ["mine"]


def test_zip_in_one_folder_without_manifest_installs(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    path = install_archive(zip_bytes(adapter_files(adapter, "symptoms/", manifest=False)), "zipped", tmp_path, ref)
    m = read_manifest(path)
    assert m.base_fingerprint == ref.fingerprint and m.data_source == "upload" and m.rank == 8
    assert m.target_modules == ["q_proj", "v_proj"]


def test_existing_name_needs_overwrite(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    data = tar_gz(adapter_files(adapter))
    install_archive(data, "a", tmp_path, ref)
    with pytest.raises(FileExistsError, match="already exists"):
        install_archive(data, "a", tmp_path, ref)
    install_archive(data, "a", tmp_path, ref, overwrite=True)
    assert leftovers(tmp_path) == ["a"]


def _hostile_cases(adapter: Path) -> list[tuple[str, bytes, str]]:
    good = adapter_files(adapter)
    link = tarfile.TarInfo("adapter_model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("adapter_model.safetensors")
    hard.type, hard.linkname = tarfile.LNKTYPE, "adapter_config.json"
    dev = tarfile.TarInfo("adapter_model.safetensors")
    dev.type = tarfile.CHRTYPE
    cfg = {CONFIG_FILE: good[CONFIG_FILE]}
    return [
        ("traversal", tar_gz({**good, "../evil.json": b"{}"}), "points outside the archive"),
        ("absolute", tar_gz({**good, "/etc/cron.d/x": b"x"}), "absolute path"),
        ("zip traversal", zip_bytes({**good, "../../x/README.md": b"x"}), "points outside the archive"),
        ("symlink", tar_gz(cfg, [link]), "is a link"),
        ("hard link", tar_gz(cfg, [hard]), "is a link"),
        ("device", tar_gz(cfg, [dev]), "not a regular file"),
        ("pickle", tar_gz({**good, "adapter_model.bin": b"\x80\x04"}), "pickled weights are refused"),
        ("unknown file", tar_gz({**good, "run.py": b"import os"}), "is not an adapter file"),
        ("no weights", tar_gz(cfg), f"no {WEIGHTS_FILE}"),
        (
            "two folders",
            tar_gz({"a/" + CONFIG_FILE: good[CONFIG_FILE], "b/" + WEIGHTS_FILE: good[WEIGHTS_FILE]}),
            "one folder",
        ),
        ("garbage", b"this is not an archive at all", "not a .tar.gz or .zip"),
        ("truncated", tar_gz(good)[:200], "not a readable tar archive"),
        ("bad config", tar_gz({**good, CONFIG_FILE: b"{oops"}), "does not parse"),
        (
            "lora method swap",
            tar_gz({**good, CONFIG_FILE: json.dumps({**json.loads(good[CONFIG_FILE]), "peft_type": "IA3"}).encode()}),
            "unsupported adapter method",
        ),
        (
            "absurd rank",
            tar_gz({**good, CONFIG_FILE: json.dumps({**json.loads(good[CONFIG_FILE]), "r": 100000}).encode()}),
            "outside 1..64",
        ),
        (
            "lying header",
            tar_gz({**good, WEIGHTS_FILE: (10**12).to_bytes(8, "little") + good[WEIGHTS_FILE][8:]}),
            "header length",
        ),
    ]


def test_hostile_and_broken_archives_leave_nothing(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    for label, data, message in _hostile_cases(adapter):
        store = tmp_path / label.replace(" ", "-")
        with pytest.raises(AdapterError, match=message):
            install_archive(data, "x", store, ref)
        assert leftovers(store) == [], label


def test_decompression_bomb_stops_at_the_limit(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    bomb = tar_gz({**adapter_files(adapter), "README.md": b"\0" * (8 << 20)})
    assert len(bomb) < 64 << 10  # small archive, large content
    with pytest.raises(AdapterError, match="expands to more than"):
        install_archive(bomb, "x", tmp_path, ref, max_bytes=1 << 20)
    assert leftovers(tmp_path) == []
    with pytest.raises(AdapterError, match="the limit is 100"):
        extract_adapter(bomb, tmp_path, max_bytes=100)


def test_base_mismatch_and_bad_names_are_refused(adapter: Path, tmp_path: Path) -> None:
    other = BaseRef("other", "other-model", "/nowhere", "w", {"model_type": "llama"})
    with pytest.raises(AdapterError, match="other-model"):
        install_archive(tar_gz(adapter_files(adapter)), "x", tmp_path, other)
    for name in ("../x", "a/b", "UPPER", "x" * 65, "ѕymptoms"):
        with pytest.raises(AdapterError, match="invalid adapter name"):
            install_archive(tar_gz(adapter_files(adapter)), name, tmp_path, other)
    assert leftovers(tmp_path) == []


def test_concurrent_uploads_of_one_name_have_exactly_one_winner(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = tar_gz(adapter_files(adapter))

    def attempt(_: int) -> str:
        try:
            install_archive(data, "same", tmp_path, ref)
            return "won"
        except FileExistsError:
            return "lost"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    assert results.count("won") == 1 and results.count("lost") == 7
    assert leftovers(tmp_path) == ["same"]
    assert AdapterStore(tmp_path, shipped_dir=None).names() == ["same"]
